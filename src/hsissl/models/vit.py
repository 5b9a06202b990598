"""Plain ViT backbone for (B, 32, 64, 64) hyperspectral tiles, built on timm's VisionTransformer.

Conventions shared by every backbone in `hsissl.models`:
- tokens are ordered `[cls, reg_1..reg_R, patch_1..patch_L]`; `num_prefix_tokens = 1 + R`;
- the learned position embedding covers `[cls] + patches` only (DINOv2 layout, 1 + 64 = 65
  positions for a 64x64 tile); register tokens get none;
- `forward_features(x) -> (B, N, C)` normalised tokens including the prefix tokens;
- `get_intermediate_layers(x, n=4) -> list of (B, C, h, w)` normalised patch maps;
- `get_last_attention(x) -> (B, heads, N, N)` softmax attention of the last block, recomputed
  from its q/k because fused SDPA does not return weights.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

import torch
from timm.layers import GluMlp, Mlp, resample_abs_pos_embed, trunc_normal_
from timm.models.vision_transformer import Block, VisionTransformer
from torch import nn
from torch.utils.checkpoint import checkpoint

from hsissl.models.patch_embed import MatmulPatchEmbed, SpectralStemPatchEmbed

FFN_LAYERS = ("mlp", "swiglu")


def swiglu_hidden_features(mlp_hidden: int) -> int:
    """DINOv2 "swiglufused" width: 2/3 of the plain-MLP width, rounded up to a multiple of 8."""
    return (int(mlp_hidden * 2 / 3) + 7) // 8 * 8  # 3072 -> 2048


class SwiGLUFFN(GluMlp):
    """timm's SwiGLUPacked (fc1 packs gate and value, silu(x1) * x2) with DINOv2's hidden width.

    `hidden_features` is the plain-MLP width the Block passes (dim * mlp_ratio); the SwiGLU width
    is 2/3 of it rounded up to a multiple of 8 (3072 -> 2048), as dinov2's SwiGLUFFNFused.
    """

    def __init__(self, in_features: int, hidden_features: int, **kwargs) -> None:
        kwargs.pop("act_layer", None)  # SwiGLU fixes SiLU; the Block passes GELU
        hidden = swiglu_hidden_features(hidden_features)
        super().__init__(in_features, 2 * hidden, act_layer=nn.SiLU, gate_last=False, **kwargs)

    def init_weights(self) -> None:
        """Keep the plain trunc-normal(0.02) init of fc1 (DINOv2), not GluMlp's gate init."""


def ffn_layer_for(name: str) -> type[nn.Module]:
    """The timm `mlp_layer` for an FFN name ("mlp" = GELU MLP, "swiglu" = DINOv2 SwiGLU)."""
    if name == "mlp":
        return Mlp
    if name == "swiglu":
        return SwiGLUFFN
    raise ValueError(f"ffn_layer={name!r} is not supported; expected one of {FFN_LAYERS}")


layer_norm = partial(nn.LayerNorm, eps=1e-6)


def block_attention(block: Block, x: torch.Tensor) -> torch.Tensor:
    """Softmax attention weights (B, heads, N, N) of a timm `Block` applied to tokens x (B, N, C)."""
    attn = block.attn
    B, N, _ = x.shape
    qkv = attn.qkv(block.norm1(x)).reshape(B, N, 3, attn.num_heads, attn.head_dim)
    q, k, _ = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, heads, N, head_dim)
    q, k = attn.q_norm(q), attn.k_norm(k)
    return ((q * attn.scale) @ k.transpose(-2, -1)).softmax(dim=-1)


def add_pos_embed(
    patches: torch.Tensor,
    cls_token: torch.Tensor,
    pos_embed: torch.Tensor,
    grid_size: Sequence[int],
    reg_token: torch.Tensor | None,
) -> torch.Tensor:
    """[cls] + patches get `pos_embed` (resampled if the grid differs), then registers go after cls.

    patches: (B, h, w, C) or (B, L, C) on `grid_size`; returns (B, 1 + R + h*w, C).
    """
    if patches.ndim == 4:
        B, h, w, C = patches.shape
        patches = patches.reshape(B, h * w, C)
    else:
        B, _, C = patches.shape
        h, w = grid_size
    pos = resample_abs_pos_embed(
        pos_embed, new_size=(h, w), old_size=grid_size, num_prefix_tokens=1
    )
    x = torch.cat([cls_token.expand(B, -1, -1), patches], dim=1) + pos  # (B, 1 + L, C)
    if reg_token is not None:
        x = torch.cat([x[:, :1], reg_token.expand(B, -1, -1), x[:, 1:]], dim=1)
    return x


