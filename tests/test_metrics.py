"""ConfusionMatrix against hand-worked matrices, a pixel-loop reference and a 2-rank gloo run."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from hsissl.data.ohs import CLASS_NAMES, NUM_CLASSES
from hsissl.segment.metrics import ConfusionMatrix

# Hand-worked example: 4 classes (ids 1..4), 0 = unlabelled, class 4 never appears.
TARGET = torch.tensor(
    [[[1, 1, 1, 2],
      [2, 2, 3, 3],
      [0, 0, 1, 3]]]
)  # fmt: skip
PRED = torch.tensor(
    [[[1, 1, 2, 2],
      [2, 3, 3, 3],
      [1, 0, 1, 0]]]
)  # fmt: skip
# (target, pred) pairs; the two target-0 pixels (predicted 1 and 0) are not counted at all.
#   t=1: ->1 x3, ->2 x1         row 1 = [0, 3, 1, 0, 0]
#   t=2: ->2 x2, ->3 x1         row 2 = [0, 0, 2, 1, 0]
#   t=3: ->3 x2, ->0 x1         row 3 = [1, 0, 0, 2, 0]   (predicting 0 is a miss)
# 10 labelled pixels, 7 correct.
HAND_MATRIX = [
    [0, 0, 0, 0, 0],
    [0, 3, 1, 0, 0],
    [0, 0, 2, 1, 0],
    [1, 0, 0, 2, 0],
    [0, 0, 0, 0, 0],
]
# class 1: TP=3 FP=0 (the label-0 pixel predicted 1 is ignored) FN=1 -> IoU 3/4, acc 3/4
# class 2: TP=2 FP=1 (1->2) FN=1 (2->3)                             -> IoU 2/4, acc 2/3
# class 3: TP=2 FP=1 (2->3) FN=1 (3->0)                             -> IoU 2/4, acc 2/3
# class 4: absent from target and prediction                         -> None, None
HAND_IOU = [3 / 4, 2 / 4, 2 / 4, None]
HAND_ACC = [3 / 4, 2 / 3, 2 / 3, None]


def test_hand_worked_example() -> None:
    cm = ConfusionMatrix(num_classes=4)
    cm.update(PRED, TARGET)
    result = cm.compute()
    assert result["matrix"] == HAND_MATRIX
    assert result["pixels"] == 10
    assert result["per_class_iou"] == pytest.approx(HAND_IOU)
    assert result["per_class_acc"] == pytest.approx(HAND_ACC)
    assert result["per_class_iou"][3] is None and result["per_class_acc"][3] is None
    # Means over the three present classes only (class 4 is excluded, not counted as 0 or 1).
    assert result["miou"] == pytest.approx((3 / 4 + 2 / 4 + 2 / 4) / 3)
    assert result["macc"] == pytest.approx((3 / 4 + 2 / 3 + 2 / 3) / 3)
    assert result["oa"] == pytest.approx(7 / 10)


def test_ignored_pixels_do_not_count_even_where_predicted() -> None:
    cm = ConfusionMatrix(num_classes=4)
    target = torch.zeros(2, 5, 5, dtype=torch.int64)
    pred = torch.randint(0, 5, (2, 5, 5))
    cm.update(pred, target)
    assert cm.compute()["pixels"] == 0
    assert int(cm.matrix.sum()) == 0
    assert cm.compute()["miou"] is None and cm.compute()["oa"] is None
    # Adding the hand example on top gives exactly the hand example.
    cm.update(PRED, TARGET)
    assert cm.compute()["matrix"] == HAND_MATRIX


def test_class_only_predicted_has_iou_zero_and_no_accuracy() -> None:
    # Target is all class 1; two pixels are predicted 2. Class 3 is absent everywhere.
    target = torch.ones(1, 2, 4, dtype=torch.int64)
    pred = torch.tensor([[[1, 1, 2, 1], [1, 2, 1, 1]]])
    cm = ConfusionMatrix(num_classes=3)
    cm.update(pred, target)
    result = cm.compute()
    # class 1: TP=6 FN=2 FP=0 -> IoU 6/8; class 2: TP=0 FP=2 -> IoU 0 (present in pred), acc None
    assert result["per_class_iou"] == [6 / 8, 0.0, None]
    assert result["per_class_acc"] == [6 / 8, None, None]
    assert result["miou"] == pytest.approx((6 / 8 + 0.0) / 2)
    assert result["macc"] == pytest.approx(6 / 8)


def test_accumulating_batches_equals_one_update() -> None:
    g = torch.Generator().manual_seed(0)
    target = torch.randint(0, 25, (6, 16, 16), generator=g)
    pred = torch.randint(0, 25, (6, 16, 16), generator=g)
    whole = ConfusionMatrix()
    whole.update(pred, target)
    parts = ConfusionMatrix()
    for sl in (slice(0, 1), slice(1, 4), slice(4, 6)):
        parts.update(pred[sl], target[sl])
    assert torch.equal(parts.matrix, whole.matrix)
    assert parts.compute() == whole.compute()
    merged = ConfusionMatrix()
    for sl in (slice(0, 3), slice(3, 6)):
        part = ConfusionMatrix()
        part.update(pred[sl], target[sl])
        merged.merge(part)
    assert torch.equal(merged.matrix, whole.matrix)


def _reference(pred: np.ndarray, target: np.ndarray, k: int) -> dict:
    """Per-pixel counting with plain loops: the independent check of compute()."""
    matrix = [[0] * (k + 1) for _ in range(k + 1)]
    for t, p in zip(target.ravel().tolist(), pred.ravel().tolist(), strict=True):
        if t != 0:
            matrix[t][p] += 1
    ious, accs = [], []
    for c in range(1, k + 1):
        tp = matrix[c][c]
        fn = sum(matrix[c]) - tp
        fp = sum(matrix[r][c] for r in range(1, k + 1)) - tp
        ious.append(tp / (tp + fp + fn) if tp + fp + fn else None)
        accs.append(tp / (tp + fn) if tp + fn else None)
    pixels = sum(map(sum, matrix))
    present_iou = [v for v in ious if v is not None]
    present_acc = [v for v in accs if v is not None]
    return {
        "matrix": matrix,
        "per_class_iou": ious,
        "per_class_acc": accs,
        "miou": sum(present_iou) / len(present_iou),
        "macc": sum(present_acc) / len(present_acc),
        "oa": sum(matrix[c][c] for c in range(1, k + 1)) / pixels,
        "pixels": pixels,
    }


def test_matches_pixel_loop_reference_on_random_data() -> None:
    rng = np.random.default_rng(1)
    # Targets use ids 0..20, predictions 0..18: classes 21..24 are absent from both.
    target = rng.integers(0, 21, size=(3, 20, 23))
    pred = rng.integers(0, 19, size=(3, 20, 23))
    cm = ConfusionMatrix()
    cm.update(torch.from_numpy(pred), torch.from_numpy(target).to(torch.uint8))
    result = cm.compute()
    expected = _reference(pred, target, NUM_CLASSES)
    assert result["per_class_iou"][-4:] == [None] * 4
    for key, value in expected.items():
        assert result[key] == value, key


def test_state_dict_roundtrip_reset_and_table() -> None:
    cm = ConfusionMatrix(num_classes=4)
    cm.update(PRED, TARGET)
    restored = ConfusionMatrix(num_classes=4)
    restored.load_state_dict(cm.state_dict())
    assert restored.compute() == cm.compute()
    with pytest.raises(ValueError, match="num_classes"):
        ConfusionMatrix(num_classes=5).load_state_dict(cm.state_dict())
    cm.reset()
    assert cm.compute()["pixels"] == 0

    full = ConfusionMatrix()
    full.update(torch.tensor([[[1, 24]]]), torch.tensor([[[1, 24]]]))
    rows = full.table()
    assert len(rows) == NUM_CLASSES == 24
    assert rows[0] == (1, CLASS_NAMES[1], 1.0, 1.0)
    assert rows[-1] == (24, "Ocean", 1.0, 1.0)
    assert rows[1] == (2, "Dry farm", None, None)


def test_bad_inputs_are_named() -> None:
    cm = ConfusionMatrix(num_classes=4)
    with pytest.raises(ValueError, match=r"pred holds ids in \[0, 5\]"):
        cm.update(torch.tensor([[0, 5]]), torch.tensor([[1, 1]]))
    with pytest.raises(ValueError, match="target shape"):
        cm.update(torch.zeros(1, 2, 2, dtype=torch.long), torch.zeros(1, 2, 3, dtype=torch.long))
    with pytest.raises(TypeError, match="float32"):
        cm.update(torch.zeros(1, 2, 2), torch.zeros(1, 2, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="merge"):
        cm.merge(ConfusionMatrix(num_classes=3))
    assert int(cm.matrix.sum()) == 0  # failed updates count nothing


def test_all_reduce_is_noop_without_distributed() -> None:
    cm = ConfusionMatrix(num_classes=4)
    cm.update(PRED, TARGET)
    assert cm.all_reduce().compute()["matrix"] == HAND_MATRIX


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_counts_on_cuda_match_cpu() -> None:
    cm = ConfusionMatrix(num_classes=4)
    cm.update(PRED.cuda(), TARGET.cuda())
    assert cm.matrix.device.type == "cuda"
    assert cm.compute()["matrix"] == HAND_MATRIX


def _rank_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        pred, target = _ddp_data()
        half = pred.shape[0] // world
        cm = ConfusionMatrix()
        cm.update(pred[rank * half : (rank + 1) * half], target[rank * half : (rank + 1) * half])
        cm.all_reduce()
        torch.save(cm.matrix, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _ddp_data() -> tuple[torch.Tensor, torch.Tensor]:
    """(pred, target), the same in every process."""
    g = torch.Generator().manual_seed(7)
    pred = torch.randint(0, 25, (4, 32, 32), generator=g)
    target = torch.randint(0, 25, (4, 32, 32), generator=g)
    return pred, target


def test_all_reduce_over_two_gloo_ranks_equals_single_process(tmp_path: Path) -> None:
    mp.spawn(_rank_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    single = ConfusionMatrix()
    single.update(*_ddp_data())
    for rank in range(2):
        reduced = torch.load(tmp_path / f"rank{rank}.pt")
        assert torch.equal(reduced, single.matrix), f"rank {rank}"
