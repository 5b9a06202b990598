"""A segmentation head on a frozen encoder: build, train, evaluate, save (dissertation runs 1-9).

The encoder comes from its record with the Normalizer it was trained with, checked against the
dataset (:func:`hsissl.data.loaders.bind`), or is a seeded random initialisation
(``random:<factory>``, the control every pretraining must beat) that uses the dataset's
Normalizer. It is frozen: no gradients, eval mode, forward under ``no_grad``. Only the head
trains (AdamW, poly learning-rate schedule, CE or focal loss ignoring label 0, bf16 on CUDA).
Evaluation runs at tile size and on whole scenes by sliding window (what users care about).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch import nn

from hsissl.config import ConfigError, FinetuneConfig
from hsissl.data.loaders import TileBatches, bind
from hsissl.data.normalize import Normalizer, NormalizerMismatch
from hsissl.data.shards import ShardDataset, SplitView
from hsissl.losses.focal import FocalLoss
from hsissl.models import create_model
from hsissl.models.heads import DEFAULT_CLASSES, create_head
from hsissl.pretrain import checkpoint
from hsissl.pretrain.context import StageContext
from hsissl.segment.metrics import ConfusionMatrix
from hsissl.segment.scenes import SHOWN_SCENES, iter_scenes, rgb_composite
from hsissl.segment.sliding import predict_scene
from hsissl.storage import open_storage

RANDOM_PREFIX = "random:"
HEAD_FORMAT = "hsissl-head/1"


# -- encoder ------------------------------------------------------------------------------------
def random_encoder(factory: str, seed: int = 0) -> tuple[nn.Module, dict[str, Any]]:
    """A seeded random initialisation of model ``factory`` (its ``.encoder`` for an MAE) and how
    to rebuild it; the same weights whatever ran before (the global RNG is left untouched)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = create_model(factory)
    attr = "encoder" if isinstance(getattr(model, "encoder", None), nn.Module) else None
    encoder = getattr(model, attr) if attr else model
    return encoder.eval(), {"factory": factory, "kwargs": {}, "attr": attr}


def open_encoder(
    uri: str, dataset: ShardDataset, seed: int = 0
) -> tuple[nn.Module, Normalizer, dict[str, Any]]:
    """(encoder on CPU in eval mode, the Normalizer to use, description) for an encoder URI.

    A record URI loads the encoder with its own Normalizer, which must be the dataset's
    (:func:`hsissl.data.loaders.bind` raises NormalizerMismatch otherwise).
    ``random:<factory>`` is :func:`random_encoder` with the dataset's Normalizer. The
    description holds uri, method, factory and the build recipe (and the seed if random).
    """
    if uri.startswith(RANDOM_PREFIX):
        factory = uri[len(RANDOM_PREFIX) :]
        encoder, build = random_encoder(factory, seed)
        info = {"uri": uri, "method": "random", "factory": factory, "build": build, "seed": seed}
        return encoder, dataset.normalizer, info
    encoder, normalizer, record = checkpoint.load_model(uri)
    try:
        bind(dataset, normalizer)
    except NormalizerMismatch as exc:  # say which checkpoint, too
        raise NormalizerMismatch(f"encoder {uri} does not fit the data: {exc}") from exc
    info = {
        "uri": uri,
        "method": record["method"],
        "factory": record["build"]["factory"],
        "build": record["build"],
        "step": record.get("step"),
    }
    return encoder, normalizer, info


class FrozenEncoder(nn.Module):
    """An encoder that never trains: parameters without gradients, always in eval mode,
    forward under ``no_grad``; returns the patch maps of its last ``n_blocks`` blocks."""

    def __init__(self, encoder: nn.Module, n_blocks: int) -> None:
        super().__init__()
        self.encoder = encoder.eval().requires_grad_(False)
        self.n_blocks = n_blocks

    def train(self, mode: bool = True) -> FrozenEncoder:
        return super().train(False)  # dropout/drop-path stay off even in model.train()

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """(B, C, T, T) normalised -> n_blocks x (B, D, h, w); SS-ViT gives its spatial stream."""
        return list(self.encoder.get_intermediate_layers(x, n=self.n_blocks))


class SegmentationModel(nn.Module):
    """Frozen encoder + trainable head: (B, C, T, T) normalised -> (B, K, T, T) logits."""

    def __init__(self, encoder: nn.Module, head: nn.Module, n_blocks: int) -> None:
        super().__init__()
        self.encoder = FrozenEncoder(encoder, n_blocks)
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x))


