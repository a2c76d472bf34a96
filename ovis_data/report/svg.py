"""Charts drawn as inline SVG: no script, no external resource, the same bytes for the same numbers."""

from __future__ import annotations

from dataclasses import dataclass, field
from html import escape

WIDTH, HEIGHT = 270, 140
PAD_LEFT, PAD_RIGHT, PAD_TOP, PAD_BOTTOM = 40, 8, 22, 30


@dataclass
class Histogram:
    """Counts of integer values in equal bins: bin i holds [lo + i*width, lo + (i+1)*width)."""

    title: str
    lo: int
    width: int
    counts: list[int]
    unit: str = ""
    note: str = ""  # how the values were obtained (approximate, from a sample...)
    summary: dict[str, float] = field(default_factory=dict)  # n, min, median, p95, max

    def label(self, i: int) -> str:
        a = self.lo + i * self.width
        return str(a) if self.width == 1 else f"{a}-{a + self.width - 1}"


@dataclass
class Series:
    """One bar per item (shard), already in order."""

    title: str
    values: list[float]
    labels: list[str]
    unit: str = ""
    note: str = ""


def _number(v: float) -> str:
    if isinstance(v, float) and not v.is_integer():
        return f"{v:,.2f}"
    return f"{int(v):,}"


def _frame(title: str, bars: list[tuple[float, str]], left: str, right: str) -> str:
    """An SVG of bars (height, tooltip), an axis from `left` to `right`, the maximum on the y axis."""
    top = max((h for h, _ in bars), default=0) or 1
    plot_w = WIDTH - PAD_LEFT - PAD_RIGHT
    plot_h = HEIGHT - PAD_TOP - PAD_BOTTOM
    step = plot_w / max(len(bars), 1)
    out = [
        f'<svg class="chart" role="img" aria-label="{escape(title)}" xmlns="http://www.w3.org/2000/svg" '
        f'width="{WIDTH}" height="{HEIGHT}" viewBox="0 0 {WIDTH} {HEIGHT}">',
        f'<text x="{PAD_LEFT}" y="14" class="t">{escape(title)}</text>',
        f'<line x1="{PAD_LEFT}" y1="{HEIGHT - PAD_BOTTOM}" x2="{WIDTH - PAD_RIGHT}" '
        f'y2="{HEIGHT - PAD_BOTTOM}" class="ax"/>',
        f'<text x="{PAD_LEFT - 4}" y="{PAD_TOP + 8}" class="y">{escape(_number(top))}</text>',
        f'<text x="{PAD_LEFT - 4}" y="{HEIGHT - PAD_BOTTOM}" class="y">0</text>',
    ]
    for i, (h, tip) in enumerate(bars):
        bh = plot_h * h / top
        x = PAD_LEFT + i * step
        y = HEIGHT - PAD_BOTTOM - bh
        out.append(
            f'<rect x="{x + 0.5:.1f}" y="{y:.1f}" width="{max(step - 1, 0.6):.1f}" height="{bh:.1f}">'
            f"<title>{escape(tip)}</title></rect>"
        )
    out.append(f'<text x="{PAD_LEFT}" y="{HEIGHT - PAD_BOTTOM + 14}" class="x">{escape(left)}</text>')
    out.append(
        f'<text x="{WIDTH - PAD_RIGHT}" y="{HEIGHT - PAD_BOTTOM + 14}" class="x end">{escape(right)}</text>'
    )
    out.append("</svg>")
    return "".join(out)


def histogram_svg(h: Histogram) -> str:
    unit = f" {h.unit}" if h.unit else ""
    bars = [(float(c), f"{h.label(i)}{unit}: {c:,}") for i, c in enumerate(h.counts)]
    right = f"{h.lo + len(h.counts) * h.width - 1}{unit}" if h.counts else ""
    return _frame(h.title, bars, f"{h.lo}", right)


def series_svg(s: Series) -> str:
    unit = f" {s.unit}" if s.unit else ""
    bars = [(float(v), f"{lab}: {_number(v)}{unit}") for v, lab in zip(s.values, s.labels, strict=True)]
    return _frame(s.title, bars, s.labels[0] if s.labels else "", s.labels[-1] if s.labels else "")


def summary_line(h: Histogram) -> str:
    """n, median, p95 and max under a histogram, in words."""
    s = h.summary
    if not s.get("n"):
        return "no values"
    unit = f" {h.unit}" if h.unit else ""
    return (
        f"{_number(s['n'])} values; min {_number(s['min'])}, median {_number(s['median'])}, "
        f"p95 {_number(s['p95'])}, max {_number(s['max'])}{unit}"
    )
