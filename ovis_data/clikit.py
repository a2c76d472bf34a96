"""What the three command lines (ovis-data, ovis-train, ovis-chat) share: plain help, one-line errors,
`--version`, and a progress display that stays off CI logs.

Library functions never print: they take callbacks (`progress(label, done, total)`), and the commands
hand them `ProgressDisplay.callback`.
"""

from __future__ import annotations

import inspect
import os
import sys
import time
from collections.abc import Callable
from importlib.metadata import PackageNotFoundError, version
from typing import Any, NoReturn

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, Task, TextColumn
from rich.text import Text

try:  # typer >= 0.22 vendors click; older releases use click itself
    from typer import _click as click
    from typer.core import TyperArgument, TyperOption
except ImportError:  # pragma: no cover
    import click  # type: ignore[no-redef]

    TyperArgument = TyperOption = None  # type: ignore[assignment,misc]


def package_version() -> str:
    try:
        return version("ovis-toolkit")
    except PackageNotFoundError:  # a source tree that was never installed
        return "unknown"


def version_option(prog: str) -> Any:
    """A `--version` flag for a typer command: prints `prog VERSION` and exits."""

    def show(value: bool) -> None:
        if value:
            typer.echo(f"{prog} {package_version()}")
            raise typer.Exit()

    return typer.Option(
        "--version", callback=show, is_eager=True, expose_value=True, help="Show the version and exit."
    )


# -- help ---------------------------------------------------------------------------------------------


def reflow(doc: str | None) -> str | None:
    """A docstring as help text: the lines of each paragraph joined (the terminal wraps them), indented
    lines (examples) kept as they are, each on its own line."""
    if not doc:
        return doc
    out = []
    for para in inspect.cleandoc(doc).split("\n\n"):
        lines: list[str] = []
        for line in para.splitlines():
            if line.startswith(" ") or not lines or lines[-1].startswith(" "):
                lines.append(line)
            else:
                lines[-1] += " " + line.strip()
        out.append("\n".join(lines))
    return "\n\n".join(out)


if TyperArgument is not None:

    class _PlainArgument(TyperArgument):
        """An argument shown as NAME (not `{name}`) in usage lines and messages."""

        @property
        def display_name_raw(self) -> str:
            return self.metavar or (self.name or "").upper()

        def _usage_display_name(self) -> str:
            name = self.display_name_raw
            name = name if self.required else f"[{name}]"
            return name + ("..." if self.nargs != 1 else "")

        def display_type_rich(self, ctx: click.Context) -> str | None:
            return None

    class _PlainOption(TyperOption):
        """An option shown as `--root ROOT`: flags without a type, values with a metavar, not `<path>`."""

        def display_type_rich(self, ctx: click.Context) -> str | None:
            if self.is_flag or self.count:
                return None
            if self.metavar:
                return self.metavar
            integer = getattr(getattr(self, "type_descriptor", None), "annotation", None) is int
            return "N" if integer else (self.name or "").upper()


def polish(cmd: click.Command) -> click.Command:
    """Plain help for a command and its subcommands: reflowed paragraphs, NAME metavars, no types."""
    cmd.help = reflow(cmd.help)
    if TyperArgument is not None:
        help_option = cmd.get_help_option(click.Context(cmd))  # made once and cached by the command
        for p in [*cmd.params, *([help_option] if help_option is not None else [])]:
            if type(p) is TyperArgument:
                p.__class__ = _PlainArgument
            elif type(p) is TyperOption:
                p.__class__ = _PlainOption
    for sub in getattr(cmd, "commands", {}).values():
        polish(sub)
    return cmd


# -- running ------------------------------------------------------------------------------------------


def fail(message: str, code: int = 2) -> NoReturn:
    """One line on stderr, `error: ...`, and the exit status (2: usage or configuration)."""
    line = " ".join(part.strip() for part in str(message).splitlines() if part.strip())
    Console(stderr=True, soft_wrap=True).print(f"[bold red]error:[/] {escape(line)}", highlight=False)
    sys.exit(code)


