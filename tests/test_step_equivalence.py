"""The throughput changes of issue #19 leave training unchanged.

Each change (patch embeddings and SS-ViT token fusion as matrix products, Sinkhorn-Knopp on
potentials, compiled loss kernels, recomputed blocks) is checked against the implementation it
replaced, kept here as the reference: same outputs and gradients, the same losses over a few
optimiser steps of every tiny recipe (1e-5), and checkpoints of the old layout still load.
"""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path
from types import ModuleType

import pytest
import torch
from timm.layers import PatchEmbed
from timm.models.vision_transformer import VisionTransformer

from hsissl.config import load_config
from hsissl.losses import sinkhorn_knopp
from hsissl.losses.centering import TeacherTargets, soft_cross_entropy
from hsissl.models import create_model
from hsissl.models.patch_embed import MatmulPatchEmbed
from hsissl.models.ssvit import SpectralEmbed, TokenFusion
from hsissl.pretrain.dinov2 import DINOv2Recipe
from hsissl.pretrain.mae import MAERecipe
from hsissl.pretrain.recipe import set_checkpoint_blocks
from hsissl.pretrain.ssvit import SSViTRecipe

REPO = Path(__file__).resolve().parents[1]


def load_script(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


BENCH_KERNELS = load_script("bench_kernels")
legacy_sinkhorn = BENCH_KERNELS.legacy_sinkhorn  # the Sinkhorn-Knopp iteration it replaced


# -- the replaced implementations ---------------------------------------------------------------
def legacy_spectral_forward(self: SpectralEmbed, x: torch.Tensor) -> torch.Tensor:
    """The strided Conv1d over (B, H*W, bands)."""
    conv = self.proj[str(x.shape[-1])]
    return conv(x.flatten(2).transpose(1, 2)).transpose(1, 2)


def legacy_fusion_forward(self: TokenFusion, spatial: torch.Tensor, spectral: torch.Tensor):
    """Two Conv1d(kernel_size=1) over the concatenated tokens."""
    x = torch.cat([spatial, spectral], dim=1)
    return spatial + self.to_spatial(x), spectral + self.to_spectral(x)


def use_legacy(module: torch.nn.Module, monkeypatch: pytest.MonkeyPatch) -> None:
    """Put the replaced implementations back into ``module`` (same parameters)."""
    for m in module.modules():
        if isinstance(m, MatmulPatchEmbed):
            m.__class__ = PatchEmbed  # timm's convolution; identical parameters
        if isinstance(m, TeacherTargets):
            m.sinkhorn = legacy_sinkhorn
    monkeypatch.setattr(SpectralEmbed, "forward", legacy_spectral_forward)
    monkeypatch.setattr(TokenFusion, "forward", legacy_fusion_forward)


# -- unit equivalence ------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", [None, "NHWC", "NCHW", "NLC", "NCL"])
def test_matmul_patch_embed_matches_the_convolution_values_and_gradients(fmt):
    torch.manual_seed(0)
    conv = PatchEmbed(64, 8, 32, 48, output_fmt=fmt, strict_img_size=False)
    mine = MatmulPatchEmbed(64, 8, 32, 48, output_fmt=fmt, strict_img_size=False)
    mine.load_state_dict(conv.state_dict())  # same keys and shapes
    for size in (64, 32):  # global and local crops
        x = torch.randn(3, 32, size, size, requires_grad=True)
        y_ref, y = conv(x), mine(x)
        assert y.shape == y_ref.shape
        torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
        grad = torch.randn_like(y)
        g_ref = torch.autograd.grad(y_ref, [x, conv.proj.weight, conv.proj.bias], grad)
        g = torch.autograd.grad(y, [x, mine.proj.weight, mine.proj.bias], grad)
        for a, b in zip(g, g_ref, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_matmul_patch_embed_refuses_sizes_that_are_not_patch_multiples():
    with pytest.raises(ValueError, match="not divisible by the patch size 8x8"):
        MatmulPatchEmbed(64, 8, 32, 48, strict_img_size=False)(torch.randn(1, 32, 60, 60))


def test_spectral_embed_as_a_matrix_product_matches_the_strided_conv1d():
    torch.manual_seed(0)
    embed = SpectralEmbed(32, 2, 40, crop_sizes=(64, 32))
    for size in (64, 32):
        x = torch.randn(2, 32, size, size)
        torch.testing.assert_close(
            embed(x), legacy_spectral_forward(embed, x), rtol=1e-5, atol=1e-5
        )


def test_token_fusion_as_one_matrix_product_matches_the_two_convolutions():
    torch.manual_seed(0)
    fusion = TokenFusion(69, 21)
    spatial, spectral = torch.randn(3, 69, 40), torch.randn(3, 21, 40)
    for got, want in zip(fusion(spatial, spectral), legacy_fusion_forward(fusion, spatial, spectral),
                         strict=True):  # fmt: skip
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_backbones_keep_timm_state_dict_layout_so_old_checkpoints_load():
    """A ViT built with timm's own (convolution) PatchEmbed - what every checkpoint so far was
    saved from - loads into today's model strictly and gives the same features."""
    torch.manual_seed(0)
    model = create_model("vit_tiny_patch8_64")
    assert isinstance(model.patch_embed, MatmulPatchEmbed)
    old = create_model("vit_tiny_patch8_64", embed_layer=PatchEmbed)
    assert type(old.patch_embed) is PatchEmbed and isinstance(old, VisionTransformer)
    model.load_state_dict(old.state_dict(), strict=True)
    x = torch.randn(2, 32, 64, 64)
    torch.testing.assert_close(model.eval().forward_features(x), old.eval().forward_features(x),
                               rtol=1e-5, atol=1e-5)  # fmt: skip


@pytest.mark.parametrize("shape,temp", [((7, 50), 0.07), ((64, 16), 0.04), ((5, 3), 1.0)])
def test_sinkhorn_on_potentials_matches_the_matrix_iteration(shape, temp):
    torch.manual_seed(0)
    logits = torch.randn(*shape) * 4
    for n_iters in (1, 3, 10):  # scores up to ~400: float32 rounds them by ~3e-5 either way
        torch.testing.assert_close(sinkhorn_knopp(logits, temp, n_iters),
                                   legacy_sinkhorn(logits, temp, n_iters), rtol=1e-4, atol=1e-5)  # fmt: skip


def test_compiled_loss_kernels_match_eager_for_changing_row_counts():
    """compile_kernels (dynamic rows: the masked-token count changes every step) gives the eager
    numbers; aot_eager traces the same graphs as inductor without generating code (fast on CI)."""
    targets = TeacherTargets(out_dim=64)
    targets.compile_kernels(backend="aot_eager")
    torch.manual_seed(0)
    for rows in (9, 17, 33):
        logits, student = torch.randn(rows, 64) * 3, torch.randn(rows, 64)
        probs = targets.targets(logits, 0.05)
        torch.testing.assert_close(probs, sinkhorn_knopp(logits, 0.05), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(targets.cross_entropy(probs, student, 0.1),
                                   soft_cross_entropy(probs, student, 0.1), rtol=1e-5, atol=1e-5)  # fmt: skip


# -- whole training steps ------------------------------------------------------------------------
TINY = {
    MAERecipe: ["mae.model=mae_vit_tiny_patch8_64"],
    DINOv2Recipe: ["dinov2.model=dinov2_vit_tiny_patch8_64", "dinov2.out_dim=128",
                   "dinov2.head_hidden=64", "dinov2.head_bottleneck=32", "dinov2.n_local_crops=2"],
    SSViTRecipe: ["ssvit.model=ssvit_tiny_patch8_64", "ssvit.out_dim=128", "ssvit.head_hidden=64",
                  "ssvit.head_bottleneck=32", "ssvit.n_local_crops=2"],
}  # fmt: skip


def losses_of(recipe_cls: type, legacy: bool, monkeypatch: pytest.MonkeyPatch,
              steps: int = 3) -> list[float]:  # fmt: skip
    """Losses of ``steps`` AdamW steps of a tiny recipe on fixed batches and random draws."""
    cfg = load_config(REPO / "configs" / "tiny.yaml", TINY[recipe_cls])
    torch.manual_seed(0)
    recipe = recipe_cls(cfg)
    with monkeypatch.context() as patch:
        if legacy:
            use_legacy(recipe, patch)
        optimizer = torch.optim.AdamW(recipe.parameters(), lr=1e-3)
        out = []
        for step in range(steps):
            images = torch.randn(4, 32, 64, 64, generator=torch.Generator().manual_seed(step))
            torch.manual_seed(100 + step)  # augmentations and masks draw from the global RNG
            loss, _ = recipe(images, step, steps)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            recipe.after_step(step, steps)
            out.append(float(loss.detach()))
    return out


@pytest.mark.parametrize("recipe_cls", list(TINY), ids=lambda c: c.method)
def test_tiny_recipes_train_to_the_same_losses_as_before(recipe_cls, monkeypatch):
    new = losses_of(recipe_cls, legacy=False, monkeypatch=monkeypatch)
    old = losses_of(recipe_cls, legacy=True, monkeypatch=monkeypatch)
    assert all(math.isfinite(v) for v in new)
    assert new == pytest.approx(old, rel=1e-5, abs=1e-5)


class CallCount:
    def __init__(self, fn):
        self.fn, self.calls = fn, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.fn(*args, **kwargs)


@pytest.mark.parametrize("recipe_cls", [DINOv2Recipe, SSViTRecipe], ids=lambda c: c.method)
def test_checkpointed_blocks_give_the_same_loss_and_gradients(recipe_cls):
    """pretrain.checkpoint_blocks trades memory for compute only: the numbers stay."""
    cfg = load_config(REPO / "configs" / "tiny.yaml", TINY[recipe_cls])
    images = torch.randn(4, 32, 64, 64, generator=torch.Generator().manual_seed(0))
    grads, calls = [], []
    for n in (0, 3):
        torch.manual_seed(0)
        recipe = recipe_cls(cfg)
        assert set_checkpoint_blocks(recipe, n) == 2  # student and teacher backbones
        block = recipe.student["backbone"].blocks[0]
        count = CallCount(block.forward)
        block.forward = count  # module hooks do not run in the recomputation; this does
        torch.manual_seed(1)
        loss, _ = recipe(images, 0, 10)
        loss.backward()
        grads.append([p.grad.clone() for p in recipe.student.parameters() if p.grad is not None])
        calls.append(count.calls)
    assert calls[1] > calls[0]  # the checkpointed block ran again in backward
    assert len(grads[0]) == len(grads[1]) > 0
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_kernel_bench_runs_on_the_cpu(tmp_path):
    out = tmp_path / "kernels.json"
    assert (
        BENCH_KERNELS.main(["--json", str(out), "--reps", "1", "--compile-backend", "aot_eager"])
        == 0
    )
    result = json.loads(out.read_text())
    assert result["tiny"] is True
    assert set(result["patch_embed_ms"]) == {"conv (timm)", "matmul (hsissl)"}
    assert set(result["token_fusion_ms"]) == {"conv1d k=1 (before)", "matmul (hsissl)"}
    assert all(row["math"] > 0 for row in result["attention_ms"].values())
    for row in result["targets_ms"].values():
        assert len(row) == 5 and all(v > 0 for v in row.values())


@pytest.mark.parametrize("recipe_cls, captured", [(MAERecipe, True), (DINOv2Recipe, False)],
                         ids=["mae", "dinov2"])  # fmt: skip
def test_cuda_graphs_only_for_recipes_with_static_shapes(recipe_cls, captured, tmp_path):
    """pretrain.cuda_graphs asks torch.compile for reduce-overhead only where every compiled
    network keeps one shape (MAE); DINOv2's heads see a new row count every step."""
    from hsissl.pretrain.trainer import Trainer

    trainer = Trainer.__new__(Trainer)  # only the config and the recipe matter here
    trainer.pc = load_config(REPO / "configs" / "fast.yaml").pretrain
    trainer.method, trainer.recipe = recipe_cls.method, recipe_cls
    assert trainer.pc.cuda_graphs
    assert trainer.compile_options() == ({"mode": "reduce-overhead"} if captured else {})
    trainer.pc.cuda_graphs = False
    assert trainer.compile_options() == {}
