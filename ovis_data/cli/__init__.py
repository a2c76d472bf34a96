"""`ovis-data` entry point: maps library errors to exit status 2 with a clear message."""

from __future__ import annotations

import importlib
import sys

from rich.console import Console
from rich.markup import escape

from ..errors import OvisDataError
from .app import app

# Each module registers its commands on `app`; a missing optional one must not break the others.
_COMMAND_MODULES = ("list_cmd", "validate_cmd", "demo_cmd", "fetch_cmd", "pack_cmd")
for _name in _COMMAND_MODULES:
    try:
        importlib.import_module(f"{__name__}.{_name}")
    except ModuleNotFoundError as _e:
        if _e.name != f"{__name__}.{_name}":
            raise


def main() -> None:
    try:
        app()
    except OvisDataError as e:
        Console(stderr=True, soft_wrap=True).print(f"[bold red]error:[/] {escape(str(e))}", highlight=False)
        sys.exit(2)
