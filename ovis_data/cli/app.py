"""The `ovis-data` Typer application; each command lives in its own module under ovis_data/cli/."""

import typer

app = typer.Typer(
    name="ovis-data",
    help=(
        "Data engine for Ovis-style vision-language models: list the 19 datasets, fetch URL datasets, "
        "validate meta files against images, pack tokenized shards, and run the whole pipeline on a demo."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