def run(app: typer.Typer, prog: str, errors: tuple[type[BaseException], ...]) -> NoReturn:
    """Run a typer app as `prog`: exit 2 with one line for usage errors and for `errors` (the library's
    configuration errors), never a traceback for them."""
    cmd = polish(typer.main.get_command(app))
    try:
        rv = cmd.main(prog_name=prog, standalone_mode=False)
    except click.exceptions.UsageError as e:
        where = e.ctx.command_path if e.ctx is not None else prog
        fail(f"{e.format_message()} (see {where} --help)", e.exit_code)
    except click.exceptions.ClickException as e:
        fail(e.format_message(), e.exit_code)
    except typer.Abort:
        fail("interrupted", 130)
    except errors as e:
        fail(str(e))
    sys.exit(rv if isinstance(rv, int) else 0)


# -- progress -----------------------------------------------------------------------------------------


def hf_bars_only_on_a_terminal() -> None:
    """transformers' own bars (loading and saving weights) off when stderr is not a terminal."""
    if not sys.stderr.isatty():
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()


def _bytes(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


class _Rate(ProgressColumn):
    """Items per second over the run so far, in the task's own unit (bytes: B/kB/MB/GB)."""

    def render(self, task: Task) -> Text:
        elapsed = task.elapsed or 0.0
        unit = task.fields.get("unit")
        if not elapsed or not task.completed or not unit:
            return Text("")
        if unit == "B":
            return Text(f"{_bytes(task.completed / elapsed)}/s", style="cyan")
        return Text(f"{task.completed / elapsed:,.0f} {unit}/s", style="cyan")


class _Count(MofNCompleteColumn):
    """done/total, as sizes when the unit is bytes."""

    def render(self, task: Task) -> Text:
        if task.fields.get("unit") != "B":
            return super().render(task)
        total = f"/{_bytes(task.total)}" if task.total is not None else ""
        return Text(f"{_bytes(task.completed)}{total}", style="progress.download")


class _Eta(ProgressColumn):
    def render(self, task: Task) -> Text:
        elapsed = task.elapsed or 0.0
        if not task.total or not task.completed or not elapsed or task.finished:
            return Text("")
        left = (task.total - task.completed) * elapsed / task.completed
        return Text("eta " + time.strftime("%H:%M:%S", time.gmtime(left)), style="dim")


class ProgressDisplay:
    """Progress bars on stderr, only when stderr is a terminal (CI logs stay clean) and not `quiet`.

    `callback(label, unit)` gives a `progress(name, done, total)` function for a library call; each
    distinct label gets one bar. Used as a context manager: bars vanish when the work is done.
    """

    def __init__(self, quiet: bool = False) -> None:
        self.enabled = not quiet and sys.stderr.isatty() and os.environ.get("TERM") != "dumb"
        self._bar: Progress | None = None
        self._tasks: dict[str, Any] = {}

    def __enter__(self) -> ProgressDisplay:
        if self.enabled:
            self._bar = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                _Count(),
                _Rate(),
                _Eta(),
                console=Console(stderr=True),
                transient=True,
            )
            self._bar.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.stop()

    def update(
        self, label: str, done: int, total: int | None, unit: str = "", description: str | None = None
    ) -> None:
        if self._bar is None:
            return
        if label not in self._tasks:
            self._tasks[label] = self._bar.add_task(label, total=total, unit=unit)
        self._bar.update(self._tasks[label], completed=done, total=total, description=description or label)

    def reset(self, label: str) -> None:
        """Start a bar over (its rate and ETA too), e.g. for the next dataset."""
        if self._bar is not None and label in self._tasks:
            self._bar.reset(self._tasks[label], total=None, completed=0)

    def callback(self, label: str, unit: str = "") -> Callable[[str, int, int], None]:
        """A `progress(name, done, total)` for library functions: `label name` on one bar."""

        def progress(name: str, done: int, total: int) -> None:
            self.update(label, done, total, unit, description=f"{label} {name}".strip())

        return progress
