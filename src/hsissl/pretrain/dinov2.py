"""DINOv2 pretraining (Oquab et al. 2024): self-distillation with DINO + iBOT + KoLeo losses.

A student (backbone + one DINO head) learns to match an EMA teacher. Per step:

- multi-crop of the normalised batch: 2 global crops (tile size) and ``n_local_crops`` local crops;
- iBOT masks for the student's global crops: a share ``mask_probability`` of the images get a
  block mask with a ratio uniform in ``mask_ratio``; the masked patch embeddings are replaced
  by the backbone's ``mask_token``;
- teacher (no grad, eval mode) on the unmasked global crops -> CLS prototype scores -> targets
  (Sinkhorn-Knopp or EMA centering, temperature warming up linearly), and patch scores at the
  student's masked positions -> iBOT targets;
- loss = dino_weight * DINO(all student crops vs the other global teacher crops)
       + ibot_weight * iBOT(masked student patches) + koleo_weight * sum_crops KoLeo(student CLS).

One DINO head serves both the DINO (CLS) and the iBOT (patch) loss, as the dissertation counts
parameters (dinov2's ``ibot.separate_head: False``). The teacher follows the student by EMA with a
momentum rising from ``momentum_teacher`` to 1 on a cosine schedule (:meth:`after_step`).

All state (student, teacher, centering buffers) lives in this module, and randomness comes from
torch's global CPU generator, so the trainer's checkpoints resume exactly.
"""

from __future__ import annotations

import copy
import math
from typing import Any, ClassVar

import torch
from torch import nn

from hsissl.config import Config, ConfigError, DINOv2Config
from hsissl.data.augment import MultiCrop
from hsissl.data.loaders import to_device
from hsissl.losses import DINOLoss, IBOTPatchLoss, KoLeoLoss
from hsissl.models import MODELS, create_model, dino_head
from hsissl.pretrain.recipe import Recipe

Masks = dict[str, torch.Tensor]  # stream name -> (n, L) bool on the CPU, True = masked


# -- schedules --------------------------------------------------------------------------------
def teacher_temperature(step: int, total: int, dc: DINOv2Config) -> float:
    """Linear warm-up from ``teacher_temp_warmup`` to ``teacher_temp`` over
    ``teacher_temp_warmup_fraction`` of ``total`` steps, then constant."""
    warmup = int(dc.teacher_temp_warmup_fraction * total)
    if step >= warmup:
        return dc.teacher_temp
    return dc.teacher_temp_warmup + (dc.teacher_temp - dc.teacher_temp_warmup) * step / warmup


def teacher_momentum(step: int, total: int, base: float) -> float:
    """EMA momentum on a cosine schedule from ``base`` (step 0) to 1.0 (step ``total``)."""
    progress = min(max(step / max(total, 1), 0.0), 1.0)
    return 1.0 - (1.0 - base) * (math.cos(math.pi * progress) + 1.0) / 2.0


# -- masks ------------------------------------------------------------------------------------
def mask_counts(
    n: int, length: int, ratio: tuple[float, float], probability: float
) -> torch.Tensor:
    """(n,) masked-token counts: ``int(n * probability)`` random images get a ratio in ``ratio``
    (stratified uniform, as dinov2's collate), the others 0. Counts are kept inside
    ``[ceil(lo * length), floor(hi * length)]`` so every masked image's ratio lies in the range
    (if no whole count fits, e.g. ``lo == hi``, the nearest: ``round(lo * length)``)."""
    lo, hi = ratio
    n_masked = int(n * probability)
    counts = torch.zeros(n, dtype=torch.long)
    if n_masked == 0:
        return counts
    edges = torch.linspace(lo, hi, n_masked + 1)
    ratios = edges[:-1] + (edges[1:] - edges[:-1]) * torch.rand(n_masked)
    low, high = math.ceil(lo * length - 1e-9), math.floor(hi * length + 1e-9)
    if low > high:  # no whole count fits the range (e.g. lo == hi): take the nearest one
        low = high = round((lo + hi) / 2 * length)
    drawn = torch.round(ratios * length).long().clamp(low, high)
    counts[torch.randperm(n)[:n_masked]] = drawn
    return counts


def random_masks(
    counts: torch.Tensor, length: int, start: torch.Tensor | None = None
) -> torch.Tensor:
    """(n, length) bool with exactly ``counts[i]`` True per row: ``start`` (n, length) plus random
    extra positions where it is False (``counts`` must not be below what ``start`` holds)."""
    n = len(counts)
    start = torch.zeros(n, length, dtype=torch.bool) if start is None else start.reshape(n, length)
    missing = counts - start.sum(dim=1)  # (n,)
    noise = torch.rand(n, length).masked_fill(start, 2.0)  # already-masked positions sort last
    rank = torch.empty(n, length, dtype=torch.long)
    rank.scatter_(1, noise.argsort(dim=1), torch.arange(length).expand(n, length))
    return start | (rank < missing[:, None])


