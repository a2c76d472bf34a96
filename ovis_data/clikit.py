"""What the three command lines (ovis-data, ovis-train, ovis-chat) share: plain help, one-line errors,
`--version`, and a progress display that stays off CI logs.

Library functions never print: they take callbacks (`progress(label, done, total)`), and the commands
hand them `ProgressDisplay.callback`.
"""

from __future__ import annotations

import inspect
import logging
import os
import sys
import tempfile
import time
from collections.abc import Callable
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, NoReturn

import typer
from rich.console import Console
from rich.markup import escape
from rich.measure import Measurement
from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, Task, TextColumn
from rich.table import Table
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


# -- paths ------------------------------------------------------------------------------------------------
# One rule for every command's path options, applied before any work starts: a folder where a file is
# expected (or the reverse), or an output that cannot be created, is a usage error naming the option and
# the path, never a traceback minutes later. Object-store URLs (s3://...) are left to the storage layer.


def _bad(option: str, path: object, reason: str) -> typer.BadParameter:
    return typer.BadParameter(f"{path}: {reason}", param_hint=option)


def _is_url(path: object) -> bool:
    text = str(path)
    return "://" in text and not text.startswith("file://")


def expect_file(path: str | os.PathLike | None, option: str) -> None:
    """An input file: it must exist and not be a folder."""
    if path is None or _is_url(path):
        return
    p = Path(path).expanduser()
    if p.is_dir():
        raise _bad(option, path, "a folder, not a file")
    if not p.exists():
        raise _bad(option, path, "no such file")


def expect_dir(path: str | os.PathLike | None, option: str) -> None:
    """An input folder: it must exist and be a folder (a packed shard names the folder to pass instead)."""
    if path is None or _is_url(path):
        return
    p = Path(path).expanduser()
    if p.is_file() and p.suffix == ".tar":
        raise _bad(option, path, f"a shard; pass its folder ({p.parent})")
    if p.exists() and not p.is_dir():
        raise _bad(option, path, "a file, not a folder")
    if not p.exists():
        raise _bad(option, path, "no such folder")


def _writable_dir(option: str, path: object, folder: Path) -> None:
    """`folder` (an existing folder) accepts new entries: probed by making and removing one, the only test
    that also holds for root, read-only mounts and /proc."""
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".ovis-probe-", dir=folder))
    except OSError as e:
        raise _bad(option, path, f"cannot write in {folder} ({e.strerror or e})") from None


def _creatable(option: str, shown: object, folder: Path) -> None:
    """`folder` can take new entries: it is a writable folder, or its nearest existing parent is one."""
    if folder.exists():
        if not folder.is_dir():
            raise _bad(option, shown, f"{folder} is a file, not a folder")
        _writable_dir(option, shown, folder)
        return
    parent = folder.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise _bad(option, shown, f"cannot be created: {parent} is a file")
    _writable_dir(option, shown, parent)


def expect_dir_or_creatable(path: str | os.PathLike | None, option: str) -> None:
    """An output folder: an existing, writable folder, or one that can be created. Creates nothing."""
    if path is None or _is_url(path):
        return
    p = Path(path).expanduser().absolute()
    if p.exists() and not p.is_dir():
        raise _bad(option, path, "a file, not a folder")
    _creatable(option, path, p)


def expect_file_or_creatable(path: str | os.PathLike | None, option: str) -> None:
    """An output file: not a folder, and its folder exists writable or can be created. Creates nothing."""
    if path is None or _is_url(path):
        return
    p = Path(path).expanduser().absolute()
    if p.is_dir():
        raise _bad(option, path, "a folder, not a file name")
    _creatable(option, path, p.parent)


# -- running ------------------------------------------------------------------------------------------


def fail(message: str, code: int = 2) -> NoReturn:
    """One line on stderr, `error: ...`, and the exit status (2: usage or configuration)."""
    line = " ".join(part.strip() for part in str(message).splitlines() if part.strip())
    Console(stderr=True, soft_wrap=True).print(f"[bold red]error:[/] {escape(line)}", highlight=False)
    sys.exit(code)


INTERRUPTED = "interrupted; re-run the same command to continue"


def interrupted(message: str = INTERRUPTED) -> NoReturn:
    """Ctrl-C: one line (no traceback, no `error:`: nothing is wrong) and exit status 130 (128 + SIGINT)."""
    Console(stderr=True, soft_wrap=True).print(message, highlight=False)
    sys.exit(130)


class _Drop(logging.Filter):
    def __init__(self, start: str) -> None:
        super().__init__()
        self.start = start

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.start)


def quiet_dependencies() -> None:
    """Our commands show our messages: a dependency's notice that says nothing to the user goes.
    DeepSpeed's "Setting accelerator to CPU" on every import where there is no GPU: ovis-train's start
    line names the device, and nothing else in these commands depends on DeepSpeed's accelerator."""
    logging.getLogger("DeepSpeed").addFilter(_Drop("Setting accelerator to CPU"))


def run(
    app: typer.Typer,
    prog: str,
    errors: tuple[type[BaseException], ...],
    on_interrupt: str = INTERRUPTED,
) -> NoReturn:
    """Run a typer app as `prog`: exit 2 with one line for usage errors and for `errors` (the library's
    configuration errors), never a traceback for them; Ctrl-C says `on_interrupt` and exits 130."""
    cmd = polish(typer.main.get_command(app))
    quiet_dependencies()
    try:
        rv = cmd.main(prog_name=prog, standalone_mode=False)
        if rv == 130:  # typer's own answer to a KeyboardInterrupt (no command returns 130)
            interrupted(on_interrupt)
    except click.exceptions.UsageError as e:
        where = e.ctx.command_path if e.ctx is not None else prog
        fail(f"{e.format_message()} (see {where} --help)", e.exit_code)
    except click.exceptions.ClickException as e:
        fail(e.format_message(), e.exit_code)
    except (typer.Abort, KeyboardInterrupt):
        interrupted(on_interrupt)
    except errors as e:
        fail(str(e))
    sys.exit(rv if isinstance(rv, int) else 0)


# -- tables -------------------------------------------------------------------------------------------------


def print_table(console: Console, table: Table) -> None:
    """A table whose first column (a dataset name, a path) is never cut: on a terminal it folds rather than
    ends in an ellipsis, and the other columns wrap first; in a pipe or a file every line is as wide as its
    content needs (no terminal width to fit, and `grep NAME` finds whole names)."""
    if table.columns:
        table.columns[0].no_wrap, table.columns[0].overflow = True, "fold"
    if console.is_terminal:
        console.print(table)
        return
    wide = Console(file=console.file, width=1 << 16, color_system=None, soft_wrap=False)
    width = Measurement.get(wide, wide.options, table).maximum
    Console(file=console.file, width=width, color_system=None).print(table)


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
