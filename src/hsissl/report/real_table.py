"""The table of ``hsissl evaluate-real``: one per scene, from its per-seed rows.

Each row of ``metrics.json`` holds one (scene, protocol, seed) with the mIoU of every model.
Per scene and protocol this gives each model's mean ± std over seeds and two *paired*
differences, computed seed by seed on the same split and then summarised (mean ± std of the
differences, which removes the split-to-split spread that both models share):

- vs the better floor: the per-pixel floor (``pixel-lr`` or ``pixel-rf``) with the higher mean
  on that scene and protocol (one floor for every seed, named in the table);
- vs the control: the untrained encoder of the same architecture with the same head (only for
  pretrained encoders): ``random-init@<method>+<head>`` where evaluate-real built one for that
  method's architecture, else ``random-init+<head>`` (the first method's architecture).

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


def control_name(method: str) -> str:
    """The name of the random-init control of ``method``'s architecture (not the first method's)."""
    return f"{CONTROL}@{method}"


def control_of(model: str, models: Iterable[str]) -> str | None:
    """The control a pretrained ``model`` ("dinov2+probe") is compared with, among ``models``."""
    encoder, head = split_model(model)
    if head is None:
        return None
    own = f"{control_name(encoder)}+{head}"
    return own if own in models else f"{CONTROL}+{head}"


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
    return "control" if encoder.partition("@")[0] == CONTROL else "pretrained"


def label(model: str) -> str:
    encoder, head = split_model(model)
    # random-init@dinov2: the control of DINOv2's architecture
    base, _, arch = encoder.partition("@")
    name = LABELS.get(base) or (methods.get(base).label if base in methods.names() else base)
    if arch:
        name += f" ({methods.get(arch).label if arch in methods.names() else arch} arch.)"
    return f"{name} + {head}" if head else name


def mean_std(values: Sequence[float]) -> dict[str, float]:
    return {"mean": float(np.mean(values)), "std": float(np.std(values)), "n": len(values)}


def paired(a: Mapping[int, float], b: Mapping[int, float]) -> dict[str, Any] | None:
    """Mean ± std over the seeds both have of a[seed] - b[seed]; None without a shared seed."""
    seeds = sorted(set(a) & set(b))
    if not seeds:
        return None
    return mean_std([a[s] - b[s] for s in seeds]) | {"seeds": seeds}


def _order(model: str) -> tuple[int, int, int, int, str]:
    """Floors, baseline, the control, then each pretrained encoder (after the control of its own
    architecture, if any); heads in a fixed order."""
    encoder, head = split_model(model)
    rank = {"floor": 0, "baseline": 1}.get(role(model), 2)
    base, _, arch = encoder.partition("@")
    order = (CONTROL, *methods.names())
    e = order.index(arch or base) if (arch or base) in order else len(order)
    h = HEAD_ORDER.index(head) if head in HEAD_ORDER else len(HEAD_ORDER)
    return rank, e, int(role(model) == "pretrained"), h, model


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
                control = control_of(model, models)
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


def pretraining_line(data: Mapping[str, Any]) -> str:
    """What the encoders were pretrained on (evaluate-real's ``pretraining`` entry)."""
    pixels = f", {data['pixels']:,} distinct pixels" if data.get("pixels") else ""
    return (f"Pretraining data: {data['tiles']} tiles of {data['tile_size']}×{data['tile_size']} px "
            f"(stride {data['stride']}) from {len(data['scenes'])} scene{'s' * (len(data['scenes']) != 1)} "
            f"({', '.join(data['scenes'])}){pixels}; {data['steps']} steps per method.")  # fmt: skip


def markdown(
    tables: Mapping[str, Mapping[str, Any]], pretraining: Mapping[str, Any] | None = None
) -> str:
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
                      "per-pixel floor and to the random-init encoder of the same architecture "
                      "with the same head."]  # fmt: skip
        parts.append("\n".join(lines))
    if pretraining:
        parts.insert(0, pretraining_line(pretraining))
    return "\n\n".join(parts) + "\n"


BEGIN, END = "<!-- real-table:begin -->", "<!-- real-table:end -->"


def replace_block(text: str, block: str, where: str = "document") -> str:
    """``text`` with what lies between the :data:`BEGIN` and :data:`END` markers replaced."""
    if text.count(BEGIN) != 1 or text.count(END) != 1 or text.index(BEGIN) > text.index(END):
        raise ValueError(f"{where}: expected one {BEGIN} line followed by one {END} line")
    head, rest = text.split(BEGIN)
    _, tail = rest.split(END)
    return f"{head}{BEGIN}\n{block.strip()}\n{END}{tail}"