def block_masks(counts: torch.Tensor, h: int, w: int, rounds: int = 8, min_block: int = 4,
                max_aspect: float = 3.0) -> torch.Tensor:  # fmt: skip
    """(n, h*w) bool iBOT block masks with exactly ``counts[i]`` masked patches per image.

    Vectorised form of dinov2's ``MaskingGenerator``: ``rounds`` times, every image proposes a
    rectangle (area in [min_block, still missing], log-uniform aspect in [1/max_aspect,
    max_aspect]) that is kept only if it does not overshoot the count; the rest is topped up with
    random patches so the count is exact.
    """
    n = len(counts)
    rows = torch.arange(h).view(1, h, 1)
    cols = torch.arange(w).view(1, 1, w)
    masks = torch.zeros(n, h, w, dtype=torch.bool)
    log_aspect = math.log(max_aspect)
    for _ in range(rounds):
        missing = (counts - masks.sum(dim=(1, 2))).float()  # (n,)
        area = min_block + torch.rand(n) * (missing - min_block).clamp(min=0)
        aspect = torch.exp((torch.rand(n) * 2 - 1) * log_aspect)
        bh = torch.sqrt(area * aspect).round().clamp(1, h).long()  # (n,)
        bw = torch.sqrt(area / aspect).round().clamp(1, w).long()
        top = (torch.rand(n) * (h - bh + 1)).floor().long()
        left = (torch.rand(n) * (w - bw + 1)).floor().long()
        block = ((rows >= top.view(n, 1, 1)) & (rows < (top + bh).view(n, 1, 1))
                 & (cols >= left.view(n, 1, 1)) & (cols < (left + bw).view(n, 1, 1)))  # fmt: skip
        grown = masks | block  # (n, h, w)
        fits = grown.sum(dim=(1, 2)) <= counts
        masks = torch.where(fits.view(n, 1, 1), grown, masks)
    return random_masks(counts, h * w, masks.view(n, h * w))


