"""The report page and its Markdown summary: self-contained HTML (inline CSS, PNGs as data URIs,
no scripts, no links to local files) built from plain values."""

from __future__ import annotations

import base64
import html
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from hsissl.report.labels import scene_inference

DASH = "–"  # a metric that does not exist (class absent from ground truth and prediction)
METRICS = (("miou", "mIoU"), ("macc", "mAcc"), ("oa", "OA"))
GAIN_HEADER = "Δ scene mIoU vs random (pp)"  # percentage points

CSS = """
body { font-family: -apple-system, "Segoe UI", Roboto, Helvetica, Arial, sans-serif;
       margin: 0 auto; max-width: 1280px; padding: 24px 32px 64px; color: #222; line-height: 1.45; }
h1 { margin-bottom: 4px; }
h2 { margin-top: 40px; border-bottom: 2px solid #ddd; padding-bottom: 4px; }
h3 { margin: 22px 0 6px; font-size: 1.05em; }
.meta { color: #555; font-size: 0.92em; } .meta code { font-size: 0.95em; }
nav ul { columns: 2; font-size: 0.95em; list-style: none; padding-left: 4px; }
table { border-collapse: collapse; margin: 8px 0 14px; font-size: 0.88em; }
th, td { border: 1px solid #d4d4d4; padding: 3px 8px; }
th { background: #f0f2f5; text-align: left; position: sticky; top: 0; }
td code, td span { white-space: nowrap; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
tbody tr:nth-child(even) { background: #fafafa; }
tr.baseline td { background: #eef5ff; } tr.control td { background: #fff6e5; }
tr.mismatch td { background: #ffe8e8; } tr.reference td { color: #555; font-style: italic; }
.best { font-weight: bold; }
.bad { color: #c00000; font-weight: bold; } .ok { color: #1a7f37; }
.notrun { color: #777; font-style: italic; } .failed { color: #c00000; }
.problems { border-left: 4px solid #c00000; background: #fff3f3; padding: 6px 12px; }
details { margin: 6px 0 12px; } summary { cursor: pointer; color: #0550ae; }
figure { margin: 10px 0 18px; } figure img { max-width: 100%; height: auto; }
figcaption { color: #555; font-size: 0.88em; }
code { background: #f3f3f3; padding: 0 3px; border-radius: 3px; }
.scroll { overflow-x: auto; }
"""


@dataclass
class Section:
    id: str
    title: str
    body: str  # HTML
    status: str = "ok"  # ok | not run | failed


@dataclass(frozen=True)
class Raw:
    """Already-escaped HTML for a table cell's content."""

    html: str


@dataclass(frozen=True)
class Cell:
    """A table cell: ``text`` (escaped), CSS ``cls``, and ``value`` kept as ``data-value``."""

    text: str
    cls: str = ""
    value: Any = None


@dataclass
class FingerprintRow:
    what: str  # "dataset" | "result" | "encoder"
    name: str
    fingerprint: str | None
    matches: bool | None  # None: nothing to compare with


def esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def figure(png: bytes, caption: str, alt: str | None = None) -> str:
    """An embedded PNG with a caption."""
    return (
        f'<figure><img alt="{esc(alt or caption)}" src="{data_uri(png)}">'
        f"<figcaption>{esc(caption)}</figcaption></figure>"
    )


def pct(value: float | None, digits: int = 2) -> str:
    """0.1234 -> "12.34"; None -> "–"."""
    return DASH if value is None else f"{100 * value:.{digits}f}"


def not_run(reason: str) -> str:
    return f'<p class="notrun">Not run: {esc(reason)}</p>'


def table(
    header: Sequence[str],
    rows: Sequence[Sequence[Any]],
    row_classes: Sequence[str] = (),
    cls: str = "",
) -> str:
    """An HTML table; cells are plain values (escaped), :class:`Cell` or :class:`Raw`."""
    head = "".join(f"<th>{esc(h)}</th>" for h in header)
    body = []
    for i, row in enumerate(rows):
        rc = row_classes[i] if i < len(row_classes) and row_classes[i] else ""
        cells = "".join(_td(c) for c in row)
        body.append(f'<tr class="{rc}">{cells}</tr>' if rc else f"<tr>{cells}</tr>")
    attr = f' class="{cls}"' if cls else ""
    return (
        f'<div class="scroll"><table{attr}><thead><tr>{head}</tr></thead>'
        f"<tbody>{''.join(body)}</tbody></table></div>"
    )


def _td(cell: Any) -> str:
    if isinstance(cell, Raw):
        return f"<td>{cell.html}</td>"
    if isinstance(cell, Cell):
        cls = f' class="{cell.cls}"' if cell.cls else ""
        value = f' data-value="{esc(cell.value)}"' if cell.value is not None else ""
        return f"<td{cls}{value}>{esc(cell.text)}</td>"
    return f"<td>{esc(cell)}</td>"


def details(summary: str, body: str) -> str:
    return f"<details><summary>{esc(summary)}</summary>{body}</details>"


