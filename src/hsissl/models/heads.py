"""Segmentation heads on frozen ViT features (dissertation section 3.4), created by name.

Every head takes the patch maps of the encoder's last ``n_blocks`` blocks, as returned by
``encoder.get_intermediate_layers(x, n=n_blocks)``: a list of ``n_blocks`` tensors (B, D, h, w),
earliest block first. It returns class logits (B, num_classes, h * patch_size, w * patch_size),
i.e. at input size. Channel 0 is "unlabelled": never a target (losses use ignore_index=0), so
predictions take the argmax over channels 1.. only.

>>> head = create_head("linear", embed_dim=768, n_blocks=4)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from timm.layers import trunc_normal_
from timm.models.vision_transformer import Block
from torch import nn

from hsissl.data.ohs import NUM_CLASSES

DEFAULT_CLASSES = NUM_CLASSES + 1  # 24 land-cover classes + the ignored "unlabelled" channel


def _check_features(feats: Sequence[torch.Tensor], n_blocks: int, embed_dim: int, who: str) -> None:
    if len(feats) != n_blocks:
        raise ValueError(f"{who} expects the patch maps of {n_blocks} blocks, got {len(feats)}")
    for i, f in enumerate(feats):
        if f.ndim != 4 or f.shape[1] != embed_dim or f.shape[2:] != feats[0].shape[2:]:
            raise ValueError(
                f"{who}: feature map {i} has shape {tuple(f.shape)}; expected "
                f"(B, {embed_dim}, h, w) with the same h, w for every block"
            )


def _upsample(logits: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(B, K, h, w) -> (B, K, h * patch_size, w * patch_size), bilinear."""
    h, w = logits.shape[-2:]
    size = (h * patch_size, w * patch_size)
    return (
        logits
        if size == (h, w)
        else F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
    )


class MultiscaleLinearHead(nn.Module):
    """DINOv2's multiscale linear probe: concat the blocks' maps, BatchNorm, 1x1 conv, upsample."""

    def __init__(
        self,
        embed_dim: int,
        n_blocks: int = 4,
        num_classes: int = DEFAULT_CLASSES,
        patch_size: int = 8,
    ) -> None:
        super().__init__()
        self.embed_dim, self.n_blocks, self.patch_size = embed_dim, n_blocks, patch_size
        channels = embed_dim * n_blocks
        self.bn = nn.BatchNorm2d(channels)
        self.classifier = nn.Conv2d(channels, num_classes, kernel_size=1)
        trunc_normal_(self.classifier.weight, std=0.01)
        nn.init.zeros_(self.classifier.bias)

    def forward(self, feats: Sequence[torch.Tensor]) -> torch.Tensor:
        _check_features(feats, self.n_blocks, self.embed_dim, type(self).__name__)
        x = torch.cat(list(feats), dim=1)  # (B, n_blocks * D, h, w)
        return _upsample(self.classifier(self.bn(x)), self.patch_size)  # (B, K, H, W)


def conv_bn_relu(cin: int, cout: int) -> nn.Sequential:
    """3x3 convolution, BatchNorm, ReLU."""
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)
    )


