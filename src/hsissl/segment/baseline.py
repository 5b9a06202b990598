"""The supervised baseline: DeepLabV3+ with a ResNet-50 V1c encoder, trained from scratch.

The dissertation's run 10 (mmsegmentation's ``deeplabv3plus_r50``): a deep-stem ResNet-50
("V1c": three 3x3 convolutions instead of one 7x7) for 32 input bands, the DeepLabV3+ decoder
(ASPP + low-level skip) and an FCN auxiliary head on the stage-3 features (loss weight 0.4),
trained on whole 512x512 scenes, batch 8. The network comes from segmentation-models-pytorch
with a timm encoder (``tu-resnet50c``); the FCN head is added here (smp's ``aux_params`` is an
image-classification head). Output stride 16 (smp's DeepLabV3+ default).
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import segmentation_models_pytorch as smp
import timm
import torch
import torch.nn.functional as F
from torch import nn

from hsissl.config import ConfigError
from hsissl.data.normalize import Normalizer
from hsissl.data.shards import ShardDataset
from hsissl.losses.focal import FocalLoss
from hsissl.pretrain import checkpoint
from hsissl.pretrain.context import StageContext
from hsissl.segment.finetune import poly_lr, predict
from hsissl.segment.metrics import ConfusionMatrix
from hsissl.segment.scenes import (
    SHOWN_SCENES,
    iter_scenes,
    load_scene,
    rgb_composite,
    scene_size,
)
from hsissl.storage import open_storage

BASELINE_FORMAT = "hsissl-baseline/1"
OUTPUT_STRIDE = 16
NUM_LOGITS = 25  # channel 0 = unlabelled (never a target), 1..24 the WHU-OHS classes


def smp_encoder_name(name: str) -> str:
    """``resnet50c`` or ``tu-resnet50c`` -> ``tu-resnet50c`` (a timm encoder for smp), checked."""
    timm_name = name.removeprefix("tu-")
    if not timm.is_model(timm_name):
        close = timm.list_models(f"*{timm_name[:6]}*")[:12]
        raise ConfigError(f"baseline.encoder={name!r} is not a timm model; similar names: {close}")
    return f"tu-{timm_name}"


class FCNHead(nn.Module):
    """mmseg's FCNHead (num_convs=1): 3x3 conv-BN-ReLU, dropout 0.1, 1x1 conv to class logits."""

    def __init__(self, in_channels: int, num_classes: int, channels: int = 256) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(channels),
            nn.ReLU(inplace=True),
            nn.Dropout2d(0.1),
            nn.Conv2d(channels, num_classes, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


class DeepLabV3PlusAux(nn.Module):
    """DeepLabV3+ (smp) + FCN auxiliary head on the encoder's stage-3 output.

    ``forward(x)`` gives main logits (B, K, H, W) for any H, W (padded to a multiple of the
    output stride and cropped back); ``forward(x, with_aux=True)`` also the auxiliary logits.
    """

    def __init__(self, encoder: str = "resnet50c", in_channels: int = 32,
                 num_classes: int = NUM_LOGITS) -> None:  # fmt: skip
        super().__init__()
        self.build = {"encoder": smp_encoder_name(encoder), "in_channels": in_channels,
                      "num_classes": num_classes}  # fmt: skip
        self.net = smp.DeepLabV3Plus(
            encoder_name=self.build["encoder"], encoder_weights=None, in_channels=in_channels,
            classes=num_classes, encoder_output_stride=OUTPUT_STRIDE,
        )  # fmt: skip
        # features: [input, stem, stage1, stage2, stage3, stage4]; stage 3 = 1024 ch for R50
        self.aux_head = FCNHead(self.net.encoder.out_channels[-2], num_classes)

    def forward(
        self, x: torch.Tensor, with_aux: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        h, w = x.shape[-2:]
        pad_h, pad_w = -h % OUTPUT_STRIDE, -w % OUTPUT_STRIDE
        if pad_h or pad_w:  # replicate: works for any size, unlike reflect
            x = F.pad(x, (0, pad_w, 0, pad_h), mode="replicate")
        features = self.net.encoder(x)
        logits = self.net.segmentation_head(self.net.decoder(features))[..., :h, :w]
        if not with_aux:
            return logits
        aux = F.interpolate(self.aux_head(features[-2]), size=x.shape[-2:], mode="bilinear",
                            align_corners=False)[..., :h, :w]  # fmt: skip
        return logits, aux


# -- training data ------------------------------------------------------------------------------
@dataclass(frozen=True)
class ScenePlan:
    """What one batch element is: scene ``index``, window (y, x, h, w), flips."""

    index: int
    window: tuple[int, int, int, int]
    flip_h: bool
    flip_v: bool


class SceneBatches:
    """An endless, seeded stream of training batches of whole scenes (or random crops).

    Scenes come in consecutive chunks of ``batch_size`` from a stream of per-epoch
    permutations, so every scene is seen once per epoch even when ``batch_size`` does not
    divide the scene count (a short split repeats scenes within a batch). Scenes of unequal
    size in one batch are cropped to the smallest (random windows). Each element is flipped
    horizontally / vertically with probability 0.5. Scenes are read and assembled from the
    shards on ``prefetch`` background threads, as many batches ahead; all randomness is drawn
    on the caller's thread from one ``numpy`` generator, so a seed gives one stream.
    """

    def __init__(self, dataset: ShardDataset, split: str, batch_size: int, crop: int = 0,
                 seed: int = 0, prefetch: int = 2) -> None:  # fmt: skip
        self.dataset, self.split, self.batch_size, self.crop = dataset, split, batch_size, crop
        view = dataset.split(split)
        self.sizes = [scene_size(dataset, view, i) for i in range(len(view.scenes))]
        if not self.sizes:
            raise ValueError(f"{dataset.uri}: split {split!r} has no scenes to train on")
        self.rng = np.random.default_rng(seed)
        self.prefetch = prefetch
        self._order: list[int] = []

    def steps_per_epoch(self) -> int:
        return -(-len(self.sizes) // self.batch_size)

    def _next_indices(self) -> list[int]:
        while len(self._order) < self.batch_size:
            self._order += self.rng.permutation(len(self.sizes)).tolist()
        take, self._order = self._order[: self.batch_size], self._order[self.batch_size :]
        return take

    def plan(self) -> list[ScenePlan]:
        """The next batch's elements (draws from the generator)."""
        indices = self._next_indices()
        h = min(self.sizes[i][0] for i in indices)
        w = min(self.sizes[i][1] for i in indices)
        if self.crop > 0:
            h, w = min(h, self.crop), min(w, self.crop)
        out = []
        for i in indices:
            y = int(self.rng.integers(0, self.sizes[i][0] - h + 1))
            x = int(self.rng.integers(0, self.sizes[i][1] - w + 1))
            flips = self.rng.random(2) < 0.5
            out.append(ScenePlan(i, (y, x, h, w), bool(flips[0]), bool(flips[1])))
        return out

    def load(self, plan: list[ScenePlan]) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, C, h, w) int16 images and (B, h, w) uint8 labels for a planned batch."""
        images, labels = [], []
        for p in plan:
            scene = load_scene(self.dataset, self.split, p.index)
            y, x, h, w = p.window
            img, lbl = scene.image[:, y : y + h, x : x + w], scene.label[y : y + h, x : x + w]
            if p.flip_h:
                img, lbl = img[..., ::-1], lbl[..., ::-1]
            if p.flip_v:
                img, lbl = img[..., ::-1, :], lbl[::-1, :]
            images.append(img)
            labels.append(lbl)
        return torch.from_numpy(np.stack(images)), torch.from_numpy(np.stack(labels))

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        with ThreadPoolExecutor(self.prefetch, thread_name_prefix="scenes") as pool:
            pending: list[Future] = []
            while True:
                while len(pending) <= self.prefetch:
                    pending.append(pool.submit(self.load, self.plan()))
                yield pending.pop(0).result()


# -- training -----------------------------------------------------------------------------------
@dataclass
class TrainSettings:
    steps: int
    lr: float
    poly_power: float
    weight_decay: float
    aux_weight: float


def train(model: DeepLabV3PlusAux, normalizer: Normalizer, batches: SceneBatches,
          settings: TrainSettings, ctx: StageContext) -> list[dict[str, float]]:  # fmt: skip
    """Train the whole network (AdamW, poly LR, CE + aux_weight x auxiliary CE, label 0 ignored).

    Returns the logged history ``[{"step", "loss", "loss_main", "loss_aux", "lr"}, ...]``
    (every ``ctx.log_every`` steps and the last), each also sent to ``ctx.log`` (less "step").
    """
    loss_fn = FocalLoss(gamma=0.0, ignore_index=0)  # = CE, but 0 (not NaN) on unlabelled batches
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.lr,
                                  weight_decay=settings.weight_decay, fused=ctx.rt.cuda)  # fmt: skip
    fmt = torch.channels_last if ctx.rt.cuda else torch.contiguous_format
    model.to(memory_format=fmt).train()
    history: list[dict[str, float]] = []
    stream = iter(batches)
    try:
        for step in range(settings.steps):
            lr = poly_lr(step, settings.steps, settings.lr, settings.poly_power)
            for group in optimizer.param_groups:
                group["lr"] = lr
            images, labels = next(stream)
            x = normalizer(images.to(ctx.device, non_blocking=True)).contiguous(memory_format=fmt)
            y = labels.to(ctx.device, non_blocking=True).long()  # (B, H, W)
            with ctx.autocast():
                logits, aux = model(x, with_aux=True)  # (B, K, H, W) each
            main_loss, aux_loss = loss_fn(logits.float(), y), loss_fn(aux.float(), y)
            loss = main_loss + settings.aux_weight * aux_loss
            if not torch.isfinite(loss):
                raise FloatingPointError(
                    f"baseline step {step}: loss is {loss.item()} "
                    f"(lr {lr:.2e}); lower baseline.lr or check the data"
                )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if (step + 1) % max(1, ctx.log_every) == 0 or step + 1 == settings.steps:
                history.append({"step": step + 1, "loss": float(loss.detach()), "lr": lr,
                                "loss_main": float(main_loss.detach()),
                                "loss_aux": float(aux_loss.detach())})  # fmt: skip
                if ctx.log is not None:
                    ctx.log({k: v for k, v in history[-1].items() if k != "step"}, step + 1)
    finally:
        stream.close()  # stops the prefetching threads
    return history


# -- evaluation ---------------------------------------------------------------------------------
@torch.no_grad()
def evaluate_whole_scenes(model: nn.Module, normalizer: Normalizer, dataset: ShardDataset,
                          split: str, ctx: StageContext, keep: int = SHOWN_SCENES
                          ) -> tuple[ConfusionMatrix, dict[str, np.ndarray]]:  # fmt: skip
    """Every scene of ``split`` predicted in one pass (the model is fully convolutional and was
    trained on whole scenes; no sliding window), scored together.

    Returns the confusion matrix and, for the first ``keep`` scenes, the predictions.npz arrays
    ``scenes`` (S,), ``pred`` / ``label`` (S, H, W) uint8 and ``rgb`` (S, H, W, 3) uint8 (scenes
    of other sizes zero-padded to the largest; label 0 there).
    """
    model.eval()
    matrix = ConfusionMatrix(NUM_LOGITS - 1, device=ctx.device)
    shown: list[tuple[str, np.ndarray, np.ndarray, np.ndarray]] = []
    for scene in iter_scenes(dataset, split):
        x = normalizer(torch.from_numpy(scene.image).to(ctx.device))[None]  # (1, C, H, W)
        with ctx.autocast():
            pred = predict(model(x))[0]  # (H, W) ids 1..24
        matrix.update(pred, torch.from_numpy(scene.label).to(ctx.device))
        if len(shown) < keep:
            pred_np = pred.to(torch.uint8).cpu().numpy()
            shown.append((scene.name, pred_np, scene.label, rgb_composite(scene.image)))
    return matrix, stack_shown(shown)


def stack_shown(shown: list[tuple[str, np.ndarray, np.ndarray, np.ndarray]]
                ) -> dict[str, np.ndarray]:  # fmt: skip
    """(name, pred, label, rgb) per scene -> the predictions.npz arrays, zero-padded to a size."""
    height = max((s[1].shape[0] for s in shown), default=0)
    width = max((s[1].shape[1] for s in shown), default=0)

    def stack(i: int, trailing: tuple[int, ...]) -> np.ndarray:
        if not shown:
            return np.zeros((0, 0, 0, *trailing), np.uint8)
        pads = [[(0, height - s[i].shape[0]), (0, width - s[i].shape[1])] + [(0, 0)] * len(trailing)
                for s in shown]  # fmt: skip
        return np.stack([np.pad(s[i], p) for s, p in zip(shown, pads, strict=True)])

    return {"scenes": np.array([s[0] for s in shown], dtype=str), "pred": stack(1, ()),
            "label": stack(2, ()), "rgb": stack(3, (3,))}  # fmt: skip


# -- saved model --------------------------------------------------------------------------------
def model_record(model: DeepLabV3PlusAux, normalizer: Normalizer, dataset: ShardDataset,
                 config: dict[str, Any], step: int) -> dict[str, Any]:  # fmt: skip
    """What ``model.pt`` holds: how to rebuild the network, its weights and its Normalizer."""
    return {
        "format": BASELINE_FORMAT,
        "build": dict(model.build),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "normalizer": normalizer.to_dict(),
        "dataset": {"uri": dataset.uri, "fingerprint": dataset.normalizer.fingerprint},
        "config": config,
        "step": step,
    }


def load_baseline(uri: str, map_location: str | torch.device = "cpu"
                  ) -> tuple[DeepLabV3PlusAux, Normalizer, dict[str, Any]]:  # fmt: skip
    """(model in eval mode, its Normalizer, the record without weights) from a model.pt URI."""
    parent, _, name = uri.rstrip("/").rpartition("/")
    record = checkpoint.load(open_storage(parent), name, map_location="cpu")
    if record.get("format") != BASELINE_FORMAT:
        raise ValueError(f"{uri}: format {record.get('format')!r}, expected {BASELINE_FORMAT!r}")
    normalizer = Normalizer.from_dict(record["normalizer"], origin=uri)
    model = DeepLabV3PlusAux(**record["build"])
    model.load_state_dict(record.pop("state_dict"))
    return model.to(map_location).eval(), normalizer, record