def fingerprint_cell(fingerprint: str | None, matches: bool | None) -> Raw:
    """The fingerprint, in red with a warning when it differs from the dataset's."""
    if fingerprint is None:
        return Raw(DASH)
    if matches is False:
        return Raw(
            f'<span class="bad" title="differs from the dataset\'s Normalizer">'
            f"{esc(fingerprint)} ≠ dataset</span>"
        )
    mark = ' <span class="ok">✓</span>' if matches else ""
    return Raw(f"<code>{esc(fingerprint)}</code>{mark}")


# -- tables over result runs (metrics.json dicts) -------------------------------------------------
def results_table(
    runs: Sequence[dict[str, Any]],
    dataset_fingerprint: str | None,
    references: Sequence[dict[str, Any]] = (),
) -> str:
    """Main table: one row per finetune/baseline run, tile and whole-scene metrics (%), how the
    scenes were predicted, the gain in scene mIoU (percentage points) over the random-init
    control with the same head, and the Normalizer used; then the chance ``references``
    (:func:`hsissl.report.reference.majority_reference`), which never count as the best.

    A run normalised with other statistics than the dataset's is shown in red and never counts
    as the best or as the control (its numbers are not comparable).
    """

    def matches(m: dict[str, Any]) -> bool | None:
        return None if dataset_fingerprint is None else m.get("normalizer") == dataset_fingerprint

    valid = [m for m in runs if matches(m) is not False]
    controls = {
        m["head"]: m["scene"]["miou"]
        for m in valid
        if _method(m) == "random" and m.get("scene", {}).get("miou") is not None
    }
    best = {
        (part, key): max(
            (v for m in valid if (v := m.get(part, {}).get(key)) is not None), default=None
        )
        for part in ("tile", "scene")
        for key, _ in METRICS
    }
    header = ["Run", "Kind", "Encoder", "Head", "Scene inference"]
    header += [f"{where} {label} %" for where in ("Tile", "Scene") for _, label in METRICS]
    header += [GAIN_HEADER, "Normalizer"]
    rows, classes = [], []
    for m in runs:
        ok = matches(m) is not False
        row: list[Any] = [
            Raw(f"<code>{esc(m['name'])}</code>"),
            m.get("kind", "?"),
            _encoder_label(m),
            m.get("head", "?"),
            scene_inference(m),
        ]
        for part in ("tile", "scene"):
            for key, _ in METRICS:
                v = m.get(part, {}).get(key)
                top = ok and v is not None and v == best[(part, key)]
                row.append(Cell(pct(v), "num best" if top else "num", v))
        gain = None
        if m.get("kind") == "finetune" and _method(m) != "random" and m["head"] in controls:
            v = m.get("scene", {}).get("miou")
            gain = None if v is None else v - controls[m["head"]]
        row.append(Cell(DASH if gain is None else f"{100 * gain:+.2f}", "num", gain))
        row.append(fingerprint_cell(m.get("normalizer"), matches(m)))
        rows.append(row)
        classes.append(_row_class(m, ok))
    for ref in references:
        row = [
            Raw(f"<i>{esc(ref['name'])}</i>"),
            "reference, not a model",
            f"predicts {ref['class_id']} {ref['class_name']} everywhere",
            DASH,
            f"{ref['eval_split']} split class counts",
        ]
        for part in ("tile", "scene"):
            row += [Cell(pct(v := ref[part].get(key)), "num", v) for key, _ in METRICS]
        rows.append([*row, DASH, DASH])
        classes.append("reference")
    return table(header, rows, classes, cls="results")


def per_class_table(runs: Sequence[dict[str, Any]], part: str, class_names: Sequence[str]) -> str:
    """Classes as rows, runs as columns: IoU (%) ``part`` = "tile" | "scene"; absent = "–"."""
    header = ["Class", *(m["name"] for m in runs)]
    n = max((len(m.get(part, {}).get("per_class_iou") or []) for m in runs), default=0)
    rows = []
    for c in range(n):
        name = class_names[c + 1] if c + 1 < len(class_names) else f"class {c + 1}"
        row: list[Any] = [f"{c + 1} {name}"]
        for m in runs:
            ious = m.get(part, {}).get("per_class_iou") or []
            v = ious[c] if c < len(ious) else None
            row.append(Cell(pct(v, 1), "num", v))
        rows.append(row)
    return table(header, rows, cls="per-class")


def fingerprint_table(rows: Sequence[FingerprintRow]) -> str:
    body = [
        [r.what, Raw(f"<code>{esc(r.name)}</code>"), fingerprint_cell(r.fingerprint, r.matches)]
        for r in rows
    ]
    classes = ["mismatch" if r.matches is False else "" for r in rows]
    return table(["What", "Name", "Normalizer fingerprint"], body, classes, cls="fingerprints")


def _row_class(m: dict[str, Any], matches_dataset: bool) -> str:
    if not matches_dataset:
        return "mismatch"
    if m.get("kind") == "baseline":
        return "baseline"
    return "control" if _method(m) == "random" else ""


