"""Losses pinned to hand-computed values (hsissl.losses)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from hsissl.losses import (
    Centering,
    DINOLoss,
    FocalLoss,
    IBOTPatchLoss,
    KoLeoLoss,
    mae_loss,
    sinkhorn_knopp,
)

STUDENT_TEMP = 0.1
P_HALF = [0.5, 0.25, 0.25]
ENTROPY_P_HALF = 1.5 * math.log(2)  # 0.5 ln 2 + 2 * 0.25 ln 4 = 1.0397 nats


def logits_for(probs: list[float], temp: float = STUDENT_TEMP) -> torch.Tensor:
    """Logits whose softmax(logits / temp) is exactly `probs`: (K,)."""
    return temp * torch.log(torch.tensor(probs, dtype=torch.float64)).float()


def one_hot(index: int, k: int = 3) -> torch.Tensor:
    return F.one_hot(torch.tensor(index), k).float()


# --- Sinkhorn-Knopp and centering -------------------------------------------------------------


def test_sinkhorn_converges_to_uniform_prototype_marginal() -> None:
    torch.manual_seed(0)
    b, k = 16, 8
    q = sinkhorn_knopp(torch.randn(b, k), temp=0.5, n_iters=50)
    assert q.shape == (b, k)
    torch.testing.assert_close(q.sum(dim=1), torch.ones(b), atol=1e-6, rtol=0)
    torch.testing.assert_close(q.sum(dim=0), torch.full((k,), b / k), atol=1e-3, rtol=0)


def test_sinkhorn_three_iters_rows_still_sum_to_one() -> None:
    torch.manual_seed(1)
    q = sinkhorn_knopp(torch.randn(10, 32) * 3, temp=0.1, n_iters=3)
    torch.testing.assert_close(q.sum(dim=1), torch.ones(10), atol=1e-6, rtol=0)
    assert (q >= 0).all()


def test_sinkhorn_uniform_logits_give_uniform_assignment() -> None:
    q = sinkhorn_knopp(torch.zeros(4, 5), temp=0.07)
    torch.testing.assert_close(q, torch.full((4, 5), 0.2))


def test_sinkhorn_extreme_logits_stay_finite() -> None:
    torch.manual_seed(2)
    huge = torch.randn(8, 6) * 1000  # exp(logits / temp) overflows float32
    far_below = torch.randn(8, 6)
    far_below[:, 0] = -10.0  # exp(-10 / 0.04) underflows: an all-zero prototype row
    for logits in (huge, far_below):
        q = sinkhorn_knopp(logits, temp=0.04)
        assert torch.isfinite(q).all()
        torch.testing.assert_close(q.sum(dim=1), torch.ones(8), atol=1e-6, rtol=0)


def test_sinkhorn_matches_plain_formulation_on_one_step() -> None:
    # Hand-checkable 2x2 case, one iteration: exp(logits) = [[1, 3], [1, 1]].
    logits = torch.log(torch.tensor([[1.0, 3.0], [1.0, 1.0]]))
    # Prototype columns (sum 2 and 4) scaled to 1/2 each: [[1/4, 3/8], [1/4, 1/8]];
    # then each sample row scaled to sum 1: [[0.4, 0.6], [2/3, 1/3]].
    q = sinkhorn_knopp(logits, temp=1.0, n_iters=1)
    torch.testing.assert_close(q, torch.tensor([[0.4, 0.6], [2 / 3, 1 / 3]]))


def test_sinkhorn_rejects_non_matrix() -> None:
    with pytest.raises(ValueError, match=r"\(B, K\)"):
        sinkhorn_knopp(torch.zeros(2, 3, 4), temp=0.1)


def test_centering_momentum_rule() -> None:
    centering = Centering(out_dim=3, momentum=0.9)
    centering.update(torch.tensor([[1.0, 2.0, 3.0], [3.0, 4.0, 5.0]]))  # batch mean [2, 3, 4]
    torch.testing.assert_close(centering.center, torch.tensor([[0.2, 0.3, 0.4]]))
    centering.update(torch.zeros(5, 3))  # mean 0: center shrinks by the momentum
    torch.testing.assert_close(centering.center, torch.tensor([[0.18, 0.27, 0.36]]))


def test_centering_softmax_subtracts_center() -> None:
    centering = Centering(out_dim=3)
    centering.center.copy_(torch.tensor([[5.0, -1.0, 2.0]]))
    temp = 0.04
    logits = centering.center + logits_for(P_HALF, temp)  # (1, 3)
    torch.testing.assert_close(centering.softmax_center(logits, temp), torch.tensor([P_HALF]))


# --- DINO --------------------------------------------------------------------------------------


def test_dino_identical_distributions_give_entropy() -> None:
    loss_fn = DINOLoss(out_dim=3, student_temp=STUDENT_TEMP)
    probs = torch.tensor([P_HALF, P_HALF])  # (B=2, K=3)
    student = logits_for(P_HALF).expand(2, 3)
    # One global crop + one local crop: the only pair is (local student, global teacher).
    loss = loss_fn([student + 7.0, student], [probs])
    assert loss.item() == pytest.approx(ENTROPY_P_HALF, abs=1e-5)
    assert loss.item() == pytest.approx(1.0397, abs=1e-4)


def test_dino_skips_same_view_pairs_and_averages_terms() -> None:
    loss_fn = DINOLoss(out_dim=3, student_temp=STUDENT_TEMP)
    teachers = [one_hot(0)[None], one_hot(1)[None]]  # global views 0 and 1, (1, 3) each
    s0 = logits_for([0.5, 0.25, 0.25])[None]  # CE vs t0 = ln 2 (same view), vs t1 = ln 4
    s1 = logits_for([0.25, 0.5, 0.25])[None]  # CE vs t0 = ln 4, vs t1 = ln 2 (same view)
    loss = loss_fn([s0, s1], teachers)
    # Only the two cross-view terms (ln 4 each); with same-view pairs it would be 1.5 ln 2.
    assert loss.item() == pytest.approx(math.log(4), abs=1e-5)

    s_local = logits_for([0.125, 0.125, 0.75])[None]  # CE vs t0 = ln 8, vs t1 = ln 8
    loss = loss_fn([s0, s1, s_local], teachers)
    expected = (math.log(4) + math.log(4) + math.log(8) + math.log(8)) / 4  # 4 terms
    assert loss.item() == pytest.approx(expected, abs=1e-5)


def test_dino_teacher_probs_list_is_joint_sinkhorn() -> None:
    torch.manual_seed(3)
    loss_fn = DINOLoss(out_dim=8, centering="sinkhorn", sinkhorn_iters=3)
    crops = [torch.randn(4, 8), torch.randn(4, 8)]
    as_list = loss_fn.teacher_probs(crops, teacher_temp=0.07)
    joint = sinkhorn_knopp(torch.cat(crops), temp=0.07, n_iters=3)
    assert isinstance(as_list, list) and len(as_list) == 2
    torch.testing.assert_close(torch.cat(as_list), joint)


def test_dino_center_mode_uses_then_updates_center() -> None:
    loss_fn = DINOLoss(out_dim=3, centering="center", center_momentum=0.9)
    logits = torch.tensor([[1.0, 2.0, 3.0], [3.0, 4.0, 5.0]])
    probs = loss_fn.teacher_probs(logits, teacher_temp=1.0)
    torch.testing.assert_close(probs, F.softmax(logits, dim=-1))  # center was still zero
    torch.testing.assert_close(loss_fn.center.center, torch.tensor([[0.2, 0.3, 0.4]]))


def test_dino_rejects_bad_inputs() -> None:
    with pytest.raises(ValueError, match="centering must be one of"):
        DINOLoss(out_dim=3, centering="softmax")
    loss_fn = DINOLoss(out_dim=3)
    with pytest.raises(ValueError, match="no cross-view pairs"):
        loss_fn([torch.zeros(2, 3)], [torch.zeros(2, 3)])
    with pytest.raises(ValueError, match=r"student_logits\[1\] must be \(B, 3\)"):
        loss_fn([torch.zeros(2, 3), torch.zeros(2, 4)], [torch.zeros(2, 3)])


# --- iBOT --------------------------------------------------------------------------------------


def _ibot_case(n_images: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Image 0: 1 masked patch with CE ln 2; image 1: 10 masked patches with CE ln 4 each."""
    masks = torch.zeros(n_images, 12, dtype=torch.bool)
    masks[0, 5] = True
    masks[1, :10] = True
    n_masked = int(masks.sum())
    teacher = one_hot(0).expand(n_masked, 3)
    student = torch.cat(
        [logits_for([0.5, 0.25, 0.25])[None], logits_for([0.25, 0.5, 0.25]).expand(10, 3)]
    )
    return student, teacher, masks