def head_spec(
    encoder: nn.Module,
    ft: FinetuneConfig,
    bands: int,
    tile: int,
    num_classes: int = DEFAULT_CLASSES,
) -> dict[str, Any]:
    """How to build the head for ``encoder``: width and patch size are read off one probe."""
    with torch.no_grad():
        feats = encoder.get_intermediate_layers(torch.zeros(1, bands, tile, tile), n=ft.n_blocks)
    if len(feats) != ft.n_blocks:
        raise ConfigError(f"finetune.n_blocks={ft.n_blocks}: the encoder gave {len(feats)} maps")
    embed_dim, grid = feats[-1].shape[1], feats[-1].shape[-1]  # (1, D, h, w)
    kwargs: dict[str, Any] = {"patch_size": tile // grid}
    if ft.head == "segmenter":
        kwargs |= {"depth": ft.segmenter_depth, "num_heads": ft.segmenter_heads}
    return {
        "name": ft.head,
        "embed_dim": int(embed_dim),
        "n_blocks": ft.n_blocks,
        "num_classes": num_classes,
        "kwargs": kwargs,
    }


def build_head(spec: dict[str, Any]) -> nn.Module:
    return create_head(
        spec["name"], spec["embed_dim"], spec["n_blocks"], spec["num_classes"], **spec["kwargs"]
    )


# -- training -----------------------------------------------------------------------------------
def poly_lr(step: int, total: int, base: float, power: float) -> float:
    """``base * (1 - step / total) ** power`` (mmseg's poly schedule without a floor)."""
    return base * (1.0 - min(step, total) / max(total, 1)) ** power


def class_weights(class_pixels: list[int] | np.ndarray) -> torch.Tensor:
    """Inverse-frequency weights (K,) from per-class pixel counts; label 0 and absent classes
    get 0, and the weights average to 1 per labelled training pixel."""
    counts = torch.as_tensor(np.asarray(class_pixels, dtype=np.float64))
    counts[0] = 0.0  # unlabelled: never a target
    present = counts > 0
    if not present.any():
        raise ValueError("class_pixels has no labelled pixel; cannot weight classes")
    weights = torch.zeros_like(counts)
    weights[present] = counts[present].sum() / (present.sum() * counts[present])
    return weights.float()


def make_loss(ft: FinetuneConfig, weights: torch.Tensor | None) -> nn.Module:
    """CE (focal with gamma 0: identical, but 0 instead of NaN on an all-unlabelled batch) or
    focal loss (``hsissl.config_rules.LOSSES``), both ignoring label 0."""
    gamma = ft.focal_gamma if ft.loss == "focal" else 0.0
    return FocalLoss(gamma=gamma, weight=weights, ignore_index=0)


def _param_groups(head: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    decay, plain = [], []
    for name, p in head.named_parameters():
        (plain if p.ndim <= 1 or name.endswith("cls_emb") else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": plain, "weight_decay": 0.0}]


Features = list[torch.Tensor]  # n_blocks x (B, D, h, w)
FEATURE_CACHE_BYTES = 1 << 30  # frozen training features up to this size are computed once


def _streamed(
    model: SegmentationModel,
    normalizer: Normalizer,
    split: SplitView,
    batch: int,
    ctx: StageContext,
    workers: int,
) -> Iterator[tuple[Features, torch.Tensor]]:
    """Endless random batches from the shards, encoded on the fly."""
    loader = TileBatches(split, batch, seed=ctx.seed, workers=workers)
    while True:
        for images, labels in loader:
            x = normalizer(images.to(ctx.device, non_blocking=True))  # (B, C, T, T) float32
            with ctx.autocast():
                feats = model.encoder(x)
            yield feats, labels.to(ctx.device, non_blocking=True).long()  # (B, T, T)


def _cached(
    model: SegmentationModel,
    normalizer: Normalizer,
    split: SplitView,
    batch: int,
    ctx: StageContext,
) -> Iterator[tuple[Features, torch.Tensor]]:
    """Endless random batches of features computed once: the encoder is frozen and there is no
    augmentation, so every epoch would recompute exactly these (small splits: several x faster).
    """
    feats: list[Features] = []
    labels: list[torch.Tensor] = []
    for start in range(0, len(split), batch):
        images, lbl = split.get(np.arange(start, min(start + batch, len(split))))
        with ctx.autocast():
            feats.append(model.encoder(normalizer(torch.from_numpy(images).to(ctx.device))))
        labels.append(torch.from_numpy(lbl).to(ctx.device))
    bank = [torch.cat(level) for level in zip(*feats, strict=True)]  # n_blocks x (N, D, h, w)
    targets = torch.cat(labels)  # (N, T, T) uint8
    rng = np.random.default_rng(ctx.seed)
    while True:
        order = rng.permutation(len(split))
        for start in range(0, len(order) - batch + 1, batch):  # drop_last, as TileBatches
            idx = torch.from_numpy(np.sort(order[start : start + batch])).to(ctx.device)
            yield [level[idx] for level in bank], targets[idx].long()


def train_head(
    model: SegmentationModel,
    normalizer: Normalizer,
    split: SplitView,
    ft: FinetuneConfig,
    ctx: StageContext,
    *,
    loss_fn: nn.Module | None = None,
    cache_bytes: int = FEATURE_CACHE_BYTES,
) -> list[dict[str, float]]:
    """Train ``model.head`` on random batches of ``split``; returns the logged history
    ``[{"step", "loss", "lr"}, ...]`` (every ``ctx.log_every`` steps and the last), each also sent
    to ``ctx.log`` as ``{"loss", "lr"}``.

    ``ft.max_steps`` steps, else ``ft.epochs`` passes over the split. When training sees the split
    more than once and its frozen features take at most ``cache_bytes``, they are computed once
    and batches drawn from them; otherwise tiles stream from the shards, encoded at every step.
    """
    loss_fn = (loss_fn or make_loss(ft, None)).to(ctx.device)
    batch = min(ft.batch_size, len(split))
    total = ft.max_steps or max(1, math.ceil(ft.epochs * (len(split) // batch)))
    with torch.no_grad(), ctx.autocast():  # bytes of one tile's features
        probe = model.encoder(normalizer(torch.from_numpy(split.get([0])[0]).to(ctx.device)))
    tile_bytes = sum(f.numel() * f.element_size() for f in probe)
    # Worth it only beyond one epoch (else each tile is encoded once anyway) and if it fits.
    if total * batch > len(split) and len(split) * tile_bytes <= cache_bytes:
        batches = _cached(model, normalizer, split, batch, ctx)
    else:
        batches = _streamed(model, normalizer, split, batch, ctx, max(1, ft.loader_threads))
    optimizer = torch.optim.AdamW(
        _param_groups(model.head, ft.weight_decay), lr=ft.lr, fused=ctx.rt.cuda
    )
    history: list[dict[str, float]] = []
    model.train()
    for step in range(total):
        lr = poly_lr(step, total, ft.lr, ft.poly_power)
        for group in optimizer.param_groups:
            group["lr"] = lr
        feats, y = next(batches)
        with ctx.autocast():
            logits = model.head(feats)  # (B, K, T, T)
        loss = loss_fn(logits.float(), y)
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"finetune step {step}: loss is {loss.item()} "
                f"(lr {lr:.2e}); lower finetune.lr or check the data"
            )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if (step + 1) % max(1, ctx.log_every) == 0 or step + 1 == total:
            history.append({"step": step + 1, "loss": float(loss.detach()), "lr": lr})
            if ctx.log is not None:
                ctx.log({"loss": history[-1]["loss"], "lr": lr}, step + 1)
    batches.close()  # stops the loader's threads
    return history


# -- evaluation ---------------------------------------------------------------------------------
def predict(logits: torch.Tensor) -> torch.Tensor:
    """(B, K, H, W) logits -> (B, H, W) class ids 1..K-1 (channel 0, unlabelled, never wins)."""
    return logits[:, 1:].argmax(dim=1) + 1


@torch.no_grad()
def evaluate_tiles(
    model: nn.Module,
    normalizer: Normalizer,
    split: SplitView,
    ctx: StageContext,
    batch_size: int = 64,
) -> ConfusionMatrix:
    """Confusion matrix over every tile of ``split``, each predicted on its own."""
    model.eval()
    matrix = ConfusionMatrix(DEFAULT_CLASSES - 1, device=ctx.device)
    for start in range(0, len(split), batch_size):
        images, labels = split.get(np.arange(start, min(start + batch_size, len(split))))
        x = normalizer(torch.from_numpy(images).to(ctx.device))  # (B, C, T, T)
        with ctx.autocast():
            logits = model(x)
        matrix.update(predict(logits), torch.from_numpy(labels).to(ctx.device))
    return matrix


@torch.no_grad()
def evaluate_scenes(
    model: nn.Module,
    normalizer: Normalizer,
    dataset: ShardDataset,
    ft: FinetuneConfig,
    ctx: StageContext,
    keep: int = SHOWN_SCENES,
) -> tuple[ConfusionMatrix, dict[str, np.ndarray]]:
    """Whole scenes of ``ft.eval_split`` (the first ``ft.eval_scenes``, 0: all) predicted by
    sliding window (``ft.eval_stride``, overlaps blended as ``ft.eval_blend`` says, see
    :func:`hsissl.segment.sliding.predict_scene`; ``ft.batch_size`` windows a pass), scored
    together.

    Returns the confusion matrix and, for the first ``keep`` scenes, the arrays of
    predictions.npz: ``scenes`` (S,), ``pred`` / ``label`` (S, H, W) uint8, ``rgb`` (S, H, W, 3)
    uint8 (scenes of other sizes are zero-padded to the largest; label 0 there).
    """
    model.eval()
    tile = int(dataset.manifest["tile_size"])
    matrix = ConfusionMatrix(DEFAULT_CLASSES - 1, device=ctx.device)

    def model_fn(windows: torch.Tensor) -> torch.Tensor:  # (N, C, T, T) -> (N, K, T, T)
        with ctx.autocast():
            return model(windows)

    shown: list[tuple[str, np.ndarray, np.ndarray, np.ndarray]] = []
    for scene in iter_scenes(dataset, ft.eval_split, ft.eval_scenes):
        image = normalizer(torch.from_numpy(scene.image).to(ctx.device))  # (C, H, W) float32
        logits = predict_scene(
            model_fn, image, tile, ft.eval_stride, DEFAULT_CLASSES, ft.batch_size, ft.eval_blend
        )
        pred = predict(logits)[0]  # (H, W)
        matrix.update(pred, torch.from_numpy(scene.label).to(ctx.device))
        if len(shown) < keep:
            pred_np = pred.to(torch.uint8).cpu().numpy()
            shown.append((scene.name, pred_np, scene.label, rgb_composite(scene.image)))
    return matrix, _stack_shown(shown)


def _stack_shown(
    shown: list[tuple[str, np.ndarray, np.ndarray, np.ndarray]],
) -> dict[str, np.ndarray]:
    height = max((s[1].shape[0] for s in shown), default=0)
    width = max((s[1].shape[1] for s in shown), default=0)

    def pad(a: np.ndarray) -> np.ndarray:
        return np.pad(
            a, [(0, height - a.shape[0]), (0, width - a.shape[1])] + [(0, 0)] * (a.ndim - 2)
        )

    return {
        "scenes": np.array([s[0] for s in shown], dtype=str),
        "pred": np.stack([pad(s[1]) for s in shown]) if shown else np.zeros((0, 0, 0), np.uint8),
        "label": np.stack([pad(s[2]) for s in shown]) if shown else np.zeros((0, 0, 0), np.uint8),
        "rgb": np.stack([pad(s[3]) for s in shown]) if shown else np.zeros((0, 0, 0, 3), np.uint8),
    }


# -- saved heads --------------------------------------------------------------------------------
def load_segmentation_model(
    uri: str, map_location: str | torch.device = "cpu"
) -> tuple[SegmentationModel, Normalizer, dict[str, Any]]:
    """(frozen encoder + trained head in eval mode, the Normalizer, the head record) from a
    ``results/<name>/head.pt`` URI; the encoder is rebuilt from the record's encoder URI."""
    parent, _, name = uri.rstrip("/").rpartition("/")
    record = checkpoint.load(open_storage(parent), name, map_location="cpu")
    if record.get("format") != HEAD_FORMAT:
        raise ValueError(f"{uri}: format {record.get('format')!r}, expected {HEAD_FORMAT!r}")
    normalizer = Normalizer.from_dict(record["normalizer"], origin=uri)
    enc = record["encoder"]
    if enc["uri"].startswith(RANDOM_PREFIX):  # rebuilt from its seed; it used the data's stats
        encoder, _ = random_encoder(enc["factory"], enc["seed"])
        enc_normalizer = normalizer
    else:
        encoder, enc_normalizer, _ = checkpoint.load_model(enc["uri"])
    if enc_normalizer != normalizer:
        raise NormalizerMismatch(
            f"{uri}: head trained with Normalizer {normalizer.fingerprint}, "
            f"but encoder {enc['uri']} carries {enc_normalizer.fingerprint}"
        )
    head = build_head(record["head"])
    head.load_state_dict(record.pop("state_dict"))
    model = SegmentationModel(encoder, head, record["head"]["n_blocks"]).to(map_location)
    return model.eval(), normalizer, record
