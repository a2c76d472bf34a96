"""`ovis-data` entry point: maps library errors to exit status 2 with a clear message."""

from __future__ import annotations

import importlib
from importlib.metadata import entry_points
from typing import NoReturn

from ..clikit import run
from ..errors import OvisDataError
from .app import app

# Each module registers its commands on `app`; a missing optional one must not break the others.
_COMMAND_MODULES = (
    "list_cmd", "get_cmd", "fetch_cmd", "validate_cmd", "pack_cmd", "inspect_cmd", "report_cmd",
)  # fmt: skip
for _name in _COMMAND_MODULES:
    try:
        importlib.import_module(f"{__name__}.{_name}")
    except ModuleNotFoundError as _e:
        if _e.name != f"{__name__}.{_name}":
            raise

# Commands of packages above this one (`demo`, which also drives ovis_model) register themselves through
# this entry-point group, so ovis_data never imports them.
COMMAND_ENTRY_POINTS = "ovis_data.commands"
for _entry in entry_points(group=COMMAND_ENTRY_POINTS):
    importlib.import_module(_entry.value)


def main() -> NoReturn:
    run(app, "ovis-data", (OvisDataError,))