def test_ibot_weights_each_image_equally() -> None:
    loss_fn = IBOTPatchLoss(out_dim=3, student_temp=STUDENT_TEMP)
    loss = loss_fn(*_ibot_case(n_images=2))
    per_image = (math.log(2) + math.log(4)) / 2
    per_token = (math.log(2) + 10 * math.log(4)) / 11
    assert loss.item() == pytest.approx(per_image, abs=1e-5)
    assert loss.item() != pytest.approx(per_token, abs=1e-2)


def test_ibot_unmasked_image_counts_in_batch_mean() -> None:
    loss_fn = IBOTPatchLoss(out_dim=3, student_temp=STUDENT_TEMP)
    loss = loss_fn(*_ibot_case(n_images=3))  # image 2 has no masked patch (dinov2 convention)
    assert loss.item() == pytest.approx((math.log(2) + math.log(4)) / 3, abs=1e-5)


def test_ibot_teacher_probs_sinkhorn_and_shape_check() -> None:
    torch.manual_seed(4)
    loss_fn = IBOTPatchLoss(out_dim=6, sinkhorn_iters=50)
    probs = loss_fn.teacher_probs(torch.randn(12, 6), teacher_temp=0.5)
    torch.testing.assert_close(probs.sum(dim=0), torch.full((6,), 2.0), atol=1e-3, rtol=0)
    masks = torch.zeros(2, 8, dtype=torch.bool)
    masks[0, :3] = True
    with pytest.raises(ValueError, match=r"masks.sum\(\)=3"):
        loss_fn(torch.zeros(4, 6), torch.zeros(4, 6), masks)


