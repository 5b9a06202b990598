"""DINOv2 and SS-ViT pretraining recipes: losses, EMA teacher, schedules, masks, end to end."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
import torch

from hsissl.config import DINOv2Config, load_config
from hsissl.layout import storage_of
from hsissl.pretrain import checkpoint
from hsissl.pretrain.dinov2 import (
    DINOv2Recipe,
    block_masks,
    random_masks,
    teacher_momentum,
    teacher_temperature,
)
from hsissl.pretrain.ssvit import SSViTRecipe
from hsissl.pretrain.trainer import cosine_lr, pretrain
from hsissl.stages import ingest

REPO = Path(__file__).resolve().parents[1]
TINY = [
    f"{section}.{key}"
    for section, model in (("dinov2", "dinov2_vit_tiny_patch8_64"), ("ssvit", "ssvit_tiny_patch8_64"))
    for key in (f"model={model}", "out_dim=128", "head_hidden=64", "head_bottleneck=32",
                "n_local_crops=2", "lr=3.2e-2")  # 1e-3 at RUN's batch 8
]  # fmt: skip
RUN = ["pretrain.max_steps=4", "pretrain.batch_size=8", "pretrain.ckpt_every=2",
       "pretrain.knn_tiles=8", "pretrain.loader_threads=1", "pretrain.device=cpu"]  # fmt: skip


def tiny(*overrides: str):
    return load_config(REPO / "configs" / "tiny.yaml", [*TINY, *overrides])


def with_overrides(cfg, *overrides: str):
    """tiny_cfg (data source, run dir) plus the tiny models and a short run."""
    extra = [f"run_dir={cfg.run_dir}", f"data.source={cfg.data.source}", "data.scene_size=128",
             "data.shard_tiles=5", "tracking.uri="]  # fmt: skip
    return tiny(*extra, *RUN, *overrides)


def one_step(recipe, batch: int = 8, step: int = 0, total: int = 10):
    images = torch.randn(batch, 32, 64, 64)
    loss, logs = recipe(images, step, total)
    return loss, logs


TERMS = ("loss_dino", "loss_ibot", "loss_koleo", "teacher_entropy", "teacher_entropy_rel",
         "feature_std", "mask_ratio")  # fmt: skip


@pytest.mark.parametrize("recipe_cls", [DINOv2Recipe, SSViTRecipe])
def test_one_step_gives_a_finite_loss_that_is_the_weighted_sum_of_logged_terms(recipe_cls):
    torch.manual_seed(0)
    sec = recipe_cls.method
    weights = [f"{sec}.ibot_weight=0.5", f"{sec}.koleo_weight=0.2", f"{sec}.dino_weight=1.5"]
    if recipe_cls is SSViTRecipe:
        weights += ["ssvit.spatial_weight=0.7", "ssvit.spectral_weight=0.3"]
    recipe = recipe_cls(tiny(*weights))
    loss, logs = one_step(recipe)
    loss.backward()
    suffixes = [""] if recipe_cls is DINOv2Recipe else ["_spatial", "_spectral"]
    expected = {f"{t}{s}" for t in TERMS for s in suffixes} | {"teacher_temp"}
    assert set(logs) == expected
    assert torch.isfinite(loss) and all(math.isfinite(v) for v in logs.values())
    assert logs["teacher_temp"] == pytest.approx(0.04)  # warm-up start at step 0
    stream_weight = {"": 1.0, "_spatial": 0.7, "_spectral": 0.3}
    want = sum(
        stream_weight[s] * (1.5 * logs[f"loss_dino{s}"] + 0.5 * logs[f"loss_ibot{s}"]
                            + 0.2 * logs[f"loss_koleo{s}"])
        for s in suffixes
    )  # fmt: skip
    assert float(loss.detach()) == pytest.approx(want, rel=1e-5)
    for s in suffixes:
        assert logs[f"loss_ibot{s}"] > 0 and logs[f"loss_dino{s}"] > 0
        assert 0 < logs[f"teacher_entropy{s}"] <= math.log(128) + 1e-4
        rel = logs[f"teacher_entropy_rel{s}"]
        assert rel == pytest.approx(logs[f"teacher_entropy{s}"] / math.log(128), rel=1e-5)
    assert all(p.grad is not None for p in recipe.student["backbone"].blocks.parameters())


def test_teacher_gets_no_gradient_and_follows_the_student_by_ema():
    torch.manual_seed(0)
    recipe = DINOv2Recipe(tiny())
    optimizer = torch.optim.AdamW(recipe.param_groups(0.04), lr=1e-2)
    loss, _ = one_step(recipe)
    optimizer.zero_grad()
    loss.backward()
    assert all(not p.requires_grad and p.grad is None for p in recipe.teacher.parameters())
    assert {id(p) for g in optimizer.param_groups for p in g["params"]}.isdisjoint(
        id(p) for p in recipe.teacher.parameters()
    )
    optimizer.step()
    before = [p.detach().clone() for p in recipe.teacher.parameters()]
    logs = recipe.after_step(step=3, total=10)
    m = logs["momentum"]
    assert m == pytest.approx(teacher_momentum(3, 10, 0.992)) and 0.992 < m < 1
    moved = 0
    for t_before, t_after, s in zip(before, recipe.teacher.parameters(),
                                    recipe.student.parameters(), strict=True):  # fmt: skip
        torch.testing.assert_close(t_after, m * t_before + (1 - m) * s, rtol=0, atol=1e-7)
        moved += int(not torch.equal(t_after, t_before))
    assert moved > 10  # the student changed, so the teacher did
    assert recipe.encoder() is recipe.teacher["backbone"]
    recipe.train()
    assert recipe.student.training and not recipe.teacher.training  # teacher stays in eval


def test_teacher_temperature_and_momentum_schedules():
    dc = DINOv2Config(teacher_temp_warmup=0.04, teacher_temp=0.07, teacher_temp_warmup_fraction=0.3)
    assert teacher_temperature(0, 100, dc) == pytest.approx(0.04)
    assert teacher_temperature(15, 100, dc) == pytest.approx(0.055)  # half-way through warm-up
    assert teacher_temperature(30, 100, dc) == pytest.approx(0.07)
    assert teacher_temperature(99, 100, dc) == pytest.approx(0.07)
    no_warmup = dataclasses.replace(dc, teacher_temp_warmup_fraction=0.0)
    assert teacher_temperature(0, 100, no_warmup) == pytest.approx(0.07)
    assert teacher_momentum(0, 100, 0.992) == pytest.approx(0.992)
    assert teacher_momentum(50, 100, 0.992) == pytest.approx(0.996)  # cosine midpoint
    assert teacher_momentum(100, 100, 0.992) == pytest.approx(1.0)
    recipe = DINOv2Recipe(tiny("dinov2.momentum_teacher=0.9", "dinov2.teacher_temp_warmup=0.02"))
    assert recipe.after_step(0, 10)["momentum"] == pytest.approx(0.9)
    assert recipe.teacher_temp(0, 10) == pytest.approx(0.02)
    assert recipe.teacher_temp(5, 10) == pytest.approx(0.07)


def test_masks_share_of_images_ratio_range_and_blocks():
    torch.manual_seed(0)
    recipe = DINOv2Recipe(tiny("dinov2.mask_ratio=[0.1, 0.5]", "dinov2.mask_probability=0.5"))
    masks = recipe.draw_masks(200)["spatial"]  # (200, 64)
    assert masks.shape == (200, 64) and masks.dtype == torch.bool
    counts = masks.sum(dim=1)
    masked = counts > 0
    assert int(masked.sum()) == 100  # int(200 * 0.5) images carry a mask
    ratios = counts[masked].float() / 64
    assert ratios.min() >= 0.1 and ratios.max() <= 0.5
    assert ratios.min() < 0.15 and ratios.max() > 0.45  # the whole range is used
    # Block masks: masked patches have more masked 4-neighbours than random ones of equal count.
    random = random_masks(counts, 64)
    assert torch.equal(random.sum(dim=1), counts)
    assert _neighbour_share(masks) > _neighbour_share(random) + 0.15


def test_block_masks_give_exact_counts_at_the_extremes():
    torch.manual_seed(1)
    counts = torch.tensor([0, 1, 4, 17, 32, 63, 64])
    masks = block_masks(counts, 8, 8)
    assert torch.equal(masks.sum(dim=1), counts)


def test_ssvit_spectral_masks_count_and_reach_the_loss():
    torch.manual_seed(0)
    recipe = SSViTRecipe(tiny("ssvit.spectral_mask_ratio=0.25", "ssvit.mask_probability=0.5"))
    spectral = recipe.draw_masks(40)["spectral"]
    assert spectral.shape == (40, 16)
    counts = spectral.sum(dim=1)
    assert int((counts > 0).sum()) == 20 and set(counts.tolist()) == {0, 4}
    recipe = SSViTRecipe(tiny("ssvit.spectral_mask_ratio=0.5"))
    assert set(recipe.draw_masks(10)["spectral"].sum(dim=1).tolist()) == {0, 8}
    _, logs = one_step(recipe, batch=4)  # 8 global crops, 4 masked with 8 of 16 band tokens
    assert logs["mask_ratio_spectral"] == pytest.approx(4 * 8 / (8 * 16))
    none = SSViTRecipe(tiny("ssvit.mask_probability=0.0"))
    _, logs = one_step(none, batch=4)
    assert logs["loss_ibot_spectral"] == 0 and logs["loss_ibot_spatial"] == 0
    assert logs["mask_ratio_spectral"] == 0 and logs["loss_dino_spectral"] > 0


def test_ssvit_rejects_crop_sizes_it_has_no_projection_for():
    with pytest.raises(ValueError, match=r"ssvit.local_size=24"):
        SSViTRecipe(tiny("ssvit.local_size=24"))


def check_encoder_record(cfg, result: dict, method: str) -> None:
    """The encoder record loads, runs, and holds the TEACHER backbone of the final train state."""
    assert result["steps"] == 4 and math.isfinite(result["metrics"]["loss"])
    assert result["encoder_uri"].endswith(f"checkpoints/{method}/encoder.pt")
    encoder, normalizer, record = checkpoint.load_model(result["encoder_uri"])
    assert record["build"]["attr"] is None and record["method"] == method
    tokens = encoder.forward_features(normalizer(torch.randint(0, 9000, (2, 32, 64, 64))))
    if method == "ssvit":
        assert tokens["spatial"].shape == (2, 69, 64) and tokens["spectral"].shape == (2, 21, 64)
    else:
        assert tokens.shape == (2, 69, 64)
    state = checkpoint.load(storage_of(cfg), f"checkpoints/{method}/train.pt")["recipe"]
    teacher = {k.removeprefix("teacher.backbone."): v for k, v in state.items()
               if k.startswith("teacher.backbone.")}  # fmt: skip
    weights = encoder.state_dict()
    assert teacher.keys() == weights.keys()
    assert all(torch.equal(teacher[k], weights[k]) for k in teacher)


class _Killed(RuntimeError):
    pass


class _DiesAtStep2(DINOv2Recipe):
    def after_step(self, step: int, total: int) -> dict[str, float]:
        if step == 2:  # after the step-2 checkpoint: the third step's update is lost
            raise _Killed
        return super().after_step(step, total)


@pytest.fixture
def restore_determinism():
    """pretrain.deterministic switches torch's global flag on; give other tests the old one."""
    before = torch.are_deterministic_algorithms_enabled()
    yield
    torch.use_deterministic_algorithms(before)