class HsiViT(VisionTransformer):
    """timm VisionTransformer without a classifier head, DINOv2-style position embedding.

    Accepts other square crop sizes (e.g. 32x32 DINO local crops): the position embedding is
    resampled bicubically, as in timm's `dynamic_img_size`.
    """

    def __init__(
        self,
        img_size: int = 64,
        patch_size: int = 8,
        in_chans: int = 32,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        reg_tokens: int = 0,
        ffn_layer: str = "mlp",
        init_values: float | None = None,
        drop_rate: float = 0.0,
        pos_drop_rate: float = 0.0,
        proj_drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        spectral_stem: int = 0,
        **kwargs,
    ) -> None:
        # spectral_stem > 0: that many 1D filters over each pixel's spectrum before the patches
        embed = (partial(SpectralStemPatchEmbed, spectral_stem=spectral_stem) if spectral_stem
                 else MatmulPatchEmbed)  # fmt: skip
        super().__init__(
            img_size=img_size,
            patch_size=patch_size,
            in_chans=in_chans,
            num_classes=0,
            global_pool="token",
            embed_dim=embed_dim,
            depth=depth,
            num_heads=num_heads,
            mlp_ratio=mlp_ratio,
            qkv_bias=True,
            init_values=init_values,
            class_token=True,
            reg_tokens=reg_tokens,
            dynamic_img_size=True,
            drop_rate=drop_rate,
            pos_drop_rate=pos_drop_rate,
            proj_drop_rate=proj_drop_rate,
            attn_drop_rate=attn_drop_rate,
            drop_path_rate=drop_path_rate,
            norm_layer=layer_norm,
            mlp_layer=ffn_layer_for(ffn_layer),
            **{"embed_layer": embed, **kwargs},
        )
        self.patch_size = patch_size
        self.checkpoint_blocks = 0  # the first N blocks recompute their activations in backward
        if reg_tokens:  # timm would give registers a position too; DINOv2 does not
            self.pos_embed = nn.Parameter(
                torch.zeros(1, 1 + self.patch_embed.num_patches, embed_dim)
            )
            trunc_normal_(self.pos_embed, std=0.02)

    def _pos_embed(self, x: torch.Tensor) -> torch.Tensor:
        x = add_pos_embed(
            x, self.cls_token, self.pos_embed, self.patch_embed.grid_size, self.reg_token
        )
        return self.pos_drop(x)

    def _apply_mask(self, x: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        raise ValueError(f"{type(self).__name__} has no mask_token; masks are for DINOv2 backbones")

    def prepare_tokens(self, x: torch.Tensor, masks: torch.Tensor | None = None) -> torch.Tensor:
        """Image (B, C_in, H, W) -> token sequence (B, N, C) before the blocks."""
        x = self.patch_embed(x)  # (B, h, w, C)
        if masks is not None:
            x = self._apply_mask(x, masks)
        x = self._pos_embed(x)
        return self.norm_pre(self.patch_drop(x))

    def forward_features(self, x: torch.Tensor, masks: torch.Tensor | None = None) -> torch.Tensor:
        """Normalised tokens (B, N, C), prefix tokens included."""
        x = self.prepare_tokens(x, masks)
        for i, blk in enumerate(self.blocks):
            recompute = self.grad_checkpointing or i < self.checkpoint_blocks
            x = checkpoint(blk, x, use_reentrant=False) if recompute else blk(x)
        return self.norm(x)

    def forward(self, x: torch.Tensor, masks: torch.Tensor | None = None) -> torch.Tensor:
        """Normalised class token (B, C) (there is no classifier head)."""
        return self.forward_head(self.forward_features(x, masks))

    def get_intermediate_layers(
        self,
        x: torch.Tensor,
        n: int | Sequence[int] = 4,
        reshape: bool = True,
        return_prefix_tokens: bool = False,
        norm: bool = True,
        **kwargs,
    ) -> list[torch.Tensor]:
        """Patch tokens of the last `n` blocks (or of block indices `n`), as (B, C, h, w) maps."""
        out = super().get_intermediate_layers(
            x, n, reshape=reshape, return_prefix_tokens=return_prefix_tokens, norm=norm, **kwargs
        )
        return list(out)

    def get_last_attention(self, x: torch.Tensor) -> torch.Tensor:
        """Attention weights (B, heads, N, N) of the last block."""
        x = self.prepare_tokens(x)
        for blk in self.blocks[:-1]:
            x = blk(x)
        return block_attention(self.blocks[-1], x)


def vit_base_patch8_64(**kwargs) -> HsiViT:
    """ViT-B/8 for 64x64x32 tiles: depth 12, 12 heads, dim 768, 64 patches (dissertation Fig. 3.4)."""
    cfg = dict(patch_size=8, img_size=64, in_chans=32, embed_dim=768, depth=12, num_heads=12)
    return HsiViT(**{**cfg, **kwargs})


def vit_tiny_patch8_64(**kwargs) -> HsiViT:
    """Test-sized ViT/8: depth 4, 4 heads, dim 64."""
    cfg = dict(patch_size=8, img_size=64, in_chans=32, embed_dim=64, depth=4, num_heads=4)
    return HsiViT(**{**cfg, **kwargs})