class ConvDecoderHead(nn.Module):
    """UNet-like decoder (UNETR-style skips from one-resolution ViT features).

    The last block's map is the bottleneck at patch resolution (h, w). Each of the
    ``log2(patch_size)`` stages doubles the resolution with a transposed convolution and fuses
    a skip: an earlier block's map (the next-earlier block at each stage, so the earliest block
    feeds the finest resolution, as shallow features do in a UNet), brought to the stage's
    resolution by one transposed convolution; two 3x3 conv-BN-ReLU layers follow. Stages
    without a block left get no skip. A 1x1 convolution gives the logits at input size.
    """

    def __init__(
        self,
        embed_dim: int,
        n_blocks: int = 4,
        num_classes: int = DEFAULT_CLASSES,
        patch_size: int = 8,
        channels: Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        stages = int(round(math.log2(patch_size)))
        if patch_size < 2 or 2**stages != patch_size:
            raise ValueError(f"ConvDecoderHead needs a power-of-two patch_size, got {patch_size}")
        if channels is None:  # halve at each x2 stage, start no wider than the encoder
            start = min(256, embed_dim)  # ViT-B/8: 256, 128, 64
            channels = [max(start >> s, 16) for s in range(stages)]
        if n_blocks < 1 or n_blocks > stages + 1:
            raise ValueError(
                f"ConvDecoderHead with patch_size={patch_size} uses 1..{stages + 1} "
                f"blocks (bottleneck + one skip per x2 stage), got n_blocks={n_blocks}"
            )
        if len(channels) != stages:
            raise ValueError(
                f"ConvDecoderHead needs one channel width per stage ({stages} for "
                f"patch_size={patch_size}), got channels={list(channels)}"
            )
        self.embed_dim, self.n_blocks, self.patch_size = embed_dim, n_blocks, patch_size
        self.bottleneck = conv_bn_relu(embed_dim, channels[0])
        self.up = nn.ModuleList()
        self.skips = nn.ModuleList()
        self.fuse = nn.ModuleList()
        cin = channels[0]
        for s, cout in enumerate(channels, start=1):
            self.up.append(nn.ConvTranspose2d(cin, cout, kernel_size=2, stride=2))
            has_skip = s < n_blocks  # skip s comes from block -1 - s
            if has_skip:  # one deconvolution straight to this stage's resolution (x 2^s)
                self.skips.append(
                    nn.ConvTranspose2d(embed_dim, cout, kernel_size=2**s, stride=2**s)
                )
            self.fuse.append(
                nn.Sequential(
                    conv_bn_relu(cout * (2 if has_skip else 1), cout), conv_bn_relu(cout, cout)
                )
            )
            cin = cout
        self.classifier = nn.Conv2d(cin, num_classes, kernel_size=1)

    def forward(self, feats: Sequence[torch.Tensor]) -> torch.Tensor:
        _check_features(feats, self.n_blocks, self.embed_dim, type(self).__name__)
        x = self.bottleneck(feats[-1])  # (B, C0, h, w)
        for s, (up, fuse) in enumerate(zip(self.up, self.fuse, strict=True), start=1):
            x = up(x)  # (B, C_s, h * 2^s, w * 2^s)
            if s < self.n_blocks:
                x = torch.cat([x, self.skips[s - 1](feats[-1 - s])], dim=1)  # (B, 2 C_s, ...)
            x = fuse(x)
        return self.classifier(x)  # (B, K, H, W)


class SegmenterHead(nn.Module):
    """Segmenter's mask transformer (Strudel et al. 2021) on the concatenated blocks' maps.

    Patch features are projected to ``dim``, learnable class embeddings are appended as extra
    tokens, ``depth`` timm Blocks mix them, and each class mask is the scalar product of the
    L2-normalised patch and class embeddings (LayerNorm over classes), upsampled bilinearly.
    With ``n_blocks=1`` this is Strudel's head on the last block. ``dim`` defaults to the encoder
    width rounded up to a multiple of ``num_heads`` (64 with 12 heads -> 72), so the paper's 12
    heads work on any encoder.
    """

    def __init__(
        self,
        embed_dim: int,
        n_blocks: int = 4,
        num_classes: int = DEFAULT_CLASSES,
        patch_size: int = 8,
        depth: int = 2,
        num_heads: int = 12,
        dim: int | None = None,
        mlp_ratio: float = 4.0,
    ) -> None:
        super().__init__()
        dim = dim or -(-embed_dim // num_heads) * num_heads
        if dim % num_heads:
            raise ValueError(f"SegmenterHead: dim={dim} is not divisible by num_heads={num_heads}")
        self.embed_dim, self.n_blocks, self.patch_size = embed_dim, n_blocks, patch_size
        self.num_classes, self.dim = num_classes, dim
        self.proj_dec = nn.Linear(embed_dim * n_blocks, dim)
        self.cls_emb = nn.Parameter(torch.zeros(1, num_classes, dim))
        self.blocks = nn.ModuleList(
            Block(dim, num_heads, mlp_ratio=mlp_ratio, qkv_bias=True) for _ in range(depth)
        )
        self.decoder_norm = nn.LayerNorm(dim)
        self.proj_patch = nn.Linear(dim, dim, bias=False)
        self.proj_classes = nn.Linear(dim, dim, bias=False)
        self.mask_norm = nn.LayerNorm(num_classes)
        self.apply(self._init_weights)
        trunc_normal_(self.cls_emb, std=0.02)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    def forward(self, feats: Sequence[torch.Tensor]) -> torch.Tensor:
        _check_features(feats, self.n_blocks, self.embed_dim, type(self).__name__)
        b, _, h, w = feats[0].shape
        x = torch.cat(list(feats), dim=1).flatten(2).transpose(1, 2)  # (B, h*w, n_blocks * D)
        x = self.proj_dec(x)  # (B, L, dim)
        x = torch.cat([x, self.cls_emb.expand(b, -1, -1)], dim=1)  # (B, L + K, dim)
        for blk in self.blocks:
            x = blk(x)
        x = self.decoder_norm(x)
        patches = F.normalize(self.proj_patch(x[:, : h * w]), dim=-1)  # (B, L, dim)
        classes = F.normalize(self.proj_classes(x[:, h * w :]), dim=-1)  # (B, K, dim)
        masks = self.mask_norm(patches @ classes.transpose(1, 2))  # (B, L, K)
        masks = masks.transpose(1, 2).reshape(b, self.num_classes, h, w)  # (B, K, h, w)
        return _upsample(masks, self.patch_size)  # (B, K, H, W)


HEADS: dict[str, Callable[..., nn.Module]] = {
    "linear": MultiscaleLinearHead,
    "conv": ConvDecoderHead,
    "segmenter": SegmenterHead,
}


def create_head(
    name: str, embed_dim: int, n_blocks: int = 4, num_classes: int = DEFAULT_CLASSES, **kwargs
) -> nn.Module:
    """The head registered as ``name`` in HEADS (linear | conv | segmenter); ``kwargs`` go to it
    (``patch_size`` for all; ``depth``, ``num_heads``, ``dim`` for segmenter; ``channels`` for
    conv)."""
    try:
        cls = HEADS[name]
    except KeyError:
        raise KeyError(f"unknown head {name!r}; known heads: {sorted(HEADS)}") from None
    return cls(embed_dim=embed_dim, n_blocks=n_blocks, num_classes=num_classes, **kwargs)
