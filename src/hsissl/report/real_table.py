"""The table of ``hsissl evaluate-real``: one per scene, from its per-seed rows.

Each row of ``metrics.json`` holds one (scene, protocol, seed) with the mIoU of every model.
Per scene and protocol this gives each model's mean ± std over seeds and two *paired*
differences, computed seed by seed on the same split and then summarised (mean ± std of the
differences, which removes the split-to-split spread that both models share):

- vs the better floor: the per-pixel floor (``pixel-lr`` or ``pixel-rf``) with the higher mean
  on that scene and protocol (one floor for every seed, named in the table);
- vs the control: ``random-init+<head>``, the untrained encoder of the same architecture with
  the same head (only for pretrained encoders).

Standard deviations are over seeds with ddof 0, as the summary table's. Used by evaluate-real
(``tables.json`` / ``tables.md``), the report, and ``scripts/real_table.py`` (docs).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from hsissl import methods
from hsissl.config_rules import HEADS, PIXEL_HEADS
from hsissl.report.html import DASH

REAL_KIND = "real-eval"  # the ``kind`` of evaluate-real's metrics.json
FLOORS = ("pixel-lr", "pixel-rf")
BASELINE = "deeplabv3plus"
CONTROL = "random-init"
LABELS = {
    "pixel-lr": "per-pixel logistic regression (floor)",
    "pixel-rf": "per-pixel random forest (floor)",
    BASELINE: "DeepLabV3+ from scratch",
    CONTROL: "random-init",
}

HEAD_ORDER = (*PIXEL_HEADS, *HEADS)  # the closed-form probes, then the trained heads


def split_model(model: str) -> tuple[str, str | None]:
    """``"mae+probe"`` -> ("mae", "probe"); ``"pixel-lr"`` -> ("pixel-lr", None)."""
    encoder, _, head = model.partition("+")
    return encoder, head or None


def role(model: str) -> str:
    """floor | baseline | control | pretrained."""
    encoder, _ = split_model(model)
    if model in FLOORS:
        return "floor"
    if model == BASELINE:
        return "baseline"
    return "control" if encoder == CONTROL else "pretrained"


def label(model: str) -> str:
    encoder, head = split_model(model)
    name = LABELS.get(encoder) or (methods.get(encoder).label if encoder in methods.names()
                                   else encoder)  # fmt: skip
    return f"{name} + {head}" if head else name


def mean_std(values: Sequence[float]) -> dict[str, float]:
    return {"mean": float(np.mean(values)), "std": float(np.std(values)), "n": len(values)}


def paired(a: Mapping[int, float], b: Mapping[int, float]) -> dict[str, Any] | None:
    """Mean ± std over the seeds both have of a[seed] - b[seed]; None without a shared seed."""
    seeds = sorted(set(a) & set(b))
    if not seeds:
        return None
    return mean_std([a[s] - b[s] for s in seeds]) | {"seeds": seeds}


def _order(model: str) -> tuple[int, int, int, str]:
    """Floors, baseline, the control, then each pretrained encoder; heads in a fixed order."""
    encoder, head = split_model(model)
    rank = {"floor": 0, "baseline": 1}.get(role(model), 2)
    order = (CONTROL, *methods.names())
    e = order.index(encoder) if encoder in order else len(order)
    h = HEAD_ORDER.index(head) if head in HEAD_ORDER else len(HEAD_ORDER)
    return rank, e, h, model


def scene_tables(rows: Iterable[Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """scene -> protocol -> {seeds, floor, models: [{model, label, role, miou, vs_floor,
    vs_control}]} from evaluate-real's rows (scores are fractions, as in metrics.json)."""
    scores: dict[str, dict[str, dict[str, dict[int, float]]]] = {}
    for row in rows:
        per_model = scores.setdefault(row["scene"], {}).setdefault(row["protocol"], {})
        for model, value in row["miou"].items():
            per_model.setdefault(model, {})[int(row["seed"])] = float(value)
    tables: dict[str, dict[str, Any]] = {}
    for scene, protocols in scores.items():
        for protocol, models in protocols.items():
            floors = [f for f in FLOORS if f in models]
            floor = max(floors, key=lambda f: np.mean(list(models[f].values()))) if floors else None
            entries = []
            for model in sorted(models, key=_order):
                _, head = split_model(model)
                control = f"{CONTROL}+{head}" if head else None
                is_pretrained = role(model) == "pretrained"
                entries.append({
                    "model": model,
                    "label": label(model),
                    "role": role(model),
                    "miou": mean_std(list(models[model].values())),
                    "vs_floor": paired(models[model], models[floor])
                    if floor and model != floor else None,
                    "vs_control": paired(models[model], models[control])
                    if is_pretrained and control in models else None,
                })  # fmt: skip
            seeds = sorted({s for m in models.values() for s in m})
            tables.setdefault(scene, {})[protocol] = {"seeds": seeds, "floor": floor,
                                                      "models": entries}  # fmt: skip
    return tables


def _pp(stat: Mapping[str, float] | None, signed: bool = False) -> str:
    if stat is None:
        return DASH
    sign = "+" if signed else ""
    return f"{100 * stat['mean']:{sign}.1f} ± {100 * stat['std']:.1f}"


def markdown(tables: Mapping[str, Mapping[str, Any]]) -> str:
    """One Markdown table per scene: per protocol, mIoU and the two paired differences (pp)."""
    parts = []
    for scene, protocols in tables.items():
        names = list(protocols)
        header = ["model"]
        for p in names:
            floor = protocols[p]["floor"]
            header += [f"{p} mIoU", f"{p} Δ floor ({floor})", f"{p} Δ control"]
        lines = [f"### {scene}", "",
                 "| " + " | ".join(header) + " |", "|---" * len(header) + "|"]  # fmt: skip
        models = list(dict.fromkeys(e["model"] for p in names for e in protocols[p]["models"]))
        for model in models:
            cells = [label(model)]
            for p in names:
                entry = next((e for e in protocols[p]["models"] if e["model"] == model), None)
                if entry is None:
                    cells += [DASH] * 3
                    continue
                cells += [_pp(entry["miou"]), _pp(entry["vs_floor"], True),
                          _pp(entry["vs_control"], True)]  # fmt: skip
            lines.append("| " + " | ".join(cells) + " |")
        seeds = sorted({s for p in names for s in protocols[p]["seeds"]})
        lines += ["", f"mIoU % over test pixels, mean ± std over seeds {seeds}; Δ: paired "
                      "per-seed differences in percentage points (mean ± std), to the better "
                      "per-pixel floor and to random-init with the same head."]  # fmt: skip
        parts.append("\n".join(lines))
    return "\n\n".join(parts) + "\n"


BEGIN, END = "<!-- real-table:begin -->", "<!-- real-table:end -->"


def replace_block(text: str, block: str, where: str = "document") -> str:
    """``text`` with what lies between the :data:`BEGIN` and :data:`END` markers replaced."""
    if text.count(BEGIN) != 1 or text.count(END) != 1 or text.index(BEGIN) > text.index(END):
        raise ValueError(f"{where}: expected one {BEGIN} line followed by one {END} line")
    head, rest = text.split(BEGIN)
    _, tail = rest.split(END)
    return f"{head}{BEGIN}\n{block.strip()}\n{END}{tail}"
