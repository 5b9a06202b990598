"""The report page and its Markdown summary: self-contained HTML (inline CSS, PNGs as data URIs,
no scripts, no links to local files) built from plain values with the Jinja2 templates in
``templates/`` (autoescaped: values are escaped once, where a template inserts them; HTML
that is already escaped travels as :class:`markupsafe.Markup`)."""

from __future__ import annotations

import base64
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from jinja2 import Environment, PackageLoader, StrictUndefined
from markupsafe import Markup, escape

from hsissl.layout import result_key
from hsissl.report.labels import scene_inference

DASH = "–"  # a metric that does not exist (class absent from ground truth and prediction)
METRICS = (("miou", "mIoU"), ("macc", "mAcc"), ("oa", "OA"))
GAIN_HEADER = "Δ scene mIoU vs random (pp)"  # percentage points

TEMPLATES = Environment(
    loader=PackageLoader("hsissl.report", "templates"),
    autoescape=True,
    trim_blocks=True,
    lstrip_blocks=True,
    undefined=StrictUndefined,
)


def render(template: str, **values: Any) -> Markup:
    """``templates/<template>`` rendered with ``values`` (escaped unless Markup)."""
    return Markup(TEMPLATES.get_template(template).render(**values))


def fragment(name: str, *args: Any) -> Markup:
    """The macro ``name`` of ``templates/fragments.html.j2`` applied to ``args``."""
    return Markup(getattr(TEMPLATES.get_template("fragments.html.j2").module, name)(*args))


@dataclass
class Section:
    id: str
    title: str
    body: str  # HTML (escaped already)
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


def esc(value: Any) -> Markup:
    return escape(str(value))


def data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def figure(png: bytes, caption: str, alt: str | None = None) -> Markup:
    """An embedded PNG with a caption."""
    return render("figure.html.j2", src=data_uri(png), caption=caption, alt=alt or caption)


def pct(value: float | None, digits: int = 2) -> str:
    """0.1234 -> "12.34"; None -> "–"."""
    return DASH if value is None else f"{100 * value:.{digits}f}"


def not_run(reason: str) -> Markup:
    return render("not_run.html.j2", reason=reason)


def table(
    header: Sequence[str],
    rows: Sequence[Sequence[Any]],
    row_classes: Sequence[str] = (),
    cls: str = "",
) -> Markup:
    """An HTML table; cells are plain values (escaped), :class:`Cell` or :class:`Raw`."""
    body = [
        {
            "cls": row_classes[i] if i < len(row_classes) else "",
            "cells": [c if isinstance(c, (Cell, Raw)) else Cell(str(c)) for c in row],
        }
        for i, row in enumerate(rows)
    ]
    return render("table.html.j2", header=header, rows=body, cls=cls)


def details(summary: str, body: str) -> Markup:
    return render("details.html.j2", summary=summary, body=Markup(body))


def fingerprint_cell(fingerprint: str | None, matches: bool | None) -> Raw:
    """The fingerprint, in red with a warning when it differs from the dataset's."""
    if fingerprint is None:
        return Raw(DASH)
    return Raw(render("fingerprint_cell.html.j2", fingerprint=fingerprint, matches=matches))


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
            Raw(Markup("<code>{}</code>").format(m["name"])),
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
            Raw(Markup("<i>{}</i>").format(ref["name"])),
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
        [
            r.what,
            Raw(Markup("<code>{}</code>").format(r.name)),
            fingerprint_cell(r.fingerprint, r.matches),
        ]
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
    shown = [Section(s.id, s.title, Markup(s.body), s.status) for s in sections]
    return (
        str(render("page.html.j2", title=title, meta=meta, problems=problems, sections=shown))
        + "\n"
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
            f"- `{m['name']}` ({m.get('kind', '?')}): `{result_key(m['name'])}`, "
            f"encoder `{enc}`, {m.get('seconds', 0):.0f} s"
        )
    if problems:
        lines += ["", "## Inputs that could not be used", ""] + [f"- {p}" for p in problems]
    lines += ["", "Full report with figures: `report.html` (same folder).", ""]
    return "\n".join(lines)
