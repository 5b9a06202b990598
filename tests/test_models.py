"""hsissl.models: exact parameter counts (dissertation Fig. 3.10), shapes, MAE masking and loss,
DINOv2 mask tokens, Spatial-Spectral fusion. Base models are built on the meta device (no memory,
no compute); tiny models run real forward passes on the CPU."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from hsissl.models import (
    MODELS,
    create_model,
    dino_head,
    random_masking,
)
from hsissl.models.mae import sincos_pos_embed_2d
from hsissl.models.vit import block_attention, swiglu_hidden_features

TINY = [
    "vit_tiny_patch8_64",
    "mae_vit_tiny_patch8_64",
    "dinov2_vit_tiny_patch8_64",
    "ssvit_tiny_patch8_64",
]
# tokens of a 64x64 tile: cls + registers + 64 patches
TINY_TOKENS = {
    "vit_tiny_patch8_64": 65,
    "mae_vit_tiny_patch8_64": 65,
    "dinov2_vit_tiny_patch8_64": 69,
    "ssvit_tiny_patch8_64": 69,
}


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def meta_count(name: str, **kw) -> int:
    with torch.device("meta"):
        return n_params(create_model(name, **kw))


@pytest.fixture(scope="module")
def tiles() -> torch.Tensor:
    return torch.randn(2, 32, 64, 64, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def tiny_models() -> dict[str, torch.nn.Module]:
    torch.manual_seed(0)
    return {name: create_model(name).eval() for name in TINY}


# ---- parameter counts ---------------------------------------------------------------------------


def test_vit_base_count() -> None:
    # patch 1,573,632 + cls 768 + pos 49,920 + 12 x 7,087,872 + norm 1,536
    assert meta_count("vit_base_patch8_64") == 86_680_320


def test_mae_base_count_matches_dissertation() -> None:
    with torch.device("meta"):
        mae = create_model("mae_vit_base_patch8_64")
    assert n_params(mae) == 113_378_560
    # the fixed sin-cos tables are counted but not trained (65 x 768 + 65 x 512)
    assert not mae.encoder.pos_embed.requires_grad and not mae.decoder_pos_embed.requires_grad
    trainable = sum(p.numel() for p in mae.parameters() if p.requires_grad)
    assert trainable == 113_378_560 - 65 * 768 - 65 * 512


def test_dinov2_counts_match_dissertation() -> None:
    with torch.device("meta"):
        backbone = create_model("dinov2_vit_base_patch8_64")
        head = dino_head(768)
    assert swiglu_hidden_features(4 * 768) == 2048
    assert backbone.blocks[0].mlp.fc1.out_features == 2 * 2048  # packed gate + value
    assert n_params(backbone) == 86_714_880
    assert n_params(head) == 23_138_560
    g = head.last_layer.parametrizations.weight.original0
    assert g.shape == (65_536, 1) and not g.requires_grad  # frozen magnitude, still counted
    assert n_params(backbone) + n_params(head) == 109_853_440
    assert 2 * (n_params(backbone) + n_params(head)) == 219_706_880  # student + teacher


def test_ssvit_counts_match_dissertation() -> None:
    with torch.device("meta"):
        backbone = create_model("ssvit_base_patch8_64")
        head = dino_head(768)  # one head, shared by both streams and by DINO/iBOT
    assert n_params(backbone) == 179_777_424
    assert n_params(backbone) + n_params(head) == 202_915_984
    assert 2 * (n_params(backbone) + n_params(head)) == 405_831_968


def test_ssvit_swiglu_variant_delta() -> None:
    # SwiGLU (hidden 2048) has 1,024 more parameters per FFN than the 3072-wide MLP: 24 FFNs
    delta = meta_count("ssvit_base_patch8_64", ffn_layer="swiglu") - 179_777_424
    assert delta == 24 * 1_024


# ---- shapes and attention -----------------------------------------------------------------------


@pytest.mark.parametrize("name", TINY)
def test_tiny_shapes(name: str, tiny_models, tiles) -> None:
    model = tiny_models[name]
    with torch.no_grad():
        feats = model.forward_features(tiles)
        maps = model.get_intermediate_layers(tiles, n=4)
        picked = model.get_intermediate_layers(tiles, n=[0, 2])
        attn = model.get_last_attention(tiles)
    tokens = feats["spatial"] if isinstance(feats, dict) else feats
    assert tokens.shape == (2, TINY_TOKENS[name], 64)
    assert model.num_prefix_tokens == TINY_TOKENS[name] - 64
    assert model.patch_size == 8 and model.embed_dim == 64
    assert len(maps) == 4 and all(m.shape == (2, 64, 8, 8) for m in maps)
    assert len(picked) == 2
    assert torch.allclose(picked[1], maps[2])  # block index 2 == third of the last four
    assert not torch.allclose(maps[0], maps[3])
    assert attn.shape == (2, 4, TINY_TOKENS[name], TINY_TOKENS[name])
    assert torch.allclose(attn.sum(-1), torch.ones(2, 4, TINY_TOKENS[name]), atol=1e-5)
    assert (attn >= 0).all()


def test_last_attention_reproduces_block_output(tiny_models, tiles) -> None:
    # weights @ v through the projection must equal what the fused SDPA path computed
    model = tiny_models["dinov2_vit_tiny_patch8_64"]
    with torch.no_grad():
        x = model.prepare_tokens(tiles)
        for blk in model.blocks[:-1]:
            x = blk(x)
        last = model.blocks[-1]
        weights = block_attention(last, x)  # (B, H, N, N)
        y = last.norm1(x)
        B, N, C = y.shape
        attn = last.attn
        v = attn.qkv(y).reshape(B, N, 3, attn.num_heads, attn.head_dim)[:, :, 2].transpose(1, 2)
        manual = attn.proj((weights @ v).transpose(1, 2).reshape(B, N, C))
        assert torch.allclose(manual, attn(y), atol=1e-5)
        assert torch.equal(weights, model.get_last_attention(tiles))


def test_attention_runs_through_sdpa(tiny_models, tiles, monkeypatch) -> None:
    calls = []
    sdpa = F.scaled_dot_product_attention

    def counting_sdpa(*args, **kwargs):
        calls.append(1)
        return sdpa(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", counting_sdpa)
    with torch.no_grad():
        tiny_models["dinov2_vit_tiny_patch8_64"].forward_features(tiles)
        assert len(calls) == 4  # one per block
        tiny_models["ssvit_tiny_patch8_64"].forward_features(tiles)
        assert len(calls) == 4 + 8  # spatial + spectral block per depth


def test_local_crops_and_bad_sizes(tiny_models, tiles) -> None:
    local = tiles[:, :, :32, :32]
    with torch.no_grad():
        assert tiny_models["dinov2_vit_tiny_patch8_64"].forward_features(local).shape == (2, 21, 64)
        feats = tiny_models["ssvit_tiny_patch8_64"].forward_features(local)
    assert feats["spatial"].shape == (2, 5 + 16, 64) and feats["spectral"].shape == (2, 21, 64)
    with pytest.raises(ValueError, match="48x48"):
        tiny_models["ssvit_tiny_patch8_64"].forward_features(tiles[:, :, :48, :48])


def test_create_model_registry() -> None:
    assert set(TINY) <= set(MODELS)
    assert {n.replace("tiny", "base") for n in TINY} <= set(MODELS)
    with pytest.raises(KeyError, match="vit_base_patch8_64"):
        create_model("vit_huge")


# ---- MAE ----------------------------------------------------------------------------------------


def test_random_masking_ratio_and_round_trip() -> None:
    x = torch.randn(3, 64, 5)
    kept, mask, ids_restore = random_masking(x, 0.75, generator=torch.Generator().manual_seed(1))
    assert kept.shape == (3, 16, 5)
    assert mask.shape == (3, 64) and mask.sum(1).tolist() == [48.0, 48.0, 48.0]
    assert not torch.equal(mask[0], mask[1])  # per-sample masks
    # [kept, zeros] gathered with ids_restore is x at the kept places and zeros at the masked ones
    padded = torch.cat([kept, torch.zeros(3, 48, 5)], dim=1)
    restored = torch.gather(padded, 1, ids_restore.unsqueeze(-1).expand(-1, -1, 5))
    keep = (mask == 0).unsqueeze(-1)
    assert torch.equal(restored, torch.where(keep, x, torch.zeros_like(x)))


def test_patchify_round_trip(tiny_models, tiles) -> None:
    mae = tiny_models["mae_vit_tiny_patch8_64"]
    patches = mae.patchify(tiles)
    assert patches.shape == (2, 64, 8 * 8 * 32)
    # patch 1 is row 0, column 1, flattened as (row, col, band)
    assert torch.equal(patches[:, 1], tiles[:, :, :8, 8:16].permute(0, 2, 3, 1).reshape(2, -1))
    assert torch.equal(mae.unpatchify(patches), tiles)


def test_mae_loss_counts_masked_patches_only(tiny_models, tiles) -> None:
    mae = tiny_models["mae_vit_tiny_patch8_64"]
    torch.manual_seed(3)
    with torch.no_grad():
        loss, pred, mask = mae(tiles, mask_ratio=0.75)
        assert pred.shape == (2, 64, 2048) and mask.sum(1).tolist() == [48.0, 48.0]
        unmasked = (1 - mask).unsqueeze(-1)
        assert torch.allclose(mae.forward_loss(tiles, pred + 100 * unmasked, mask), loss)
        assert not torch.allclose(
            mae.forward_loss(tiles, pred + 100 * mask.unsqueeze(-1), mask), loss
        )
        per_patch = ((pred - mae.patchify(tiles)) ** 2).mean(-1)
        assert torch.allclose(loss, per_patch[mask.bool()].mean())


def test_mae_patch4_gives_finer_maps_with_the_same_weights_shapes_elsewhere(tiles) -> None:
    p4, p8 = create_model("mae_vit_tiny_patch4_64"), create_model("mae_vit_tiny_patch8_64")
    with torch.no_grad():
        loss, pred, mask = p4(tiles, mask_ratio=0.75)
        maps = p4.get_intermediate_layers(tiles, n=4)
    assert pred.shape == (2, 256, 4 * 4 * 32) and mask.sum(1).tolist() == [192.0, 192.0]
    assert [m.shape for m in maps] == [(2, 64, 16, 16)] * 4  # 16x16 maps: 4 px per feature
    assert torch.equal(p4.unpatchify(p4.patchify(tiles)), tiles) and loss.item() > 0
    # same blocks; only the patch projection, the position tables and the decoder's output differ
    blocks = {k: v.shape for k, v in p4.state_dict().items() if ".blocks." in k}
    assert blocks == {k: v.shape for k, v in p8.state_dict().items() if ".blocks." in k}


def test_spectral_stem_filters_each_pixels_spectrum_before_the_patches(tiles) -> None:
    from hsissl.models.patch_embed import SpectralStemPatchEmbed

    mae = create_model("mae_vit_tiny_patch4_stem_64")
    embed = mae.encoder.patch_embed
    assert isinstance(embed, SpectralStemPatchEmbed) and embed.proj.weight.shape == (
        64,
        4 * 16,
        4,
        4,
    )
    with torch.no_grad():
        maps = mae.get_intermediate_layers(tiles, n=4)
        # per pixel: the stem sees one spectrum, not its neighbours (a change at one pixel moves
        # only the patch that holds it)
        moved = tiles.clone()
        moved[:, :, 0, 0] += 1.0
        a, b = embed(tiles), embed(moved)  # (B, 16, 16, D)
    assert [m.shape for m in maps] == [(2, 64, 16, 16)] * 4
    changed = (a - b).abs().amax(dim=(0, 3)) > 0  # (16, 16) patches
    assert changed[0, 0] and changed.sum() == 1
    # the MAE target is still the 32 input bands; the stem learns through the loss
    loss, pred, _ = mae(tiles)
    assert pred.shape == (2, 256, 4 * 4 * 32)
    loss.backward()
    assert embed.stem.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="in_chans 31 must be even"):
        create_model("mae_vit_tiny_patch4_stem_64", in_chans=31)


def test_mae_backward_leaves_fixed_tables_alone(tiles) -> None:
    mae = create_model("mae_vit_tiny_patch8_64")
    loss, _, _ = mae(tiles)
    loss.backward()
    assert mae.encoder.pos_embed.grad is None and mae.decoder_pos_embed.grad is None
    assert mae.encoder.patch_embed.proj.weight.grad.abs().sum() > 0
    assert mae.decoder_pred.weight.grad.abs().sum() > 0


def test_mae_dropout_in_encoder_and_decoder_only_while_training(tiles) -> None:
    mae = create_model("mae_vit_tiny_patch8_64", drop_rate=0.1)
    rates = {m.p for m in mae.modules() if isinstance(m, torch.nn.Dropout) and m.p > 0}
    assert rates == {0.1}
    for blocks in (mae.encoder.blocks, mae.decoder_blocks):
        assert all(b.attn.proj_drop.p == 0.1 and b.mlp.drop2.p == 0.1 for b in blocks)
    latent = mae.encoder.forward_features  # no masking: only dropout can differ between calls
    assert not torch.equal(latent(tiles), latent(tiles))
    mae.eval()
    assert torch.equal(latent(tiles), latent(tiles))
    plain = create_model("mae_vit_tiny_patch8_64")
    assert not any(m.p > 0 for m in plain.modules() if isinstance(m, torch.nn.Dropout))


def test_mae_norm_pix_loss(tiles) -> None:
    mae = create_model("mae_vit_tiny_patch8_64", norm_pix_loss=True)
    tiles = 3 * tiles + 2  # far from per-patch zero mean / unit variance
    target = mae.patchify(tiles)
    normed = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6) ** 0.5
    mask = torch.ones(2, 64)
    assert mae.forward_loss(tiles, normed, mask).item() < 1e-10
    assert mae.forward_loss(tiles, target, mask).item() > 1.0


def test_mae_sincos_position_table() -> None:
    table = sincos_pos_embed_2d(32, 8)  # (65, 32); first half encodes the column, second the row
    assert table.shape == (65, 32) and torch.equal(table[0], torch.zeros(32))
    grid = table[1:].reshape(8, 8, 32)
    assert torch.allclose(grid[0, 3, :16], grid[5, 3, :16])  # same column
    assert torch.allclose(grid[5, 0, 16:], grid[5, 7, 16:])  # same row
    assert torch.allclose(grid[0, 0], torch.tensor([0.0] * 8 + [1.0] * 8 + [0.0] * 8 + [1.0] * 8))
    mae = create_model("mae_vit_tiny_patch8_64")
    assert torch.equal(mae.encoder.pos_embed[0], sincos_pos_embed_2d(64, 8))


# ---- DINOv2 and Spatial-Spectral ----------------------------------------------------------------


def test_dinov2_masks_replace_patch_embeddings(tiny_models, tiles) -> None:
    model = tiny_models["dinov2_vit_tiny_patch8_64"]
    torch.nn.init.normal_(model.mask_token)
    masks = torch.zeros(2, 64, dtype=torch.bool)
    masks[0, [0, 9, 63]] = True
    masks[1, 5] = True
    with torch.no_grad():
        tokens = model.prepare_tokens(tiles, masks)  # (B, 69, C): cls, 4 registers, 64 patches
        plain = model.prepare_tokens(tiles)
        expected = model.mask_token + model.pos_embed[0, 1 + 9]
        assert torch.allclose(tokens[0, 5 + 9], expected)
        assert torch.equal(tokens[:, 5:][~masks], plain[:, 5:][~masks])
        assert not torch.allclose(tokens[:, 5:][masks], plain[:, 5:][masks])
        # the content of a masked patch no longer reaches the output
        edited = tiles.clone()
        edited[0, :, 8:16, 8:16] += 5.0  # patch 9 of sample 0
        out, out_edited = (
            model.forward_features(tiles, masks),
            model.forward_features(edited, masks),
        )
        assert torch.allclose(out, out_edited, atol=1e-5)
        assert not torch.allclose(model.forward_features(tiles), model.forward_features(edited))
    with pytest.raises(ValueError, match="bool"):
        model.forward_features(tiles, masks.float())


def test_ssvit_spectral_masks_and_fusion(tiny_models, tiles) -> None:
    model = tiny_models["ssvit_tiny_patch8_64"]
    torch.nn.init.normal_(model.spectral_mask_token)
    spectral_masks = torch.zeros(2, 16, dtype=torch.bool)
    spectral_masks[:, 3] = True  # bands 6 and 7
    with torch.no_grad():
        _, spectral, _ = model.prepare_tokens(tiles, spectral_masks=spectral_masks)
        expected = model.spectral_mask_token + model.spectral_pos_embed[0, 1 + 3]
        assert torch.allclose(spectral[:, 5 + 3], expected.expand(2, -1))
        # fusion: the spatial output depends on the spectral stream
        before = model.forward_features(tiles)["spatial"]
        model.spectral_cls_token.add_(1.0)
        after = model.forward_features(tiles)["spatial"]
        model.spectral_cls_token.sub_(1.0)
    assert not torch.allclose(before, after)
    attn = model.get_last_attention(tiles, stream="spectral")
    assert attn.shape == (2, 4, 21, 21)
    assert torch.allclose(attn.sum(-1), torch.ones(2, 4, 21), atol=1e-5)


def test_dino_head_output_and_unit_prototypes() -> None:
    head = dino_head(64, out_dim=128, hidden=32, bottleneck=16)
    out = head(torch.randn(5, 64))
    assert out.shape == (5, 128)
    weight = head.last_layer.weight  # g * v / ||v|| with g = 1
    assert torch.allclose(weight.norm(dim=1), torch.ones(128), atol=1e-5)
    assert [m.out_features for m in head.mlp if isinstance(m, torch.nn.Linear)] == [32, 32, 16]
