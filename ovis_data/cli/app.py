"""The `ovis-data` Typer application; each command lives in its own module under ovis_data/cli/."""

from typing import Annotated

import typer

from ..clikit import version_option

app = typer.Typer(
    name="ovis-data",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback()
def ovis_data(version: Annotated[bool, version_option("ovis-data")] = False) -> None:
    """Data engine for Ovis-style vision-language models: list the 19 datasets, fetch URL datasets,
    validate meta files against images, pack tokenized shards, look inside them, and run the whole
    pipeline on a built-in demo corpus. Each command's --help has an example.

    Examples:
        ovis-data demo
        ovis-data list --root /data/ovis
    """
