"""The one segmentation metrics accumulator: a confusion matrix, summed on any device.

Layout: ``matrix[t, p]`` counts labelled pixels with ground truth ``t`` predicted as ``p``;
rows and columns are raw label ids ``0..num_classes``. Pixels whose ground truth is
``ignore_index`` (0 = unlabelled in WHU-OHS) are dropped before counting, so that row stays
zero; the ``ignore_index`` column is kept, so a prediction of 0 on a labelled pixel counts as
a miss (a false negative for the true class, a false positive for no class).

Classes absent from both ground truth and prediction are reported as ``None`` and left out
of the means: counting them as 0 (or 1) would make mIoU depend on which classes a test set
happens to contain.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from hsissl.data.ohs import CLASS_NAMES, IGNORE_INDEX, NUM_CLASSES


class ConfusionMatrix:
    """Accumulates a ``(num_classes + 1, num_classes + 1)`` int64 confusion matrix."""

    def __init__(
        self,
        num_classes: int = NUM_CLASSES,
        ignore_index: int = IGNORE_INDEX,
        device: torch.device | str | None = None,
    ) -> None:
        """``device=None`` follows the device of the first ``update`` (CPU until then)."""
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if not 0 <= ignore_index <= num_classes:
            raise ValueError(
                f"ignore_index must be a label id in 0..{num_classes}, got {ignore_index}"
            )
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self._follow_input = device is None
        size = num_classes + 1
        self.matrix = torch.zeros(size, size, dtype=torch.int64, device=device)  # (t, p)

    @property
    def class_ids(self) -> list[int]:
        """The scored label ids, in order (1..24 for WHU-OHS)."""
        return [c for c in range(self.num_classes + 1) if c != self.ignore_index]

    def reset(self) -> None:
        """Zero the counts (keeps the device)."""
        self.matrix.zero_()

    @torch.no_grad()
    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        """Count one batch: ``pred`` and ``target`` are integer label maps of equal shape (B, H, W)."""
        if pred.shape != target.shape:
            raise ValueError(
                f"pred shape {tuple(pred.shape)} != target shape {tuple(target.shape)}; "
                "expected integer label maps of equal shape (B, H, W)"
            )
        for name, t in (("pred", pred), ("target", target)):
            if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
                raise TypeError(f"{name} must hold integer class ids, got dtype {t.dtype}")
        if self._follow_input:
            self.matrix = self.matrix.to(target.device)
        device = self.matrix.device
        target = target.reshape(-1).to(device=device, dtype=torch.int64)  # (P,)
        pred = pred.reshape(-1).to(device=device, dtype=torch.int64)  # (P,)
        if target.numel() == 0:
            return
        k = self.num_classes
        for name, t in (("pred", pred), ("target", target)):
            lo, hi = int(t.min()), int(t.max())
            if lo < 0 or hi > k:
                raise ValueError(f"{name} holds ids in [{lo}, {hi}]; expected ids in 0..{k}")
        keep = target != self.ignore_index
        index = target[keep] * (k + 1) + pred[keep]  # flat (t, p) cell per labelled pixel
        counts = torch.bincount(index, minlength=(k + 1) ** 2)
        self.matrix += counts.view(k + 1, k + 1)

    def merge(self, other: ConfusionMatrix) -> ConfusionMatrix:
        """Add another accumulator's counts into this one (e.g. per-worker partials)."""
        if (other.num_classes, other.ignore_index) != (self.num_classes, self.ignore_index):
            raise ValueError(
                f"cannot merge ConfusionMatrix(num_classes={other.num_classes}, "
                f"ignore_index={other.ignore_index}) into ConfusionMatrix("
                f"num_classes={self.num_classes}, ignore_index={self.ignore_index})"
            )
        self.matrix += other.matrix.to(self.matrix.device)
        return self

    def all_reduce(self) -> ConfusionMatrix:
        """Sum the matrix over DDP ranks in place (no-op without torch.distributed).

        Call it once, after the last ``update`` on every rank: a second call would add the
        already-summed counts again. With NCCL the matrix must live on this rank's GPU.
        """
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(self.matrix, op=dist.ReduceOp.SUM)
        return self

    def state_dict(self) -> dict[str, Any]:
        """Counts and layout, on CPU (for checkpoints)."""
        return {
            "num_classes": self.num_classes,
            "ignore_index": self.ignore_index,
            "matrix": self.matrix.detach().cpu().clone(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore counts saved by :meth:`state_dict` (layout must match)."""
        layout = (state.get("num_classes"), state.get("ignore_index"))
        if layout != (self.num_classes, self.ignore_index):
            raise ValueError(
                f"state has (num_classes, ignore_index)={layout}; this ConfusionMatrix "
                f"expects {(self.num_classes, self.ignore_index)}"
            )
        matrix = torch.as_tensor(state["matrix"], dtype=torch.int64)
        if matrix.shape != self.matrix.shape:
            raise ValueError(
                f"state matrix has shape {tuple(matrix.shape)}; expected {tuple(self.matrix.shape)}"
            )
        self.matrix = matrix.to(self.matrix.device).clone()

    def compute(self) -> dict[str, Any]:
        """Metrics from the counts so far.

        Returns ``per_class_iou`` / ``per_class_acc`` (one entry per id in :attr:`class_ids`;
        IoU = TP / (TP + FP + FN), ``None`` for a class absent from both ground truth and
        prediction; accuracy = TP / (TP + FN), ``None`` where the class has no ground-truth
        pixel), ``miou`` / ``macc`` (means over the non-``None`` entries), ``oa`` (correct /
        labelled pixels), ``pixels`` (labelled pixels counted) and ``matrix`` (nested list,
        rows = ground truth id, columns = predicted id). Empty means are ``None``.
        """
        m = self.matrix.detach().cpu().to(torch.float64)  # (K+1, K+1) = (t, p)
        tp = m.diagonal()  # (K+1,)
        gt = m.sum(dim=1)  # pixels of each true class
        predicted = m.sum(dim=0)  # labelled pixels predicted as each class
        ious: list[float | None] = []
        accs: list[float | None] = []
        for c in self.class_ids:
            union = gt[c] + predicted[c] - tp[c]  # TP + FP + FN
            ious.append(float(tp[c] / union) if union > 0 else None)
            accs.append(float(tp[c] / gt[c]) if gt[c] > 0 else None)
        pixels = int(self.matrix.sum())
        correct = float(sum(tp[c] for c in self.class_ids))
        return {
            "per_class_iou": ious,
            "per_class_acc": accs,
            "miou": _mean(ious),
            "macc": _mean(accs),
            "oa": correct / pixels if pixels else None,
            "pixels": pixels,
            "matrix": self.matrix.detach().cpu().tolist(),
        }

    def table(self) -> list[tuple[int, str, float | None, float | None]]:
        """Rows ``(class id, class name, IoU, accuracy)`` for a per-class report."""
        result = self.compute()
        return [
            (c, self._name(c), iou, acc)
            for c, iou, acc in zip(
                self.class_ids, result["per_class_iou"], result["per_class_acc"], strict=True
            )
        ]

    def _name(self, class_id: int) -> str:
        # CLASS_NAMES is indexed by WHU-OHS label id; other layouts get generic names.
        if (self.num_classes, self.ignore_index) == (NUM_CLASSES, IGNORE_INDEX):
            return CLASS_NAMES[class_id]
        return f"class {class_id}"


def _mean(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return sum(present) / len(present) if present else None