def test_dinov2_pretrain_writes_the_teacher_encoder_and_resumes_exactly_after_a_kill(
    tiny_cfg, restore_determinism
):
    """EMA centering keeps state in buffers: the resumed run must reproduce those too."""
    cfg = with_overrides(tiny_cfg, "pretrain.deterministic=true", "dinov2.centering=center")
    ingest.run(cfg)
    check_encoder_record(cfg, pretrain(cfg, DINOv2Recipe, "pretrain-dinov2"), "dinov2")
    store = storage_of(cfg)
    whole = checkpoint.load(store, "checkpoints/dinov2/train.pt")["recipe"]
    store.delete_prefix("checkpoints/dinov2")
    with pytest.raises(_Killed):
        pretrain(cfg, _DiesAtStep2, stage="pretrain-dinov2")
    assert checkpoint.load(store, "checkpoints/dinov2/train.pt")["step"] == 2
    resumed = pretrain(cfg, DINOv2Recipe, stage="pretrain-dinov2")
    assert resumed["resumed"] and resumed["steps"] == 4
    # a new reader: a store instance keeps the checkpoint version it first read
    again = checkpoint.load(storage_of(cfg), "checkpoints/dinov2/train.pt")["recipe"]
    assert whole.keys() == again.keys() and any(k.endswith("center.center") for k in whole)
    assert all(torch.equal(whole[k], again[k]) for k in whole)


