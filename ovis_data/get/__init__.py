"""`ovis-data get`: every dataset from its source (the `source` key of its registry entry) to a root,
verified and resumable. See docs/get.md."""

from .download import Hub, SourceFailed
from .engine import GetOptions, NotEnoughSpace, UnitResult
from .plan import Plan, make_plan
from .session import GetOutcome, ensure_url_lists, get

__all__ = [
    "GetOptions",
    "GetOutcome",
    "Hub",
    "NotEnoughSpace",
    "Plan",
    "SourceFailed",
    "UnitResult",
    "ensure_url_lists",
    "get",
    "make_plan",
]