def _ibot_reference(student: torch.Tensor, teacher: torch.Tensor, masks: torch.Tensor,
                    temp: float) -> torch.Tensor:  # fmt: skip
    """The former implementation (boolean indexing, host-side count), kept as the reference."""
    per_token = -(teacher * F.log_softmax(student / temp, dim=-1)).sum(dim=-1)  # (M,)
    per_image_count = masks.sum(dim=-1).clamp(min=1).float()  # (B,)
    weights = (1.0 / per_image_count).unsqueeze(-1).expand_as(masks)[masks]  # (M,)
    return (per_token * weights).sum() / masks.shape[0]


def _random_ibot_case(seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    masks = torch.rand(6, 16, generator=g) < torch.rand(6, 1, generator=g)  # ratios vary
    masks[1] = False  # an image without masked patches
    masks[2] = True  # one fully masked
    n_masked = int(masks.sum())
    student = torch.randn(n_masked, 10, generator=g) * 3
    teacher = torch.softmax(torch.randn(n_masked, 10, generator=g), dim=-1)
    return student, teacher, masks


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ibot_fixed_shape_loss_and_grads_match_the_boolean_index_reference(seed: int) -> None:
    student, teacher, masks = _random_ibot_case(seed)
    loss_fn = IBOTPatchLoss(out_dim=10, student_temp=STUDENT_TEMP)
    s_new = student.clone().requires_grad_(True)
    s_ref = student.clone().requires_grad_(True)
    new = loss_fn(s_new, teacher, masks)
    ref = _ibot_reference(s_ref, teacher, masks, STUDENT_TEMP)
    assert abs(new.item() - ref.item()) <= 1e-6 and ref.item() > 0
    new.backward()
    ref.backward()
    torch.testing.assert_close(s_new.grad, s_ref.grad, atol=1e-7, rtol=1e-5)


def test_ibot_loss_reads_nothing_back_from_the_device() -> None:
    """On the meta device a host read (int(masks.sum()), boolean indexing) would raise: the loss
    runs there, so on a GPU it issues no host sync; and it compiles as one graph."""
    student, teacher, masks = _random_ibot_case(3)
    loss_fn = IBOTPatchLoss(out_dim=10, student_temp=STUDENT_TEMP)
    on_meta = loss_fn(student.to("meta"), teacher.to("meta"), masks.to("meta"))
    assert on_meta.device.type == "meta" and on_meta.shape == ()
    with pytest.raises(Exception, match="meta"):  # what the old count would have done
        int(masks.to("meta").sum())
    explained = torch._dynamo.explain(loss_fn)(student, teacher, masks)
    assert explained.graph_count == 1 and explained.graph_break_count == 0
    compiled = torch.compile(loss_fn, backend="eager", fullgraph=True)
    ref = _ibot_reference(student, teacher, masks, STUDENT_TEMP)
    assert abs(compiled(student, teacher, masks).item() - ref.item()) <= 1e-6


# --- KoLeo -------------------------------------------------------------------------------------


def test_koleo_square_on_unit_circle() -> None:
    # Four directions 90 degrees apart, with different norms (the loss normalises).
    points = torch.tensor([[2.0, 0.0], [0.0, 3.0], [-1.0, 0.0], [0.0, -0.5]])
    loss = KoLeoLoss()(points)
    assert loss.item() == pytest.approx(-math.log(math.sqrt(2) + 1e-8), abs=1e-6)


def test_koleo_asymmetric_nearest_neighbours() -> None:
    angles = torch.deg2rad(torch.tensor([0.0, 10.0, 100.0]))
    points = torch.stack([angles.cos(), angles.sin()], dim=1)
    # NN: 0->10 and 10->0 at chord 2 sin(5 deg); 100->10 at chord 2 sin(45 deg) = sqrt 2.
    d_close = 2 * math.sin(math.radians(5))
    expected = -(2 * math.log(d_close) + math.log(math.sqrt(2))) / 3
    assert KoLeoLoss()(points).item() == pytest.approx(expected, abs=1e-5)


def test_koleo_duplicate_points_have_finite_gradient() -> None:
    points = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]], requires_grad=True)
    KoLeoLoss()(points).backward()
    assert torch.isfinite(points.grad).all()


