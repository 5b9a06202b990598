"""Short, human names for what the report shows: methods, runs, checkpoints, inference modes."""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from typing import Any

from hsissl import methods

# What else stands where a method does: the random-init control and from-scratch baselines.
OTHER_LABELS = {"random": "random init", "none": "from scratch"}
SHORT_NAME = 20  # characters kept of a long run/checkpoint name


def method_label(method: str) -> str:
    """``"dinov2"`` -> ``"DINOv2"`` (its label in hsissl.methods); unknown methods as they are."""
    if method in methods.names():
        return methods.get(method).label
    return OTHER_LABELS.get(method, method)


def short_name(name: str, width: int = SHORT_NAME) -> str:
    """``name`` if it fits ``width``, else its start and its end (where run ids differ)."""
    if len(name) <= width:
        return name
    tail = min(7, width // 3)
    return f"{name[: width - tail - 1]}…{name[-tail:]}"


def unique_labels(methods: Mapping[str, str]) -> dict[str, str]:
    """``{name: method}`` -> ``{name: label}``: the method's label when the method is unique,
    else the label plus the shortened name, else the full name (labels never collide)."""
    per_method = Counter(methods.values())
    labels = {
        name: method_label(m) if per_method[m] == 1 else f"{method_label(m)} {short_name(name)}"
        for name, m in methods.items()
    }
    seen = Counter(labels.values())
    return {name: name if seen[label] > 1 else label for name, label in labels.items()}


def scene_inference(metrics: dict[str, Any]) -> str:
    """How a run predicted whole scenes, from its metrics.json (``scene_inference`` or the
    finetune config's ``eval_stride``)."""
    mode = metrics.get("scene_inference")
    if mode == "whole":
        return "whole scene, one pass"
    stride = sliding_stride(metrics)
    if stride is not None:
        # runs from before finetune.eval_blend existed averaged overlaps uniformly
        blend = metrics["config"].get("eval_blend", "uniform")
        return f"sliding window, stride {stride} px, {blend} blend"
    return str(mode) if mode else "?"


def sliding_stride(metrics: dict[str, Any]) -> int | None:
    """The sliding-window stride of a run scored that way, else None."""
    config = metrics.get("config")
    if metrics.get("scene_inference") not in (None, "sliding") or not isinstance(config, dict):
        return None
    stride = config.get("eval_stride")
    return stride if isinstance(stride, int) and stride > 0 else None
