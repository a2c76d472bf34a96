"""`ovis-eval MODEL_DIR --bench FILE.tsv [--bench ...] --out DIR`: argument parsing only; the work is in
ovis_model.eval.score."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, NoReturn

import typer
from rich.console import Console

from ovis_data.clikit import ProgressDisplay, hf_bars_only_on_a_terminal, run, version_option
from ovis_data.errors import OvisDataError

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)


@app.command()
def eval_command(
    model_dir: Annotated[
        Path,
        typer.Argument(metavar="MODEL_DIR", help="A model folder written by ovis-train (RUN/stageN/model)."),
    ],
    bench: Annotated[
        list[Path],
        typer.Option(
            "--bench",
            metavar="FILE",
            help="A benchmark in VLMEvalKit's TSV format: multiple choice (MMBench, MMStar, SEED-Bench, "
            "AI2D, ScienceQA) or yes/no (MME, HallusionBench). Repeat for more.",
        ),
    ],
    out: Annotated[
        Path,
        typer.Option(metavar="DIR", help="Writes DIR/<bench>_predictions.tsv and DIR/<bench>_summary.json."),
    ],
    circular: Annotated[
        bool,
        typer.Option(
            "--circular", help="MMBench's circular evaluation: every rotation of the options must be right."
        ),
    ] = False,
    batch_size: Annotated[int, typer.Option(min=1, metavar="N", help="Questions per generation batch.")] = 8,
    max_new_tokens: Annotated[
        int, typer.Option(min=1, metavar="N", help="Generation budget per answer.")
    ] = 32,
    device: Annotated[
        str | None, typer.Option(metavar="DEVICE", help="cuda or cpu (default: cuda if present).")
    ] = None,
    dtype: Annotated[
        str | None,
        typer.Option(metavar="DTYPE", help="bfloat16, float16 or float32 (default: bfloat16 on cuda)."),
    ] = None,
    version: Annotated[bool, version_option("ovis-eval")] = False,
) -> None:
    """Score the model in MODEL_DIR on benchmark files in VLMEvalKit's TSV format (greedy decoding,
    VLMEvalKit's prompts for Ovis, rule-based answer extraction; docs/evaluation.md).

    Prints one summary line per benchmark; a row that cannot be used is named on stderr and skipped.

    Example (after ovis-data demo: its final model and the small bench it built from its corpus):
        ovis-eval demo_out/run/stage3/model --bench demo_out/demo_bench.tsv --out demo_out/eval
    """
    from ..model_dir import load_for_chat
    from .bench import open_bench
    from .generate import model_answerer
    from .score import evaluate_bench

    for path in bench:  # every file checked before the model loads
        open_bench(path)
    hf_bars_only_on_a_terminal()
    model = load_for_chat(model_dir, device=device, dtype=dtype)
    answer = model_answerer(model, max_new_tokens)
    weights = sorted(model_dir.glob("*.safetensors"))
    run_key = json.dumps(
        [
            str(model_dir.resolve()),
            [(p.name, p.stat().st_mtime_ns) for p in weights],
            max_new_tokens,
            circular,
        ]
    )  # a killed run resumes only with the same model and settings
    err = Console(stderr=True, soft_wrap=True)
    for path in bench:
        with ProgressDisplay() as shown:
            summary = evaluate_bench(
                path,
                out,
                answer,
                circular=circular,
                batch_size=batch_size,
                warn=lambda line: err.print(f"warning: {line}", highlight=False, markup=False),
                run_key=run_key,
                progress=lambda done, total, name=path.stem: shown.update(name, done, total, "rows"),
            )
        acc = summary["accuracy"]
        chance = summary["chance"]
        typer.echo(
            f"{summary['bench']}: accuracy "
            + (f"{acc:.1%}" if acc is not None else "n/a")
            + f" over {summary['questions']} questions"
            + (" (circular)" if summary["circular"] else "")
            + (f", chance {chance:.1%}" if chance is not None else "")
            + f"; {summary['unmatched']} unmatched answers, {summary['skipped']} rows skipped; "
            + str(out / f"{summary['bench']}_summary.json")
        )


def main() -> NoReturn:
    from ..chat import ChatError
    from .bench import BenchError

    run(app, "ovis-eval", (BenchError, ChatError, OvisDataError))


if __name__ == "__main__":
    main()
