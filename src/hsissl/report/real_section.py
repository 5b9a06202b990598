"""The report's section for ``hsissl evaluate-real`` results: per-scene tables and bar plots."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from hsissl.report import html, plots
from hsissl.report.real_table import DASH, scene_tables

ROW_CLASS = {"baseline": "baseline", "control": "control"}


def _pp(stat: Mapping[str, Any] | None, signed: bool = False) -> html.Cell | str:
    if stat is None:
        return DASH
    sign = "+" if signed else ""
    text = f"{100 * stat['mean']:{sign}.1f} ± {100 * stat['std']:.1f}"
    return html.Cell(text, value=stat["mean"], cls="num")


def render(name: str, metrics: Mapping[str, Any]) -> str:
    """HTML for one real-eval result (its ``tables``, or tables rebuilt from its ``rows``)."""
    tables = metrics.get("tables") or scene_tables(metrics.get("rows") or [])
    if not tables:
        return html.not_run(f"{name}: no rows in its metrics.json")
    body = [html.fragment("heading", name)]
    for scene, protocols in tables.items():
        body.append(html.fragment("heading", scene, 4))
        for protocol, t in protocols.items():
            floor = t.get("floor") or DASH
            header = ["model", "mIoU %", f"Δ vs floor ({floor}), pp", "Δ vs random-init, pp"]
            rows = [[e["label"], _pp(e["miou"]), _pp(e["vs_floor"], True),
                     _pp(e["vs_control"], True)] for e in t["models"]]  # fmt: skip
            classes = [ROW_CLASS.get(e["role"], "") for e in t["models"]]
            body.append(html.fragment("protocol_line", protocol, t["seeds"]))
            body.append(html.table(header, rows, classes))
        panels = {f"{scene} / {p}": t["models"] for p, t in protocols.items()}
        body.append(
            html.figure(
                plots.real_eval_bars(panels, f"{name}: {scene}"),
                f"{scene}: mIoU (%) over test pixels, mean and std over seeds; dashed line: the "
                "better per-pixel floor. Δ columns: paired per-seed differences (mean ± std).",
            )
        )
    return "".join(body)
