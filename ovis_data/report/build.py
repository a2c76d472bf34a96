"""`ovis-data report`: which datasets, then per dataset its counts, histograms and gallery, then the page.

Everything that scales with a dataset's rows runs in DuckDB under validate's bounded connection
(counts, histograms, the seeded choice of gallery rows); what Python holds is per histogram a few dozen
bins, per gallery a few samples, and with --tokenizer one int32 per sample (10M samples: 40 MB).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ..constants import DEFAULT_CAPTION_TEMPLATE
from ..duck import bounded_connection
from ..errors import OvisDataError
from ..pack.tokenize import bundled_qwen_tokenizer_dir
from ..recipes import select_recipe
from ..registry import DatasetSpec, load_registry, resolve_root, select
from ..storage import AnyPath, local_copy
from ..validate.catalog import catalog_path, check_catalog_current, rejected_path
from . import stats
from .gallery import GoodCard, RejectedCard, good_cards, rejected_cards, seeded_good, seeded_rejected
from .images import image_size, read_images
from .packed import PackedView, find_manifest, packed_view
from .page import render_page
from .svg import Histogram
from .tokens import SampleRenderer

SIZE_SAMPLE = 64  # images measured for the size histogram when validate recorded no sizes
Progress = Callable[[str, int, int], None]  # (what, done, total)


@dataclass
class Selection:
    """The datasets a report covers and how pack would render them."""

    label: str  # for the page: "stage 3 (stage3.toml)", "recipe my.toml", "datasets a, b"
    specs: list[DatasetSpec]
    stage: int | None = None
    template: str = "auto"
    weights: dict[str, float] = field(default_factory=dict)
    caption_templates: dict[str, str | None] = field(default_factory=dict)


def select_datasets(
    stage: int | None, names: list[str] | None, recipe: Path | None, dataset_info: Path | None
) -> Selection:
    """--stage N (the shipped recipe), NAMES..., or --recipe FILE: at most one; none: every dataset of
    the registry (as validate checks them all)."""
    if sum(x is not None and x != [] for x in (stage, names, recipe)) > 1:
        raise OvisDataError("give one of --stage N, dataset names, or --recipe FILE")
    if stage is None and recipe is None:
        specs = select(load_registry(dataset_info), names)
        label = f"datasets {', '.join(names)}" if names else f"all {len(specs)} datasets"
        return Selection(label, specs, caption_templates={s.name: s.caption_template for s in specs})
    chosen, registry = select_recipe(stage, recipe, dataset_info)
    specs = [registry[m.name] for m in chosen.datasets]
    label = f"stage {chosen.stage} ({chosen.path.name})" if recipe is None else f"recipe {chosen.path}"
    return Selection(
        label,
        specs,
        chosen.stage,
        chosen.template,
        {m.name: m.weight for m in chosen.datasets},
        # as pack takes them: the recipe's, else the registry's
        {m.name: m.caption_template or registry[m.name].caption_template for m in chosen.datasets},
    )


@dataclass
class DatasetSection:
    name: str
    data_format: str
    stage: int
    weight: float | None = None
    missing: str | None = None  # why there is nothing to show (no catalog yet)
    stale: str | None = None  # the catalog predates its meta file
    check: str | None = None  # how deeply validate checked the images
    good: int = 0
    rejected: dict[str, int] = field(default_factory=dict)
    histograms: list[Histogram] = field(default_factory=list)
    good_cards: list[GoodCard] = field(default_factory=list)
    rejected_cards: list[RejectedCard] = field(default_factory=list)

    @property
    def bad(self) -> int:
        return sum(self.rejected.values())

    @property
    def total(self) -> int:
        return self.good + self.bad


@dataclass
class Report:
    title: str
    root: str
    selection: str
    tokens_note: str
    renderer_note: str
    seed: int
    samples: int
    datasets: list[DatasetSection]
    packed: PackedView | None


def _renderer(tokenizer: Path | None, packed: PackedView | None, template: str) -> SampleRenderer:
    """--tokenizer, else the packed stage's, else the bundled Qwen2.5 tokenizer (the gallery's marks)."""
    if tokenizer is not None:
        return SampleRenderer(tokenizer, template, f"tokenizer {tokenizer}")
    if packed is not None:
        path = Path(packed.manifest["tokenizer"]["path"])
        if path.is_dir():
            return SampleRenderer(path, template, f"the packed stage's tokenizer {path}")
    return SampleRenderer(bundled_qwen_tokenizer_dir(), template, "the bundled Qwen2.5 tokenizer")


def _sampled_sizes(con, catalog: Path, image_dir: AnyPath, seed: int) -> list[tuple[int, int]]:
    rows = seeded_good(con, catalog, SIZE_SAMPLE, seed)
    paths = [p for r in rows for p in (r["images"] or [])][:SIZE_SAMPLE]
    found = read_images(con, image_dir, paths)
    return [s for s in (image_size(found[p]) for p in paths if p in found) if s is not None]


def dataset_section(
    con,
    spec: DatasetSpec,
    sel: Selection,
    root: AnyPath,
    renderer: SampleRenderer,
    exact: bool,
    seed: int,
    samples: int,
    catalog_dir: Path | None,
    progress: Progress | None = None,
) -> DatasetSection:
    d = DatasetSection(spec.name, spec.data_format, spec.stage, sel.weights.get(spec.name))
    cat_path = catalog_path(root, spec.name, catalog_dir)
    if not cat_path.exists():
        d.missing = f"no catalog at {cat_path}: run `ovis-data validate {spec.name}` first"
        return d
    try:
        check_catalog_current(cat_path, spec.name, spec.meta_path(root))
    except OvisDataError as e:  # shown on the page: the report still describes what the catalog holds
        d.stale = str(e)
    image_dir = spec.image_path(root)
    caption_template = sel.caption_templates.get(spec.name) or DEFAULT_CAPTION_TEMPLATE
    rej_path = rejected_path(root, spec.name, catalog_dir)
    with local_copy(cat_path) as catalog, contextlib.ExitStack() as stack:
        rejected = stack.enter_context(local_copy(rej_path)) if rej_path.exists() else None
        d.good = stats.catalog_rows(catalog)
        d.check = stats.check_mode(catalog)
        d.rejected = stats.rejected_by_reason(con, rejected) if rejected is not None else {}
        if exact:

            def on_rows(done: int, total: int) -> None:
                if progress:
                    progress(f"tokens of {spec.name}", done, total)

            counts = renderer.text_tokens(catalog, spec.data_format, caption_template, on_rows)
            note = f"exact: as pack renders them with {renderer.name} (template included, images not)"
            d.histograms.append(stats.array_histogram(con, counts, "text tokens (exact)", "tokens", note))
        else:
            d.histograms.append(stats.approximate_tokens(con, catalog, spec.data_format))
        if spec.data_format == "conversation":
            d.histograms.append(stats.turns(con, catalog))
        if image_dir is not None:
            d.histograms.append(stats.images_per_sample(con, catalog))
            if stats.sizes_recorded(con, catalog):
                d.histograms.append(stats.image_sizes(con, catalog))
            else:
                sizes = _sampled_sizes(con, catalog, image_dir, seed)
                d.histograms.append(stats.sampled_image_sizes(con, sizes))
        good = seeded_good(con, catalog, samples, seed)
        d.good_cards = good_cards(con, good, spec.data_format, image_dir, renderer, caption_template)
        if rejected is not None and samples:
            d.rejected_cards = rejected_cards(con, seeded_rejected(con, rejected, samples, seed), image_dir)
    return d


def make_report(
    sel: Selection,
    root: str | Path | None,
    out: Path,
    *,
    packed: Path | None = None,
    tokenizer: Path | None = None,
    seed: int = 0,
    samples: int = 4,
    catalog_dir: Path | None = None,
    progress: Progress | None = None,
) -> Report:
    """Write the report of `sel`'s datasets under `root` to `out` (atomically) and return what it shows."""
    if samples < 0:
        raise OvisDataError(f"--samples must be >= 0, got {samples}")
    base = resolve_root(root)
    with bounded_connection() as con:
        view = packed_view(con, find_manifest(packed, sel.stage)) if packed is not None else None
        renderer = _renderer(tokenizer, view, sel.template)
        sections = []
        for i, spec in enumerate(sel.specs):
            if progress:
                progress("datasets", i, len(sel.specs))
            sections.append(
                dataset_section(
                    con,
                    spec,
                    sel,
                    base,
                    renderer,
                    tokenizer is not None,
                    seed,
                    samples,
                    catalog_dir,
                    progress=progress,
                )  # fmt: skip
            )
        if progress:
            progress("datasets", len(sel.specs), len(sel.specs))
    if all(s.missing for s in sections):
        raise OvisDataError(f"no catalog under {base} for {sel.label}: run `ovis-data validate` first")
    tokens_note = (
        f"exact, counted with {renderer.source}"
        if tokenizer is not None
        else f"approximate (characters / {stats.CHARS_PER_TOKEN}); --tokenizer DIR counts them exactly"
    )
    report = Report(
        title=f"Ovis data report: {sel.label}",
        root=str(base),
        selection=sel.label,
        tokens_note=tokens_note,
        renderer_note=renderer.source,
        seed=seed,
        samples=samples,
        datasets=sections,
        packed=view,
    )
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(render_page(report), encoding="utf-8")
    os.replace(tmp, out)
    return report
