"""Allowed values of config keys, checked when a config is loaded (``config.validate``).

A bad value then fails at once with exit code 2 instead of deep inside a stage. Conservative:
only values that can never work. Checks needing heavy imports (model factories, timm names,
dataset splits) stay in the stages. No imports beyond the standard library: components load
configs in light pods.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from typing import Any

Check = tuple[Callable[[Any], bool], str]  # (is the value allowed?, what is allowed)


def _at_least(lo: float) -> Check:
    return (lambda v: v >= lo, f">= {lo}")


def _above(lo: float) -> Check:
    return (lambda v: v > lo, f"> {lo}")


def _within(lo: float, hi: float) -> Check:
    return (lambda v: lo <= v <= hi, f"a value in [{lo}, {hi}]")


def _one_of(*options: str) -> Check:
    return (lambda v: v in options, "one of " + " | ".join(options))


def _range_pair(lo: float, hi: float | None = None, open_lo: bool = False) -> Check:
    """A ``[low, high]`` list with low <= high inside the bounds (crop scales, mask ratios)."""
    low = f"{lo} < low" if open_lo else f"{lo} <= low"
    text = f"[low, high] with {low} <= high" + (f" <= {hi}" if hi is not None else "")

    def ok(v: list[float]) -> bool:
        if len(v) != 2 or v[0] > v[1]:
            return False
        return (v[0] > lo if open_lo else v[0] >= lo) and (hi is None or v[1] <= hi)

    return ok, text


_DEVICE: Check = (
    lambda v: re.fullmatch(r"auto|cpu|cuda(:\d+)?", v) is not None,
    "auto | cpu | cuda | cuda:N",
)
_BETAS: Check = (
    lambda v: len(v) == 2 and all(0.0 <= b < 1.0 for b in v),
    "[beta1, beta2], each in [0, 1)",
)
_POSITIVE, _NON_NEGATIVE = _at_least(1), _at_least(0)
_FRACTION = _within(0.0, 1.0)


# The keys of an ``OptimConfig`` section, which every pretraining method's section extends.
OPTIM_RULES: dict[str, Check] = {
    "lr": _above(0.0),
    "min_lr": _NON_NEGATIVE,
    "warmup_fraction": _FRACTION,
    "weight_decay": _NON_NEGATIVE,
    "betas": _BETAS,
    "clip_grad": _NON_NEGATIVE,
    "drop_rate": _FRACTION,
}


def _optim_rules(section: str) -> dict[str, Check]:
    return {f"{section}.{k}": c for k, c in OPTIM_RULES.items()}


def _dino_rules(section: str) -> dict[str, Check]:
    rules = {
        "centering": _one_of("sinkhorn", "center"),
        "out_dim": _POSITIVE,
        "head_hidden": _POSITIVE,
        "head_bottleneck": _POSITIVE,
        "student_temp": _above(0.0),
        "teacher_temp": _above(0.0),
        "teacher_temp_warmup": _above(0.0),
        "teacher_temp_warmup_fraction": _FRACTION,
        "momentum_teacher": _FRACTION,
        "mask_ratio": _range_pair(0.0, 1.0),
        "mask_probability": _FRACTION,
        "n_local_crops": _NON_NEGATIVE,
        "local_size": _POSITIVE,
        "global_scale": _range_pair(0.0, open_lo=True),
        "local_scale": _range_pair(0.0, open_lo=True),
    }
    return {**_optim_rules(section), **{f"{section}.{k}": c for k, c in rules.items()}}


RULES: dict[str, Check] = {
    "seed": _NON_NEGATIVE,  # numpy refuses negative seeds
    "synthetic.size": _POSITIVE,
    "synthetic.noise": _NON_NEGATIVE,
    "synthetic.unlabelled_fraction": _FRACTION,
    "data.scene_size": _POSITIVE,
    "data.tile_size": _POSITIVE,
    "data.stride": _POSITIVE,
    "data.shard_tiles": _POSITIVE,
    "pretrain.batch_size": _POSITIVE,
    "pretrain.epochs": _NON_NEGATIVE,
    "pretrain.max_steps": _NON_NEGATIVE,
    "pretrain.ckpt_every": _POSITIVE,  # the trainer takes step % ckpt_every
    "pretrain.log_every": _POSITIVE,
    "pretrain.knn_every": _NON_NEGATIVE,
    "pretrain.knn_k": _POSITIVE,
    "pretrain.knn_tiles": _NON_NEGATIVE,
    "pretrain.loader_threads": _POSITIVE,  # the pretraining loader needs a worker
    "pretrain.checkpoint_blocks": _NON_NEGATIVE,
    "pretrain.device": _DEVICE,
    **_optim_rules("mae"),
    "mae.mask_ratio": _within(0.0, 1.0),
    "mae.crop_scale": _range_pair(0.0, open_lo=True),
    **_dino_rules("dinov2"),
    **_dino_rules("ssvit"),
    "ssvit.spectral_mask_ratio": _FRACTION,
    "finetune.n_blocks": _POSITIVE,  # the upper bound depends on the encoder: checked there
    "finetune.focal_gamma": _NON_NEGATIVE,
    "finetune.lr": _above(0.0),
    "finetune.weight_decay": _NON_NEGATIVE,
    "finetune.batch_size": _POSITIVE,
    "finetune.epochs": _NON_NEGATIVE,
    "finetune.max_steps": _NON_NEGATIVE,
    "finetune.eval_scenes": _NON_NEGATIVE,
    "finetune.eval_stride": _POSITIVE,
    "finetune.eval_blend": _one_of("gaussian", "uniform"),  # hsissl.segment.sliding.BLENDS
    "finetune.segmenter_depth": _NON_NEGATIVE,
    "finetune.segmenter_heads": _POSITIVE,
    "finetune.loader_threads": _NON_NEGATIVE,
    "baseline.batch_size": _POSITIVE,  # the stage needs >= 2 (BatchNorm) and says so
    "baseline.epochs": _NON_NEGATIVE,
    "baseline.max_steps": _NON_NEGATIVE,
    "baseline.lr": _above(0.0),
    "baseline.weight_decay": _NON_NEGATIVE,
    "baseline.aux_weight": _NON_NEGATIVE,
    "baseline.crop_size": _NON_NEGATIVE,
    "pca.components": _POSITIVE,
    "pca.decoder": _one_of("conv", "vit"),  # hsissl.pca.make_decoder
    "pca.decoder_steps": _NON_NEGATIVE,
    "pca.batch_size": _POSITIVE,
    "pca.lr": _above(0.0),
    "report.scenes": _NON_NEGATIVE,
    "real.pretrain_steps": _NON_NEGATIVE,
    "real.tile_stride": _POSITIVE,
    "real.window_stride": _POSITIVE,
    "real.head_steps": _NON_NEGATIVE,
    "real.head_batch": _POSITIVE,
    "convert.split": _one_of("tr", "va", "ts"),  # hsissl.data.ohs.SPLITS
    "convert.resampling": _one_of("", "auto", "linear", "gaussian-srf"),  # data/resample.METHODS
    "convert.max_extrapolated": _NON_NEGATIVE,
}


def violations(cfg: Any, added: dict[str, Check] | None = None) -> Iterator[tuple[str, Any, str]]:
    """(dotted key, value, what is allowed) for every set value outside its key's rule
    (``RULES``, then ``added``: the rules of sections that registered methods added)."""
    for key, (ok, allowed) in {**RULES, **(added or {})}.items():
        value: Any = cfg
        for part in key.split("."):
            value = getattr(value, part)
        if value is not None and not ok(value):  # None: an optional key left unset
            yield key, value, allowed
