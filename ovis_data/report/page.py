"""The report as one HTML file: inline CSS, inline SVG, thumbnails as data: URIs, no script, no link to
anything outside it. Nothing in it depends on the time or the machine, so the same inputs give the same
bytes."""

from __future__ import annotations

from html import escape
from typing import TYPE_CHECKING

from .gallery import GoodCard, RejectedCard
from .images import Picture
from .svg import Histogram, Series, histogram_svg, series_svg, summary_line

if TYPE_CHECKING:
    from .build import DatasetSection, Report
    from .packed import PackedView

CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,"DejaVu Sans",sans-serif;margin:0;color:#1d2430;
background:#f6f7f9}
main{max-width:1180px;margin:0 auto;padding:18px 24px 60px}
h1{font-size:22px;margin:8px 0 4px}h2{font-size:18px;margin:28px 0 8px;border-bottom:1px solid #d5d9e0;
padding-bottom:4px}h3{font-size:15px;margin:16px 0 6px}
.meta{color:#555;margin:2px 0}.note{color:#666;font-size:12px;margin:2px 0 8px}
table{border-collapse:collapse;background:#fff;margin:6px 0}th,td{border:1px solid #d5d9e0;padding:3px 8px;
text-align:right;vertical-align:top}th{background:#eef1f5}td.l,th.l{text-align:left}
.bad{color:#a33}.ok{color:#276b2f}.warn{background:#fff4d6;border:1px solid #e8c96a;padding:4px 8px}
.charts{display:flex;flex-wrap:wrap;gap:10px}.chart-box{background:#fff;border:1px solid #d5d9e0;padding:4px}
.chart-box p{margin:0 4px 4px;font-size:11px;color:#555;max-width:262px}
svg.chart rect{fill:#4f7cc4}svg.chart rect:hover{fill:#1f4c94}svg.chart text{font-size:10px;fill:#333}
svg.chart text.t{font-size:12px;font-weight:600}svg.chart text.y{text-anchor:end}
svg.chart text.end{text-anchor:end}svg.chart line.ax{stroke:#888}
.cards{display:grid;grid-template-columns:repeat(auto-fill,minmax(340px,1fr));gap:10px}
.card{background:#fff;border:1px solid #d5d9e0;border-radius:4px;padding:8px}
.card.rej{border-color:#e3b5b5}.card h4{margin:0 0 4px;font-size:12px;font-weight:600;color:#333}
.pics{display:flex;flex-wrap:wrap;gap:4px;margin:4px 0}.pics figure{margin:0;font-size:10px;color:#666}
.pics img{display:block;max-height:140px;border:1px solid #ccc}.nopic{border:1px dashed #bbb;padding:18px 8px;
width:120px;text-align:center}
.conv{white-space:pre-wrap;word-break:break-word;font:12px/1.4 ui-monospace,"DejaVu Sans Mono",monospace;
background:#fafbfc;border:1px solid #eee;padding:6px;max-height:320px;overflow:auto;margin:0}
.sup{background:#d9f2dc;color:#174d1d}.ctx{color:#777}.imgmark{color:#a0289c;font-weight:600}
.reason{font-weight:600;color:#a33}.detail{font:12px ui-monospace,"DejaVu Sans Mono",monospace;
word-break:break-word}
nav a{margin-right:10px}
"""


def _n(x: int | float) -> str:
    return f"{x:,}" if isinstance(x, int) else f"{x:,.2f}"


def _chart(c: Histogram | Series) -> str:
    if isinstance(c, Histogram):
        svg = histogram_svg(c)
        words = summary_line(c) + (f". {c.note}" if c.note else "")
    else:
        svg = series_svg(c)
        words = c.note.strip(" ()") if c.note else ""
    return f'<div class="chart-box">{svg}<p>{escape(words)}</p></div>'


def _picture(p: Picture) -> str:
    size = f"{p.size[0]}x{p.size[1]}" if p.size else ""
    caption = escape(" ".join(x for x in (p.path, size) if x))
    if p.uri is None:
        return f'<figure><div class="nopic">{escape(p.note)}</div><figcaption>{caption}</figcaption></figure>'
    return f'<figure><img src="{p.uri}" alt="{escape(p.path)}"><figcaption>{caption}</figcaption></figure>'


def _conversation(card: GoodCard) -> str:
    """inspect's segments as HTML: supervised runs green, context grey, images as [IMAGE k WxH]."""
    out = []
    for seg in card.segments:
        if "image" in seg:
            k = seg["image"]
            pic = card.pictures[k] if k < len(card.pictures) else None
            size = "x".join(map(str, pic.size)) if pic is not None and pic.size else "?"
            out.append(f'<span class="imgmark">[IMAGE {k} {size}]</span>')
        else:
            cls = "sup" if seg["supervised"] else "ctx"
            out.append(f'<span class="{cls}">{escape(seg["text"])}</span>')
    return f'<pre class="conv">{"".join(out)}</pre>'


def _good(card: GoodCard) -> str:
    head = f"row {card.row} · id {escape(card.id)}"
    if card.error:
        body = f'<p class="bad">the template refuses it: {escape(card.error)}</p>'
    else:
        head += f" · {card.length} ids, {card.supervised} supervised"
        body = _conversation(card)
    pics = "".join(_picture(p) for p in card.pictures)
    return f'<div class="card"><h4>{head}</h4><div class="pics">{pics}</div>{body}</div>'


def _rejected(card: RejectedCard) -> str:
    pics = "".join(_picture(p) for p in card.pictures) or '<div class="nopic">no image</div>'
    return (
        f'<div class="card rej"><h4>row {card.row} · id {escape(card.id)}</h4>'
        f'<div class="reason">{escape(card.reason)}</div><div class="detail">{escape(card.detail)}</div>'
        f'<div class="pics">{pics}</div></div>'
    )


def _reasons(reasons: dict[str, int]) -> str:
    return ", ".join(f"{escape(k)} {v:,}" for k, v in reasons.items()) or "-"


def _summary(report: Report) -> str:
    packed = report.packed.manifest["datasets"] if report.packed is not None else None
    head = ["dataset", "format", "samples", "good", "rejected", "rejected by reason"]
    if packed is not None:
        head += ["packed", "dropped by pack"]
    rows = ["<tr>" + "".join(f'<th class="{"l" if "by" in h or h in ("dataset", "format") else ""}">'
                            f"{h}</th>" for h in head) + "</tr>"]  # fmt: skip
    for d in report.datasets:
        link = f'<a href="#ds-{escape(d.name)}">{escape(d.name)}</a>'
        if d.missing:
            cells = [link, escape(d.data_format), "-", "-", "-", '<span class="bad">not validated</span>']
        else:
            cells = [link, escape(d.data_format), _n(d.total), _n(d.good), _n(d.bad), _reasons(d.rejected)]
        if packed is not None:
            p = packed.get(d.name)
            cells += [_n(p["packed"]), _reasons(p["dropped"])] if p else ["-", "not in the packed stage"]
        classes = ["l", "l", "", "", "", "l", "", "l"]
        rows.append(
            "<tr>"
            + "".join(f'<td class="{c}">{x}</td>' for c, x in zip(classes, cells, strict=False))
            + "</tr>"
        )
    return "<table>" + "".join(rows) + "</table>"


def _packed(view: PackedView) -> str:
    m = view.manifest
    parts = [
        '<h2 id="packed">Packed stage</h2>',
        f'<p class="meta">{escape(str(view.path))}: {m["records"]:,} sequences of {m["capacity"]:,} tokens '
        f"in {len(m['shards']):,} shards, {m['samples']:,} samples, fill {m['fill']:.2%}; tokenizer "
        f"{escape(m['tokenizer']['name'])}, template {escape(str(m['template']['chat']))}, "
        f"{m['visual_tokens_per_image']} visual tokens per image.</p>",
        '<div class="charts">' + "".join(_chart(c) for c in view.charts) + "</div>",
        "<h3>Samples dropped by pack, by reason</h3>",
    ]
    reasons = sorted({r for d in m["datasets"].values() for r in d["dropped"]})
    if not reasons:
        parts.append('<p class="ok">none: every selected sample was packed</p>')
        return "".join(parts)
    head = "".join(f"<th>{escape(r)}</th>" for r in reasons)
    rows = [f'<tr><th class="l">dataset</th><th>selected</th><th>packed</th>{head}</tr>']
    for name, d in m["datasets"].items():
        cells = "".join(f"<td>{d['dropped'].get(r, 0):,}</td>" for r in reasons)
        rows.append(f'<tr><td class="l">{escape(name)}</td><td>{d["selected"]:,}</td>'
                    f'<td>{d["packed"]:,}</td>{cells}</tr>')  # fmt: skip
    parts.append("<table>" + "".join(rows) + "</table>")
    return "".join(parts)


def _dataset(d: DatasetSection) -> str:
    parts = [f'<h2 id="ds-{escape(d.name)}">{escape(d.name)}</h2>']
    if d.missing:
        parts.append(f'<p class="warn">{escape(d.missing)}</p>')
        return "".join(parts)
    weight = f", weight {d.weight:g}" if d.weight is not None else ""
    parts.append(
        f'<p class="meta">{escape(d.data_format)}, stage {d.stage}{weight}; {d.total:,} samples: '
        f'<span class="ok">{d.good:,} good</span>, <span class="bad">{d.bad:,} rejected</span>'
        + (f" ({_reasons(d.rejected)})" if d.rejected else "")
        + f"; images checked: {escape(d.check or 'unknown')}</p>"
    )
    if d.stale:
        parts.append(f'<p class="warn">{escape(d.stale)}</p>')
    parts.append('<div class="charts">' + "".join(_chart(h) for h in d.histograms) + "</div>")
    if d.good_cards:
        parts.append(f"<h3>Good samples ({len(d.good_cards)} of {d.good:,}, seeded)</h3>")
        parts.append('<div class="cards">' + "".join(_good(c) for c in d.good_cards) + "</div>")
    if d.rejected_cards:
        parts.append(f"<h3>Rejected samples ({len(d.rejected_cards)} of {d.bad:,}, seeded)</h3>")
        parts.append('<div class="cards">' + "".join(_rejected(c) for c in d.rejected_cards) + "</div>")
    return "".join(parts)


def render_page(report: Report) -> str:
    nav = "".join(f'<a href="#ds-{escape(d.name)}">{escape(d.name)}</a>' for d in report.datasets)
    if report.packed is not None:
        nav = '<a href="#packed">packed stage</a>' + nav
    body = [
        f"<h1>{escape(report.title)}</h1>",
        f'<p class="meta">root {escape(report.root)}; {escape(report.selection)}; seed {report.seed}, '
        f"{report.samples} samples per gallery</p>",
        f'<p class="meta">tokens: {escape(report.tokens_note)}</p>',
        f'<p class="meta">conversations rendered with {escape(report.renderer_note)}: '
        '<span class="sup">supervised text</span> (what the model learns to write), '
        '<span class="ctx">context</span>, <span class="imgmark">[IMAGE k WxH]</span> where an image goes, '
        "as <code>ovis-data inspect</code> shows packed records</p>",
        f"<nav>{nav}</nav>",
        "<h2>Datasets</h2>",
        _summary(report),
    ]
    if report.packed is not None:
        body.append(_packed(report.packed))
    body += [_dataset(d) for d in report.datasets]
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1"><link rel="icon" href="data:,">'
        f"<title>{escape(report.title)}</title><style>{CSS}</style></head>"
        f"<body><main>{''.join(body)}</main></body></html>\n"
    )
