"""Captions that must stay true for the rows they describe (built from each run's metrics.json)."""

from __future__ import annotations

from typing import Any

from hsissl.report import html
from hsissl.report.labels import method_label, short_name, sliding_stride


def results_caption(
    runs: list[dict[str, Any]], references: list[dict[str, Any]], tile: int | None
) -> str:
    """What the table's numbers are, true for the rows shown: each run's scene inference, when
    Tile and Scene metrics coincide, the Δ column's unit and control, and the reference."""
    tile_text = f"{tile} px" if tile else "tile-size"
    parts = [
        f"Metrics in %. Tile: each {tile_text} tile of the eval split predicted on its own. "
        "Scene: whole scenes, predicted as the Scene inference column says."
    ]
    whole = [m["name"] for m in runs if m.get("scene_inference") == "whole"]
    if whole:
        verb = "predicts" if len(whole) == 1 else "predict"
        parts.append(f"{_names(whole)} {verb} each scene in one pass (no windows).")
    same = [m for m in runs if tile and sliding_stride(m) == tile]
    if same:
        equal = sum(
            m.get("tile", {}).get("matrix") == m.get("scene", {}).get("matrix") for m in same
        )
        parts.append(
            f"Sliding window with stride = tile size ({tile_text}, {len(same)} run(s)): the "
            "windows are exactly the eval tiles, so "
            + (
                "Tile and Scene metrics coincide (identical confusion matrices)."
                if equal == len(same)
                else f"Tile and Scene confusion matrices are identical for {equal} of "
                f"{len(same)} (the others did not score the same pixels)."
            )
        )
    encoders = [(m, m.get("encoder") or {}) for m in runs]
    controls = [enc for _, enc in encoders if enc.get("method") == "random"]
    if controls:
        arch = sorted({str(enc.get("factory") or "?") for enc in controls})
        other = sorted(
            {
                f"{method_label(str(enc.get('method', '?')))} ({enc.get('factory')})"
                for m, enc in encoders
                if m.get("kind") == "finetune"
                and enc.get("method") != "random"
                and enc.get("factory") not in arch
            }
        )
        parts.append(
            "Δ scene mIoU vs random: scene mIoU minus that of the random-init control with the "
            f"same head, in percentage points (pp); the control is an untrained {' / '.join(arch)}."
        )
        if other:
            parts.append(
                f"{', '.join(other)} use another architecture, so their Δ also includes the "
                "architecture difference."
            )
    for ref in references:
        scene = "" if ref["scene"] else " (Scene columns: –, the dataset's tiles overlap)"
        parts.append(
            f"Reference row (not a model): predict the {ref['train_split']} split's most common "
            f"labelled class, {ref['class_id']} {ref['class_name']}, on every pixel of the "
            f"{ref['eval_split']} split: OA = its share of the labelled pixels, mIoU = its IoU "
            "over the classes present, absent classes left out as for the runs" + scene + "."
        )
    parts.append(
        "Blue rows: DeepLabV3+ baseline from scratch; orange rows: random-init control; red "
        "rows: normalised with other statistics than the dataset's (not comparable, never "
        "bold); grey italic: chance reference. Bold: best per column."
    )
    return html.fragment("paragraph", " ".join(parts))


def _names(names: list[str]) -> str:
    return ", ".join(short_name(n, 40) for n in names)
