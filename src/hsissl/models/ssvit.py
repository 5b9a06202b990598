"""Spatial-Spectral ViT (dissertation section 3.2, Figures 3.5-3.7) on timm blocks.

Two token streams run side by side through `depth` pairs of timm `Block`s:
- spatial: 8x8 patches of the 32-band tile -> [cls, 4 registers, 64 patches] = 69 tokens;
- spectral: each group of 2 adjacent bands -> one token -> [cls, 4 registers, 16 bands] = 21 tokens.
After every block pair a fusion step concatenates both streams along the token axis (69 + 21 = 90)
and a 1x1 convolution over that axis maps the 90 tokens back to 69 and to 21 (added residually).

Every free choice is set so that one network (backbone + one DINO head) counts exactly the
dissertation's 202,915,984 parameters; docs/models.md gives the arithmetic and the choices.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from timm.layers import trunc_normal_
from timm.models.vision_transformer import Block
from torch import nn
from torch.utils.checkpoint import checkpoint

from hsissl.models.patch_embed import MatmulPatchEmbed
from hsissl.models.vit import add_pos_embed, block_attention, ffn_layer_for, layer_norm


def _size_key(h: int, w: int, sizes: Sequence[int], what: str) -> str:
    if h != w or h not in sizes:
        raise ValueError(
            f"{what}: input crop {h}x{w} is not supported; expected square crops {sizes}"
        )
    return str(h)


class SpectralEmbed(nn.Module):
    """Band-group tokens: each `spectral_patch_size` adjacent bands of an HxW crop -> (embed_dim,).

    The crop is laid out as (B, H*W, bands) and a Conv1d with the H*W pixels as input channels,
    kernel = stride = `spectral_patch_size` projects each band group (2 x 64 x 64 = 8192 values)
    to `embed_dim`: a 1x1 convolution in which every pixel has its own weight (4096 -> 768 per band,
    the "5.3 times" reduction of the dissertation). One projection per supported crop size.
    """

    def __init__(
        self,
        in_chans: int = 32,
        spectral_patch_size: int = 2,
        embed_dim: int = 768,
        crop_sizes: Sequence[int] = (64, 32),
    ) -> None:
        super().__init__()
        if in_chans % spectral_patch_size:
            raise ValueError(
                f"in_chans={in_chans} must be a multiple of spectral_patch_size={spectral_patch_size}"
            )
        self.crop_sizes = tuple(crop_sizes)
        self.in_chans = in_chans
        self.num_patches = in_chans // spectral_patch_size
        self.proj = nn.ModuleDict(
            {
                str(s): nn.Conv1d(s * s, embed_dim, spectral_patch_size, stride=spectral_patch_size)
                for s in self.crop_sizes
            }
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, bands, H, W) -> (B, bands / spectral_patch_size, embed_dim)."""
        B, C, H, W = x.shape
        if C != self.in_chans:
            raise ValueError(f"SpectralEmbed expects {self.in_chans} bands, got {C}")
        key = _size_key(H, W, self.crop_sizes, "SpectralEmbed")
        conv = self.proj[key]  # weight (D, H*W, k): the pixels are its input channels
        k = conv.kernel_size[0]
        # The strided Conv1d as one matrix product (same numbers; cuDNN is slow at this shape):
        # each group of k bands becomes one row of its H*W*k values, in the weight's order.
        x = x.reshape(B, C // k, k, H * W).transpose(2, 3).reshape(B, C // k, H * W * k)
        return F.linear(x, conv.weight.reshape(conv.out_channels, -1), conv.bias)  # (B, groups, D)


class TokenFusion(nn.Module):
    """Concatenate both streams' tokens and map them back with 1x1 convolutions over the tokens."""

    def __init__(self, n_spatial: int, n_spectral: int) -> None:
        super().__init__()
        self.n_spatial, self.n_spectral = n_spatial, n_spectral
        n_all = n_spatial + n_spectral
        self.to_spatial = nn.Conv1d(n_all, n_spatial, kernel_size=1)  # 90 -> 69 tokens
        self.to_spectral = nn.Conv1d(n_all, n_spectral, kernel_size=1)  # 90 -> 21 tokens

    def forward(self, spatial: torch.Tensor, spectral: torch.Tensor) -> tuple[torch.Tensor, ...]:
        x = torch.cat([spatial, spectral], dim=1)  # (B, N_spa + N_spe, C)
        # Both 1x1 convolutions over the token axis as one matrix product with the tokens as
        # rows: same numbers, while cuDNN's k=1 convolutions took ~7 % of an SS-ViT step on an
        # H200 (forward 0.21 ms, backward 0.56 ms per call at batch 512).
        weight = torch.cat([self.to_spatial.weight, self.to_spectral.weight])[..., 0]  # (N, N)
        bias = torch.cat([self.to_spatial.bias, self.to_spectral.bias])  # (N,)
        mixed = torch.matmul(weight, x)  # (B, N, C)
        mixed = mixed + bias.to(mixed.dtype)[:, None]
        to_spatial, to_spectral = mixed.split([self.n_spatial, self.n_spectral], dim=1)
        return spatial + to_spatial, spectral + to_spectral


class SpatialSpectralBlock(nn.Module):
    """One spatial block, one spectral block, then fusion (one fusion per supported crop size)."""

    def __init__(self, dim: int, num_heads: int, fusion_sizes: dict[str, tuple[int, int]], **kw):
        super().__init__()
        self.spatial_block = Block(dim, num_heads, **kw)
        self.spectral_block = Block(dim, num_heads, **kw)
        self.fusion = nn.ModuleDict({k: TokenFusion(*n) for k, n in fusion_sizes.items()})

    def forward(self, spatial: torch.Tensor, spectral: torch.Tensor, crop: str):
        return self.fusion[crop](self.spatial_block(spatial), self.spectral_block(spectral))


class SpatialSpectralViT(nn.Module):
    """Two-stream ViT; `forward_features` returns {"spatial": (B, 69, C), "spectral": (B, 21, C)}."""

    def __init__(
        self,
        img_size: int = 64,
        patch_size: int = 8,
        in_chans: int = 32,
        spectral_patch_size: int = 2,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        reg_tokens: int = 4,
        ffn_layer: str = "mlp",
        init_values: float | None = 1e-5,
        crop_sizes: Sequence[int] = (64, 32),
        proj_drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
    ) -> None:
        super().__init__()
        if img_size not in crop_sizes:
            raise ValueError(f"img_size={img_size} must be one of crop_sizes={tuple(crop_sizes)}")
        self.embed_dim = self.num_features = embed_dim
        self.patch_size = patch_size
        self.spectral_patch_size = spectral_patch_size
        self.crop_sizes = tuple(crop_sizes)
        self.num_reg_tokens = reg_tokens
        self.num_prefix_tokens = 1 + reg_tokens  # same layout in both streams
        self.checkpoint_blocks = 0  # the first N block pairs recompute activations in backward

        self.patch_embed = MatmulPatchEmbed(
            img_size, patch_size, in_chans, embed_dim, strict_img_size=False, output_fmt="NHWC"
        )
        self.spectral_embed = SpectralEmbed(in_chans, spectral_patch_size, embed_dim, crop_sizes)
        n_spectral_patches = self.spectral_embed.num_patches

        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.spectral_cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        # One set of register tokens seeds both streams (the reference shares them).
        self.reg_token = nn.Parameter(torch.zeros(1, reg_tokens, embed_dim)) if reg_tokens else None
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.patch_embed.num_patches, embed_dim))
        self.spectral_pos_embed = nn.Parameter(torch.zeros(1, 1 + n_spectral_patches, embed_dim))
        self.mask_token = nn.Parameter(torch.zeros(1, embed_dim))
        self.spectral_mask_token = nn.Parameter(torch.zeros(1, embed_dim))

        n_spectral = self.num_prefix_tokens + n_spectral_patches
        fusion_sizes = {
            str(s): (self.num_prefix_tokens + (s // patch_size) ** 2, n_spectral)
            for s in crop_sizes
        }
        dpr = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]  # timm's linear rule
        self.blocks = nn.ModuleList(
            SpatialSpectralBlock(
                embed_dim,
                num_heads,
                fusion_sizes,
                mlp_ratio=mlp_ratio,
                qkv_bias=True,
                init_values=init_values,
                proj_drop=proj_drop_rate,
                attn_drop=attn_drop_rate,
                drop_path=dpr[i],
                norm_layer=layer_norm,
                mlp_layer=ffn_layer_for(ffn_layer),
            )
            for i in range(depth)
        )
        self.norm = layer_norm(embed_dim)
        self.spectral_norm = layer_norm(embed_dim)
        self._init_weights()

    def _init_weights(self) -> None:
        """DINOv2/timm init: trunc-normal(0.02) linears and position tables, tiny tokens."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        trunc_normal_(self.pos_embed, std=0.02)
        trunc_normal_(self.spectral_pos_embed, std=0.02)
        for token in (self.cls_token, self.spectral_cls_token, self.reg_token):
            if token is not None:
                nn.init.normal_(token, std=1e-6)

    def _mask(self, x: torch.Tensor, masks: torch.Tensor | None, token: torch.Tensor, what: str):
        """x (B, L, C) embeddings; masks (B, L) bool, True = replace by `token` (iBOT)."""
        if masks is None:
            return x
        if masks.shape != x.shape[:2] or masks.dtype != torch.bool:
            raise ValueError(
                f"{what} must be a bool tensor of shape {tuple(x.shape[:2])}, "
                f"got {masks.dtype} {tuple(masks.shape)}"
            )
        return torch.where(masks.unsqueeze(-1), token.to(x.dtype).unsqueeze(0), x)

    def prepare_tokens(
        self,
        x: torch.Tensor,
        masks: torch.Tensor | None = None,
        spectral_masks: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, str]:
        """Image (B, bands, H, W) -> spatial (B, 69, C), spectral (B, 21, C) tokens, crop key."""
        crop = _size_key(x.shape[-2], x.shape[-1], self.crop_sizes, type(self).__name__)
        patches = self.patch_embed(x)  # (B, h, w, C)
        B, h, w, C = patches.shape
        patches = self._mask(patches.reshape(B, h * w, C), masks, self.mask_token, "masks")
        patches = patches.reshape(B, h, w, C)
        spatial = add_pos_embed(
            patches, self.cls_token, self.pos_embed, self.patch_embed.grid_size, self.reg_token
        )
        bands = self.spectral_embed(x)  # (B, 16, C)
        bands = self._mask(bands, spectral_masks, self.spectral_mask_token, "spectral_masks")
        spectral = add_pos_embed(
            bands,
            self.spectral_cls_token,
            self.spectral_pos_embed,
            (1, bands.shape[1]),
            self.reg_token,
        )
        return spatial, spectral, crop

    def forward_features(
        self,
        x: torch.Tensor,
        masks: torch.Tensor | None = None,
        spectral_masks: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Normalised tokens of both streams, prefix tokens included:
        {"spatial": (B, 1 + R + h*w, C), "spectral": (B, 1 + R + bands/2, C)}."""
        spatial, spectral, crop = self.prepare_tokens(x, masks, spectral_masks)
        for i, blk in enumerate(self.blocks):
            if i < self.checkpoint_blocks:
                spatial, spectral = checkpoint(blk, spatial, spectral, crop, use_reentrant=False)
            else:
                spatial, spectral = blk(spatial, spectral, crop)
        return {"spatial": self.norm(spatial), "spectral": self.spectral_norm(spectral)}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised spatial class token (B, C)."""
        return self.forward_features(x)["spatial"][:, 0]

    def get_intermediate_layers(
        self, x: torch.Tensor, n: int | Sequence[int] = 4, norm: bool = True
    ) -> list[torch.Tensor]:
        """Spatial patch tokens of the last `n` blocks (or of block indices `n`) as (B, C, h, w)."""
        depth = len(self.blocks)
        take = range(depth - n, depth) if isinstance(n, int) else [i % depth for i in n]
        spatial, spectral, crop = self.prepare_tokens(x)
        B, h, w = x.shape[0], x.shape[-2] // self.patch_size, x.shape[-1] // self.patch_size
        out = []
        for i, blk in enumerate(self.blocks):
            spatial, spectral = blk(spatial, spectral, crop)
            if i in take:
                y = self.norm(spatial) if norm else spatial
                y = y[:, self.num_prefix_tokens :]  # (B, h*w, C)
                out.append(y.reshape(B, h, w, -1).permute(0, 3, 1, 2).contiguous())
        return out

    def get_last_attention(self, x: torch.Tensor, stream: str = "spatial") -> torch.Tensor:
        """Last-block attention (B, heads, N, N) of the "spatial" (N=69) or "spectral" (N=21) stream."""
        if stream not in ("spatial", "spectral"):
            raise ValueError(f"stream must be 'spatial' or 'spectral', got {stream!r}")
        spatial, spectral, crop = self.prepare_tokens(x)
        for blk in self.blocks[:-1]:
            spatial, spectral = blk(spatial, spectral, crop)
        last = self.blocks[-1]
        if stream == "spatial":
            return block_attention(last.spatial_block, spatial)
        return block_attention(last.spectral_block, spectral)


def ssvit_base_patch8_64(**kwargs) -> SpatialSpectralViT:
    """Spatial-Spectral ViT-B/8 (dissertation Fig. 3.7); 179,777,424 backbone parameters."""
    return SpatialSpectralViT(**kwargs)


def ssvit_tiny_patch8_64(**kwargs) -> SpatialSpectralViT:
    """Test-sized Spatial-Spectral ViT: dim 64, depth 4, 4 heads."""
    cfg = dict(embed_dim=64, depth=4, num_heads=4)
    return SpatialSpectralViT(**{**cfg, **kwargs})
