"""Every check of a config value, run once when a config is loaded (``config.validate``).

A bad value then fails at once with exit code 2 instead of deep inside a stage; stages trust
a loaded config. Conservative: only values that can never work. What only the data can tell
(a split the dataset lacks, a scene file that is missing, a model factory or timm name) is
checked where the data is read, through :func:`refuse`, so every such error reads like a config
error. No imports beyond the standard library: components load configs in light pods.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from typing import Any

Check = tuple[Callable[[Any], bool], str]  # (is the value allowed?, what is allowed)


class ConfigError(ValueError):
    """A preset, override or config value that does not fit the schema or the data."""


class MissingInput(ConfigError, FileNotFoundError):
    """A file, scene or store key a config value names that does not exist."""


def refuse(
    key: str, value: Any, expected: str, where: str = "", missing: bool = False
) -> ConfigError:
    """The one form of a config error: ``<where>: config key <key>=<value>; expected <expected>``.

    ``where`` is the file or "command line" the value came from or the data it was checked
    against; ``missing`` makes it a :class:`MissingInput` (also a FileNotFoundError). Raise it.
    """
    prefix = f"{where}: " if where else ""
    cls = MissingInput if missing else ConfigError
    return cls(f"{prefix}config key {key}={value!r}; expected {expected}")


def check_splits(splits: list[str], where: str, eval_key: str, eval_split: str) -> None:
    """Refuse a dataset (at ``where``) without the training split or ``eval_key``'s split."""
    if "tr" not in splits:  # every stage that trains reads the training tiles
        raise refuse("data.splits", splits, "a list holding the training split 'tr'", where)
    if eval_split not in splits:
        raise refuse(eval_key, eval_split, f"one of the dataset's splits {splits}", where)


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
_NOT_EMPTY: Check = (lambda v: bool(v), "a non-empty name (results go to results/<name>)")
_FOLDER_NAME: Check = (lambda v: bool(v) and "/" not in v, "a non-empty folder name without '/'")
HEADS = ("linear", "conv", "segmenter")  # hsissl.models.heads.HEADS (a test keeps them equal)
# evaluate-real's closed-form per-pixel heads (hsissl.segment.real_eval): logistic regression on
# the frozen features upsampled to pixels, and on the same with the normalised spectrum in front
PIXEL_HEADS = ("probe", "spec-probe")
LOSSES = ("ce", "focal")  # hsissl.segment.finetune.make_loss


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
    "synthetic.size": _at_least(16),  # pixels: room for the generator's regions
    "synthetic.noise": _NON_NEGATIVE,
    "synthetic.unlabelled_fraction": (lambda v: 0.0 <= v < 1.0, "a value in [0.0, 1.0)"),
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
    "finetune.head": _one_of(*HEADS),
    "finetune.loss": _one_of(*LOSSES),
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
    "baseline.name": _NOT_EMPTY,
    # ASPP's image-pooling BatchNorm sees one value per channel otherwise
    "baseline.batch_size": (lambda v: v >= 2, ">= 2 (DeepLabV3+ trains with BatchNorm)"),
    "baseline.epochs": _NON_NEGATIVE,
    "baseline.max_steps": _NON_NEGATIVE,
    "baseline.lr": _above(0.0),
    "baseline.weight_decay": _NON_NEGATIVE,
    "baseline.aux_weight": _NON_NEGATIVE,
    "baseline.crop_size": (lambda v: v == 0 or v >= 32, "0 (whole scenes) or >= 32"),
    "pca.name": _NOT_EMPTY,
    "pca.components": _POSITIVE,  # at most the dataset's bands: checked where it is read
    "pca.decoder": _one_of("conv", "vit"),  # hsissl.pca.make_decoder
    "pca.decoder_steps": _NON_NEGATIVE,
    "pca.batch_size": _POSITIVE,
    "pca.lr": _above(0.0),
    "report.name": _FOLDER_NAME,
    "report.scenes": _NON_NEGATIVE,
    "real.pretrain_steps": _NON_NEGATIVE,
    "real.tile_stride": _POSITIVE,
    "real.window_stride": _POSITIVE,
    "real.head_steps": _NON_NEGATIVE,
    "real.baseline_steps": _NON_NEGATIVE,
    "real.head_batch": _POSITIVE,
    "convert.split": _one_of("tr", "va", "ts"),  # hsissl.data.ohs.SPLITS
    "convert.resampling": _one_of("", "auto", "linear", "gaussian-srf"),  # data/resample.METHODS
    "convert.max_extrapolated": _NON_NEGATIVE,
}


def _together(cfg: Any) -> Iterator[tuple[str, Any, str]]:
    """Keys whose allowed values depend on other keys, and list entries."""
    pc, bc, rc = cfg.pca, cfg.baseline, cfg.real
    scenes = cfg.synthetic.scenes
    if not scenes:
        yield "synthetic.scenes", scenes, "split -> scene count, at least one split"
    for split, count in scenes.items():
        if not split or "/" in split or "\\" in split or split.startswith("."):
            yield "synthetic.scenes", scenes, f"plain folder names as splits, not {split!r}"
        if count < 0:
            yield f"synthetic.scenes.{split}", count, ">= 0"
    if pc.fit_pixels < max(2, pc.components):
        yield "pca.fit_pixels", pc.fit_pixels, f">= {max(2, pc.components)} (2 and pca.components)"
    if bc.max_steps == 0 and bc.epochs <= 0:
        yield "baseline.epochs", bc.epochs, "> 0 when baseline.max_steps is 0"
    methods = _methods(cfg)
    for i, method in enumerate(rc.methods):
        if method not in methods:
            yield f"real.methods[{i}]", method, "one of " + " | ".join(methods)
    for i, head in enumerate(rc.heads):
        if head not in PIXEL_HEADS and head not in HEADS:
            yield f"real.heads[{i}]", head, "one of " + " | ".join((*PIXEL_HEADS, *HEADS))
    for head in rc.heads:
        if head in HEADS and head not in rc.head_lr:
            yield "real.head_lr", rc.head_lr, f"a learning rate for head {head!r} (in real.heads)"


# Keys a stage cannot run without (empty in the defaults, which every stage loads).
REQUIRED: dict[str, dict[str, str]] = {
    "finetune": {
        "finetune.encoder": "an encoder record URI (…/checkpoints/<name>/encoder.pt), a registered "
        "version (models:/<name>/<version> or models:/<name>@<alias>) or random:<model factory>",
    },
}


def _methods(cfg: Any) -> list[str]:
    """The pretraining methods: the config's sections with an optimiser (``OptimConfig``)."""
    return [name for name, section in vars(cfg).items() if hasattr(section, "scaled_lr")]


def _value(cfg: Any, key: str) -> Any:
    for part in key.split("."):
        cfg = getattr(cfg, part)
    return cfg


def violations(cfg: Any, added: dict[str, Check] | None = None) -> Iterator[tuple[str, Any, str]]:
    """(dotted key, value, what is allowed) for every set value outside its key's rule
    (``RULES``, then ``added``: the rules of sections that registered methods added)."""
    for key, (ok, allowed) in {**RULES, **(added or {})}.items():
        value = _value(cfg, key)
        if value is not None and not ok(value):  # None: an optional key left unset
            yield key, value, allowed
    yield from _together(cfg)


def require(cfg: Any, stage: str) -> None:
    """Refuse a config that leaves a key ``stage`` needs empty (:data:`REQUIRED`)."""
    for key, expected in REQUIRED.get(stage, {}).items():
        if not _value(cfg, key):
            raise refuse(key, _value(cfg, key), expected)