def test_ssvit_pretrain_end_to_end_writes_the_teacher_encoder(tiny_cfg):
    cfg = with_overrides(tiny_cfg)
    ingest.run(cfg)
    check_encoder_record(cfg, pretrain(cfg, SSViTRecipe, stage="pretrain-ssvit"), "ssvit")


def test_dinov2_loss_decreases_over_30_steps():
    """Seeded: 30 AdamW steps on 64 fixed smooth tiles. Early on the DINOv2 teacher's CLS is
    nearly image-independent (LayerScale 1e-5), so much of the drop is KoLeo spreading the
    student's CLS features and the student matching near-uniform teacher targets."""
    torch.manual_seed(0)
    cfg = tiny("dinov2.warmup_fraction=0.1")
    data = torch.nn.functional.interpolate(torch.randn(64, 32, 8, 8), size=64, mode="bilinear")
    recipe = DINOv2Recipe(cfg)
    optimizer = torch.optim.AdamW(recipe.param_groups(0.04), lr=1e-3, betas=(0.9, 0.999))
    total, losses, dino = 30, [], []
    for step in range(total):
        for group in optimizer.param_groups:
            group["lr"] = cosine_lr(step, total, cfg.dinov2, 8)  # batches of 8
        loss, logs = recipe(data[torch.randint(0, 64, (8,))], step, total)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(recipe.parameters(), 3.0)
        optimizer.step()
        recipe.after_step(step, total)
        losses.append(float(loss.detach()))
        dino.append(logs["loss_dino"])
    assert sum(losses[-5:]) / 5 < 0.9 * sum(losses[:5]) / 5
    assert sum(dino[-5:]) / 5 < sum(dino[:5]) / 5
    assert logs["feature_std"] > 0.01  # student CLS features no longer identical


def _neighbour_share(masks: torch.Tensor) -> float:
    """Share of masked patches (8x8 grid) with at least one masked 4-neighbour."""
    grid = masks.view(-1, 8, 8).float()
    padded = torch.nn.functional.pad(grid, (1, 1, 1, 1))
    neighbours = (padded[:, :-2, 1:-1] + padded[:, 2:, 1:-1]
                  + padded[:, 1:-1, :-2] + padded[:, 1:-1, 2:])  # fmt: skip
    return float(((neighbours > 0) & (grid > 0)).sum() / grid.sum())
