"""Masked autoencoder (He et al. 2022, facebookresearch/mae `models_mae.py`) for 32-band tiles.

Encoder: ViT-B/8 (an `HsiViT`, no head) with fixed 2D sin-cos position embeddings; 75 % of the
patches are dropped per sample. Decoder: 8 blocks, dim 512, 16 heads, predicting the 8*8*32 pixel
values of every patch. The loss is the MSE on masked patches only. ``drop_rate``: dropout after
every attention and MLP projection of encoder and decoder (the dissertation's 0.1; the
reference MAE has none). Base size: 113,378,560
parameters (the fixed position embeddings count: they are Parameters with requires_grad=False,
as in the reference).
"""

from __future__ import annotations

import torch
from timm.models.vision_transformer import Block
from torch import nn

from hsissl.models.vit import HsiViT, layer_norm


def sincos_pos_embed_2d(embed_dim: int, grid_size: int, cls_token: bool = True) -> torch.Tensor:
    """MAE's fixed 2D sin-cos table (1 + grid_size**2, embed_dim); the cls row is zeros.

    Half of the channels encode the column (w) index, half the row (h) index, as in the reference.
    """
    if embed_dim % 4:
        raise ValueError(f"sin-cos position embedding needs embed_dim % 4 == 0, got {embed_dim}")
    omega = 1.0 / 10000 ** (torch.arange(embed_dim // 4, dtype=torch.float64) / (embed_dim / 4))
    coords = torch.arange(grid_size, dtype=torch.float64)
    grid_h, grid_w = torch.meshgrid(coords, coords, indexing="ij")

    def embed_1d(pos: torch.Tensor) -> torch.Tensor:
        out = pos.reshape(-1, 1) * omega.reshape(1, -1)  # (L, D/4)
        return torch.cat([out.sin(), out.cos()], dim=1)  # (L, D/2)

    table = torch.cat([embed_1d(grid_w), embed_1d(grid_h)], dim=1)  # (L, D)
    if cls_token:
        table = torch.cat([torch.zeros(1, embed_dim, dtype=table.dtype), table], dim=0)
    return table.float()


def random_masking(
    x: torch.Tensor, mask_ratio: float, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Keep a random `1 - mask_ratio` share of the tokens of each sample (argsort of uniform noise).

    x: (B, L, C). Returns x_kept (B, L_keep, C), mask (B, L) with 1 = masked (in the original
    order), and ids_restore (B, L) such that gathering [x_kept, mask tokens] with it restores order.
    """
    B, L, C = x.shape
    len_keep = int(L * (1 - mask_ratio))
    noise = torch.rand(B, L, device=x.device, generator=generator)  # (B, L)
    ids_shuffle = torch.argsort(noise, dim=1)  # ascending: small noise is kept
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    ids_keep = ids_shuffle[:, :len_keep]
    x_kept = torch.gather(x, 1, ids_keep.unsqueeze(-1).expand(-1, -1, C))
    mask = torch.ones(B, L, device=x.device, dtype=x.dtype)
    mask[:, :len_keep] = 0
    mask = torch.gather(mask, 1, ids_restore)
    return x_kept, mask, ids_restore


class MaskedAutoencoderViT(nn.Module):
    """MAE with an `HsiViT` encoder (`self.encoder`, reusable as a backbone) and a light decoder."""

    def __init__(
        self,
        img_size: int = 64,
        patch_size: int = 8,
        in_chans: int = 32,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        decoder_embed_dim: int = 512,
        decoder_depth: int = 8,
        decoder_num_heads: int = 16,
        mlp_ratio: float = 4.0,
        norm_pix_loss: bool = False,
        drop_rate: float = 0.0,
        spectral_stem: int = 0,  # 1D filters over each pixel's spectrum before the patches (HsiViT)
    ) -> None:
        super().__init__()
        self.in_chans = in_chans
        self.patch_size = patch_size
        self.embed_dim = embed_dim
        self.norm_pix_loss = norm_pix_loss
        self.encoder = HsiViT(
            img_size=img_size,
            patch_size=patch_size,
            in_chans=in_chans,
            embed_dim=embed_dim,
            depth=depth,
            num_heads=num_heads,
            mlp_ratio=mlp_ratio,
            proj_drop_rate=drop_rate,  # after attention and MLP projections (the paper's 0.1)
            spectral_stem=spectral_stem,
        )
        self.num_prefix_tokens = self.encoder.num_prefix_tokens
        self.grid_size = img_size // patch_size
        num_patches = self.grid_size**2

        self.decoder_embed = nn.Linear(embed_dim, decoder_embed_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
        self.decoder_pos_embed = nn.Parameter(
            torch.zeros(1, num_patches + 1, decoder_embed_dim), requires_grad=False
        )
        self.decoder_blocks = nn.ModuleList(
            Block(
                decoder_embed_dim,
                decoder_num_heads,
                mlp_ratio,
                qkv_bias=True,
                proj_drop=drop_rate,
                norm_layer=layer_norm,
            )
            for _ in range(decoder_depth)
        )
        self.decoder_norm = layer_norm(decoder_embed_dim)
        self.decoder_pred = nn.Linear(decoder_embed_dim, patch_size**2 * in_chans)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """Reference init: fixed sin-cos tables, xavier-uniform linears, N(0, 0.02) tokens."""
        enc = self.encoder
        enc.pos_embed.requires_grad_(False)  # fixed, but still a Parameter as in the reference
        with torch.no_grad():
            enc.pos_embed.copy_(sincos_pos_embed_2d(self.embed_dim, self.grid_size).unsqueeze(0))
            dec_table = sincos_pos_embed_2d(self.decoder_pos_embed.shape[-1], self.grid_size)
            self.decoder_pos_embed.copy_(dec_table.unsqueeze(0))
        w = enc.patch_embed.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.normal_(enc.cls_token, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def patchify(self, imgs: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, L, p*p*C), each patch flattened in (row, col, channel) order."""
        p = self.patch_size
        B, C, H, W = imgs.shape
        if C != self.in_chans or H % p or W % p:
            raise ValueError(
                f"patchify expects (B, {self.in_chans}, H, W) with H, W multiples of {p}, "
                f"got {tuple(imgs.shape)}"
            )
        x = imgs.reshape(B, C, H // p, p, W // p, p)
        x = torch.einsum("nchpwq->nhwpqc", x)
        return x.reshape(B, (H // p) * (W // p), p * p * C)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """(B, L, p*p*C) -> (B, C, H, W) for a square grid; inverse of `patchify`."""
        p, C = self.patch_size, self.in_chans
        B, L, _ = x.shape
        h = int(L**0.5)
        if h * h != L or x.shape[-1] != p * p * C:
            raise ValueError(f"unpatchify expects (B, square L, {p * p * C}), got {tuple(x.shape)}")
        x = x.reshape(B, h, h, p, p, C)
        x = torch.einsum("nhwpqc->nchpwq", x)
        return x.reshape(B, C, h * p, h * p)

    def forward_encoder(
        self, imgs: torch.Tensor, mask_ratio: float
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Embed, drop `mask_ratio` of the patches, encode the rest; returns (latent, mask, ids)."""
        enc = self.encoder
        x = enc.patch_embed(imgs).flatten(1, 2)  # (B, L, C)
        x = x + enc.pos_embed[:, 1:]
        x, mask, ids_restore = random_masking(x, mask_ratio)  # (B, L_keep, C)
        cls = (enc.cls_token + enc.pos_embed[:, :1]).expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1)
        x = enc.blocks(x)
        return enc.norm(x), mask, ids_restore

    def forward_decoder(self, x: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        """Latent (B, 1 + L_keep, C) -> pixel predictions (B, L, p*p*C) for every patch."""
        x = self.decoder_embed(x)  # (B, 1 + L_keep, D)
        B, n_vis, D = x.shape
        L = ids_restore.shape[1]
        mask_tokens = self.mask_token.expand(B, L + 1 - n_vis, -1)
        x_ = torch.cat([x[:, 1:], mask_tokens], dim=1)  # (B, L, D), shuffled order
        x_ = torch.gather(x_, 1, ids_restore.unsqueeze(-1).expand(-1, -1, D))  # original order
        x = torch.cat([x[:, :1], x_], dim=1) + self.decoder_pos_embed
        for blk in self.decoder_blocks:
            x = blk(x)
        return self.decoder_pred(self.decoder_norm(x))[:, 1:]

    def forward_loss(
        self, imgs: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        """Mean squared error over the masked patches only (mask: (B, L), 1 = masked)."""
        target = self.patchify(imgs)
        if self.norm_pix_loss:
            mean = target.mean(dim=-1, keepdim=True)
            var = target.var(dim=-1, keepdim=True)
            target = (target - mean) / (var + 1e-6) ** 0.5
        loss = ((pred - target) ** 2).mean(dim=-1)  # (B, L) per-patch loss
        return (loss * mask).sum() / mask.sum()

    def forward(
        self, imgs: torch.Tensor, mask_ratio: float = 0.75
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns (loss, pred (B, L, p*p*C), mask (B, L) with 1 = masked)."""
        latent, mask, ids_restore = self.forward_encoder(imgs, mask_ratio)
        pred = self.forward_decoder(latent, ids_restore)
        return self.forward_loss(imgs, pred, mask), pred, mask

    # Backbone API (no masking), delegated to the encoder.
    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Encoder tokens (B, 1 + L, C) of the full, unmasked image."""
        return self.encoder.forward_features(x)

    def get_intermediate_layers(self, x: torch.Tensor, n: int = 4, **kwargs) -> list[torch.Tensor]:
        """Encoder patch maps (B, C, h, w) of the last `n` blocks."""
        return self.encoder.get_intermediate_layers(x, n, **kwargs)

    def get_last_attention(self, x: torch.Tensor) -> torch.Tensor:
        """Encoder last-block attention (B, heads, N, N)."""
        return self.encoder.get_last_attention(x)


def mae_vit_base_patch8_64(**kwargs) -> MaskedAutoencoderViT:
    """MAE ViT-B/8 encoder + 8x512 decoder for 64x64x32 tiles (113,378,560 parameters)."""
    return MaskedAutoencoderViT(**kwargs)


def mae_vit_tiny_patch8_64(**kwargs) -> MaskedAutoencoderViT:
    """Test-sized MAE: encoder dim 64 depth 4 heads 4, decoder dim 32 depth 2 heads 4."""
    cfg = dict(
        embed_dim=64,
        depth=4,
        num_heads=4,
        decoder_embed_dim=32,
        decoder_depth=2,
        decoder_num_heads=4,
    )
    return MaskedAutoencoderViT(**{**cfg, **kwargs})


def mae_vit_tiny_patch4_64(**kwargs) -> MaskedAutoencoderViT:
    """The tiny MAE at patch 4: 16x16 feature maps on a 64-px tile instead of 8x8, for small
    scenes whose classes are a few pixels wide (configs/real.yaml; docs/real-data.md)."""
    return mae_vit_tiny_patch8_64(**{"patch_size": 4, **kwargs})


def mae_vit_tiny_patch4_stem_64(**kwargs) -> MaskedAutoencoderViT:
    """The tiny MAE at patch 4 with a per-pixel spectral stem of 4 filters (``SpectralStemPatchEmbed``;
    issue 18's spectral-tokenisation lever, docs/real-data.md)."""
    return mae_vit_tiny_patch4_64(**{"spectral_stem": 4, **kwargs})