# --- MAE ---------------------------------------------------------------------------------------


def test_mae_zero_prediction_gives_mean_square_of_masked_targets() -> None:
    target = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]]])  # (B=1, L=3, P=2)
    mask = torch.tensor([[1, 0, 1]])
    pred = torch.zeros_like(target)
    # Per-patch MSE: (1 + 4) / 2 = 2.5 and (25 + 36) / 2 = 30.5 -> mean 16.5.
    assert mae_loss(pred, target, mask).item() == pytest.approx(16.5)
    changed = target.clone()
    changed[0, 1] = 100.0  # the visible patch is not scored
    assert mae_loss(pred, changed, mask).item() == pytest.approx(16.5)


def test_mae_norm_pix_normalises_each_patch() -> None:
    target = torch.tensor([[[1.0, 3.0], [10.0, 30.0]]])
    mask = torch.tensor([[1, 0]])
    # Patch [1, 3]: mean 2, unbiased var 2 -> [-1, 1] / sqrt(2 + 1e-6); zero pred -> 1 / (2 + 1e-6).
    loss = mae_loss(torch.zeros_like(target), target, mask, norm_pix=True)
    assert loss.item() == pytest.approx(1 / (2 + 1e-6), rel=1e-6)


def test_mae_rejects_mask_shape() -> None:
    with pytest.raises(ValueError, match=r"mask must be \(B, L\)"):
        mae_loss(torch.zeros(1, 3, 2), torch.zeros(1, 3, 2), torch.zeros(1, 2))