# -- recipe -----------------------------------------------------------------------------------
class DINOv2Recipe(Recipe):
    """DINOv2 student/teacher on a DINOv2 ViT (``cfg.dinov2``). See the module docstring.

    ``encoder()`` is the TEACHER backbone: dinov2 evaluates (and releases) the EMA teacher,
    which is smoother and better than the student.
    """

    method = "dinov2"
    # (stream key in the backbone's token dict, loss-weight attribute of the config or None,
    # suffix of the logged names). DINOv2 has one stream; SS-ViT adds the spectral one.
    streams: ClassVar[tuple[tuple[str, str | None, str], ...]] = (("spatial", None, ""),)

    def __init__(self, cfg: Config):
        super().__init__(cfg)
        dc: DINOv2Config = getattr(cfg, self.method)
        self.dc = dc
        default = self.default_model()
        self.factory = dc.model or default
        if self.factory not in MODELS:
            kind = default.split("_")[0] + "_"  # "dinov2_", "ssvit_"
            known = [name for name in MODELS if name.startswith(kind)]
            raise ConfigError(f"{self.method}.model={self.factory!r} is not a model factory; "
                              f"expected one of {known}")  # fmt: skip
        self.kwargs: dict[str, Any] = {}  # architecture kwargs: what build() records
        drop = {"proj_drop_rate": dc.drop_rate} if dc.drop_rate > 0 else {}  # student-only
        backbone = create_model(self.factory, **self.kwargs, **drop)
        head = dino_head(backbone.embed_dim, dc.out_dim, dc.head_hidden, dc.head_bottleneck)
        self.student = nn.ModuleDict({"backbone": backbone, "head": head})
        self.teacher = copy.deepcopy(self.student)
        self.teacher.requires_grad_(False)
        self.teacher.eval()

        tile = cfg.data.tile_size
        patch = backbone.patch_size
        if tile % patch:
            raise ValueError(f"data.tile_size={tile} is not a multiple of the patch size {patch}")
        self.grid = (tile // patch, tile // patch)  # patch grid of a global crop
        self.multicrop = MultiCrop(
            global_size=tile, local_size=dc.local_size, n_local=dc.n_local_crops,
            global_scale=tuple(dc.global_scale), local_scale=tuple(dc.local_scale),
        )  # fmt: skip
        names = [name for name, _, _ in self.streams]
        loss_kw = dict(student_temp=dc.student_temp, centering=dc.centering)
        self.dino_loss = nn.ModuleDict({s: DINOLoss(dc.out_dim, **loss_kw) for s in names})
        self.ibot_loss = nn.ModuleDict({s: IBOTPatchLoss(dc.out_dim, **loss_kw) for s in names})
        self.koleo_loss = KoLeoLoss()

    # -- schedules and EMA ----------------------------------------------------------------
    def teacher_temp(self, step: int, total: int) -> float:
        return teacher_temperature(step, total, self.dc)

    def momentum(self, step: int, total: int) -> float:
        return teacher_momentum(step, total, self.dc.momentum_teacher)

    def train(self, mode: bool = True) -> DINOv2Recipe:
        """Train/eval the student; the teacher always stays in eval mode (no dropout/drop-path)."""
        super().train(mode)
        self.teacher.eval()
        return self

    def compile_networks(self, **options: Any) -> None:
        """torch.compile the student and teacher backbones and heads, each on its own.

        The step around them (multi-crop, CPU-drawn masks, data-dependent masked-token counts,
        losses) stays eager: compiled whole, the recipe graph-breaks there. Backbones get static
        shapes (global and local crops each get their graph), heads a dynamic row count (the
        number of masked tokens changes every step). ``options`` go to ``torch.compile``.
        """
        for net in (self.student, self.teacher):
            backbone = net["backbone"]
            # The recipe calls forward_features (not forward): compile that bound method.
            backbone.forward_features = torch.compile(
                backbone.forward_features, **{"dynamic": False, **options}
            )
            net["head"].compile(**{"dynamic": True, **options})

    def compile_loss_kernels(self, **options: Any) -> None:
        """Fused Sinkhorn-Knopp and cross-entropy passes over the (N, K) prototype scores."""
        for loss in (*self.dino_loss.values(), *self.ibot_loss.values()):
            loss.compile_kernels(**options)

    @torch.no_grad()
    def after_step(self, step: int, total: int) -> dict[str, float]:
        """EMA: teacher <- m * teacher + (1 - m) * student, m at the step just taken."""
        m = self.momentum(step, total)
        teacher = list(self.teacher.parameters())
        student = list(self.student.parameters())
        torch._foreach_mul_(teacher, m)
        torch._foreach_add_(teacher, student, alpha=1.0 - m)
        return {"momentum": m}

    # -- masks and features ---------------------------------------------------------------
    def draw_masks(self, n: int) -> Masks:
        """Student masks for ``n`` global-crop images, per stream, on the CPU."""
        dc = self.dc
        h, w = self.grid
        counts = mask_counts(n, h * w, tuple(dc.mask_ratio), dc.mask_probability)
        return {"spatial": block_masks(counts, h, w)}

    def features(self, backbone: nn.Module, x: torch.Tensor, masks: Masks | None = None
                 ) -> dict[str, torch.Tensor]:  # fmt: skip
        """Final-norm tokens per stream: {"spatial": (B, N, C)}."""
        spatial = None if masks is None else masks["spatial"]
        return {"spatial": backbone.forward_features(x, masks=spatial)}

    # -- step -----------------------------------------------------------------------------
    def forward(
        self, images: torch.Tensor, step: int, total: int
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor | float]]:
        globals_, locals_ = self.multicrop(images)
        x_global = torch.cat(globals_)  # (2B, C, G, G): both global crops in one pass
        masks = self.draw_masks(len(x_global))
        device_masks = {k: to_device(m, x_global.device) for k, m in masks.items()}
        temp = self.teacher_temp(step, total)
        with torch.no_grad():
            teacher = self.features(self.teacher["backbone"], x_global)
        student_global = self.features(self.student["backbone"], x_global, device_masks)
        student_local = (self.features(self.student["backbone"], torch.cat(locals_))
                         if locals_ else {})  # fmt: skip
        loss = x_global.new_zeros((), dtype=torch.float32)
        logs: dict[str, torch.Tensor] = {}
        for name, weight_key, suffix in self.streams:
            stream_loss, stream_logs = self.stream_losses(
                name, student_global[name], student_local.get(name), teacher[name],
                masks.get(name), device_masks.get(name), temp, len(globals_),
            )  # fmt: skip
            weight = 1.0 if weight_key is None else getattr(self.dc, weight_key)
            loss = loss + weight * stream_loss
            logs |= {f"{key}{suffix}": value for key, value in stream_logs.items()}
        return loss, host_free_logs(logs) | {"teacher_temp": temp}

    def stream_losses(self, name: str, s_global: torch.Tensor, s_local: torch.Tensor | None,
                      t_global: torch.Tensor, masks: torch.Tensor | None,
                      device_masks: torch.Tensor | None, temp: float, n_global: int
                      ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:  # fmt: skip
        """DINO + iBOT + KoLeo of one token stream, and its collapse monitors.

        s_global (2B, N, C) student tokens of the (masked) global crops; s_local (nB, N', C) or
        None; t_global (2B, N, C) teacher tokens of the unmasked global crops; masks (2B, L) CPU
        bool over the L patch tokens, device_masks the same on the data's device.
        """
        dc, prefix = self.dc, self.student["backbone"].num_prefix_tokens
        s_cls = s_global[:, 0]  # (2B, C)
        n_masked = 0 if masks is None else int(masks.sum())
        flat = None  # flat (2B * L) indices of the masked tokens, from the CPU masks: no sync
        if n_masked:
            flat = to_device(masks.flatten().nonzero().squeeze(1), s_global.device)
        # One head pass over every student token that needs prototype scores.
        parts = [s_cls] + ([s_local[:, 0]] if s_local is not None else [])
        parts += [_tokens_at(s_global, prefix, flat)] if n_masked else []
        s_logits = self.student["head"](torch.cat(parts)).split([len(p) for p in parts])
        with torch.no_grad():
            t_parts = [t_global[:, 0]] + ([_tokens_at(t_global, prefix, flat)] if n_masked else [])
            t_logits = self.teacher["head"](torch.cat(t_parts)).split([len(p) for p in t_parts])
            t_cls = self.dino_loss[name].teacher_probs(list(t_logits[0].chunk(n_global)), temp)
            t_patch = self.ibot_loss[name].teacher_probs(t_logits[1], temp) if n_masked else None

        zero = s_global.new_zeros((), dtype=torch.float32)
        crops = list(s_logits[0].chunk(n_global))
        crops += list(s_logits[1].chunk(dc.n_local_crops)) if s_local is not None else []
        dino = self.dino_loss[name](crops, t_cls)
        ibot = self.ibot_loss[name](s_logits[-1], t_patch, device_masks) if n_masked else zero
        koleo = zero
        if dc.koleo_weight:  # dinov2: KoLeo on each global crop's backbone CLS, summed
            koleo = sum((self.koleo_loss(c) for c in s_cls.chunk(n_global)), zero)
        loss = dc.dino_weight * dino + dc.ibot_weight * ibot + dc.koleo_weight * koleo
        n_patches = s_global.shape[0] * (s_global.shape[1] - prefix)
        logs = {"loss_dino": dino, "loss_ibot": ibot, "loss_koleo": koleo,
                **_collapse_monitors(torch.cat(t_cls), s_cls),
                "mask_ratio": zero + n_masked / n_patches}  # fmt: skip
        return loss, logs

    # -- what later stages use ------------------------------------------------------------
    def encoder(self) -> nn.Module:
        """The EMA teacher backbone (what dinov2 evaluates and releases)."""
        return self.teacher["backbone"]

    def build(self) -> dict[str, Any]:
        return {"factory": self.factory, "kwargs": self.kwargs, "attr": None}


def host_free_logs(logs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor | float]:
    """Logs as the trainer takes them: floats when they live on the CPU (reading them is free),
    else detached device tensors that the trainer reads only when it logs (reading them here
    would make the host wait for the GPU at every step)."""
    values = [v.detach() for v in logs.values()]
    if all(v.device.type == "cpu" for v in values):
        return dict(zip(logs, torch.stack([v.float() for v in values]).tolist(), strict=True))
    return dict(zip(logs, values, strict=True))


def _tokens_at(tokens: torch.Tensor, prefix: int, flat: torch.Tensor) -> torch.Tensor:
    """Patch tokens (B, prefix + L, C) at flat (B * L) indices -> (M, C), in ``tokens[masks]`` order."""
    return tokens[:, prefix:].flatten(0, 1).index_select(0, flat)


@torch.no_grad()
def _collapse_monitors(
    teacher_probs: torch.Tensor, student_cls: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Teacher entropy: mean entropy of the (N, K) teacher CLS targets (0 = one-hot collapse,
    log K = uniform: a teacher that has learnt nothing), also as a share of log K (what the
    report plots, comparable across K). Feature std: std over the batch of the L2-normalised
    (N, C) student CLS features, averaged over dims (0 = all images alike; about 1/sqrt(C)
    when spread out)."""
    entropy = -(teacher_probs * teacher_probs.clamp_min(1e-12).log()).sum(dim=-1).mean()
    unit = nn.functional.normalize(student_cls.float(), dim=-1)
    return {"teacher_entropy": entropy,
            "teacher_entropy_rel": entropy / math.log(teacher_probs.shape[-1]),
            "feature_std": unit.std(dim=0).mean()}  # fmt: skip