def _method(m: dict[str, Any]) -> str:
    return str((m.get("encoder") or {}).get("method", "?"))


def _encoder_label(m: dict[str, Any]) -> str:
    enc = m.get("encoder") or {}
    method, factory = enc.get("method", "?"), enc.get("factory", "")
    if method == "none":
        return f"from scratch ({factory})" if factory else "from scratch"
    if method == "random":
        return f"random init ({factory})"
    return f"{method} ({factory})" if factory else method


# -- the page ---------------------------------------------------------------------------------
def page(
    title: str,
    meta: Sequence[tuple[str, str]],
    problems: Sequence[str],
    sections: Sequence[Section],
) -> str:
    """The whole HTML document: title, metadata lines, problems box, contents, sections."""
    meta_html = "".join(f"<div>{esc(k)}: <code>{esc(v)}</code></div>" for k, v in meta)
    problems_html = ""
    if problems:
        items = "".join(f"<li>{esc(p)}</li>" for p in problems)
        problems_html = (
            f'<div class="problems"><b>Inputs that could not be used</b><ul>{items}</ul></div>'
        )
    toc = "".join(
        f'<li><a href="#{s.id}">{esc(s.title)}</a>'
        f"{'' if s.status == 'ok' else f' <span class=notrun>({esc(s.status)})</span>'}</li>"
        for s in sections
    )
    body = "".join(
        f'<section id="{s.id}"><h2>{esc(s.title)}</h2>{s.body}</section>' for s in sections
    )
    return (
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f'<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{esc(title)}</title><style>{CSS}</style></head><body>"
        f'<h1>{esc(title)}</h1><div class="meta">{meta_html}</div>{problems_html}'
        f"<nav><ul>{toc}</ul></nav>{body}</body></html>\n"
    )


# -- Markdown summary -------------------------------------------------------------------------
def markdown_summary(
    title: str,
    meta: Sequence[tuple[str, str]],
    runs: Sequence[dict[str, Any]],
    fingerprints: Sequence[FingerprintRow],
    others: Sequence[dict[str, Any]],
    problems: Sequence[str],
    references: Sequence[dict[str, Any]] = (),
) -> str:
    """The main table (with the chance references), the Normalizer fingerprints and the runs,
    for a supervisor's inbox."""
    lines = [f"# {title}", ""]
    lines += [f"- {k}: `{v}`" for k, v in meta]
    lines += ["", "## Segmentation results (%)", ""]
    if runs:
        lines += [
            "| Run | Encoder | Head | Scene inference | Tile mIoU | Scene mIoU | Scene mAcc "
            "| Scene OA | Normalizer |",
            "|---|---|---|---|--:|--:|--:|--:|---|",
        ]
        flags = {r.name: r.matches for r in fingerprints if r.what == "result"}
        for m in runs:
            fp = m.get("normalizer") or DASH
            fp_text = f"**{fp} ≠ dataset**" if flags.get(m["name"]) is False else f"`{fp}`"
            tile, scene = m.get("tile", {}), m.get("scene", {})
            lines.append(
                f"| `{m['name']}` | {_encoder_label(m)} | {m.get('head', '?')} | "
                f"{scene_inference(m)} | {pct(tile.get('miou'))} | {pct(scene.get('miou'))} | "
                f"{pct(scene.get('macc'))} | {pct(scene.get('oa'))} | {fp_text} |"
            )
        for ref in references:
            tile, scene = ref["tile"], ref["scene"]
            lines.append(
                f"| *{ref['name']}* (reference, not a model) | predicts {ref['class_id']} "
                f"{ref['class_name']} everywhere | {DASH} | {ref['eval_split']} split class "
                f"counts | {pct(tile.get('miou'))} | {pct(scene.get('miou'))} | "
                f"{pct(scene.get('macc'))} | {pct(scene.get('oa'))} | {DASH} |"
            )
    else:
        lines.append("Not run: no finetune or baseline results in the store.")
    lines += ["", "## Normalizer fingerprints", ""]
    for r in fingerprints:
        flag = " — **MISMATCH with the dataset**" if r.matches is False else ""
        lines.append(f"- {r.what} `{r.name}`: `{r.fingerprint or DASH}`{flag}")
    if not fingerprints:
        lines.append("Not run: no dataset, results or encoders in the store.")
    lines += ["", "## Runs", ""]
    for m in [*runs, *others]:
        enc = (m.get("encoder") or {}).get("uri") or DASH
        lines.append(
            f"- `{m['name']}` ({m.get('kind', '?')}): `results/{m['name']}`, "
            f"encoder `{enc}`, {m.get('seconds', 0):.0f} s"
        )
    if problems:
        lines += ["", "## Inputs that could not be used", ""] + [f"- {p}" for p in problems]
    lines += ["", "Full report with figures: `report.html` (same folder).", ""]
    return "\n".join(lines)