# --- Focal -------------------------------------------------------------------------------------


def _segmentation_batch() -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(5)
    logits = torch.randn(2, 25, 6, 5)
    labels = torch.randint(0, 25, (2, 6, 5))
    labels[0, :2] = 0  # unlabelled pixels present
    return logits, labels


def test_focal_gamma_zero_equals_cross_entropy() -> None:
    logits, labels = _segmentation_batch()
    focal = FocalLoss(gamma=0.0)(logits, labels)
    expected = F.cross_entropy(logits, labels, ignore_index=0)
    torch.testing.assert_close(focal, expected)


def test_focal_gamma_zero_equals_weighted_cross_entropy() -> None:
    logits, labels = _segmentation_batch()
    weight = torch.linspace(0.2, 3.0, 25)
    focal = FocalLoss(gamma=0.0, weight=weight)(logits, labels.to(torch.uint8))
    expected = F.cross_entropy(logits, labels, weight=weight, ignore_index=0)
    torch.testing.assert_close(focal, expected)


def test_focal_gamma_two_hand_example() -> None:
    # 3 channels (class 0 = unlabelled). Pixel A: label 1, exp(logits) = [1, 3, 1] -> p = 0.6.
    # Pixel B: label 2, exp(logits) = [1, 1, 2] -> p = 0.5. Pixel C: label 0, ignored.
    logits = torch.log(torch.tensor([[1.0, 3.0, 1.0], [1.0, 1.0, 2.0], [50.0, 1.0, 1.0]]))
    logits = logits.t().reshape(1, 3, 1, 3)  # (B, C, H, W)
    labels = torch.tensor([[[1, 2, 0]]])
    loss_a = 0.4**2 * -math.log(0.6)
    loss_b = 0.5**2 * -math.log(0.5)
    assert FocalLoss(gamma=2.0)(logits, labels).item() == pytest.approx(
        (loss_a + loss_b) / 2, rel=1e-5
    )
    weighted = FocalLoss(gamma=2.0, weight=torch.tensor([9.0, 2.0, 0.5]))(logits, labels)
    assert weighted.item() == pytest.approx((2 * loss_a + 0.5 * loss_b) / 2.5, rel=1e-5)


def test_focal_all_unlabelled_is_zero_and_bad_labels_raise() -> None:
    logits = torch.randn(1, 25, 2, 2, requires_grad=True)
    loss = FocalLoss()(logits, torch.zeros(1, 2, 2, dtype=torch.long))
    assert loss.item() == 0.0
    loss.backward()
    assert torch.isfinite(logits.grad).all()
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 24\]"):
        FocalLoss()(logits, torch.full((1, 2, 2), 25))


# --- DDP: statistics are all-reduced across ranks ----------------------------------------------


def _ddp_worker(rank: int, world_size: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world_size)  # fmt: skip
    try:
        torch.manual_seed(6)
        full = torch.randn(16, 8) * 2
        rows = full[:5] if rank == 0 else full[5:]  # uneven split across ranks
        q = sinkhorn_knopp(rows, temp=0.3, n_iters=3)
        centering = Centering(out_dim=8)
        centering.update(rows)
        torch.save({"q": q, "center": centering.center}, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_sinkhorn_and_centering_are_ddp_correct(tmp_path: Path) -> None:
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))
    torch.manual_seed(6)
    full = torch.randn(16, 8) * 2
    torch.testing.assert_close(torch.cat([r0["q"], r1["q"]]), sinkhorn_knopp(full, 0.3, 3))
    single = Centering(out_dim=8)
    single.update(full)
    torch.testing.assert_close(r0["center"], single.center)
    torch.testing.assert_close(r1["center"], single.center)
