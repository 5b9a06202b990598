"""DINO image-level (CLS token) self-distillation loss."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from hsissl.losses.centering import TeacherTargets, soft_cross_entropy

__all__ = ["DINOLoss", "soft_cross_entropy"]


class DINOLoss(TeacherTargets):
    """Cross-entropy between teacher and student CLS-token prototype scores.

    Args:
        out_dim: number of prototypes K.
        student_temp: student softmax temperature.
        center_momentum: EMA momentum, used only with centering="center".
        centering: "sinkhorn" (dinov2 default) or "center" (original DINO EMA).
        sinkhorn_iters: Sinkhorn-Knopp iterations.
    """

    @torch.no_grad()
    def teacher_probs(
        self, teacher_logits: torch.Tensor | Sequence[torch.Tensor], teacher_temp: float
    ) -> torch.Tensor | list[torch.Tensor]:
        """Teacher targets with the configured centering.

        Pass either one (N, K) tensor or a list of (B, K) tensors, one per global
        crop; a list is centered jointly (Sinkhorn over all global crops, as
        dinov2 does) and returned as a list in the same order.
        """
        if isinstance(teacher_logits, torch.Tensor):
            return self.targets(teacher_logits, teacher_temp)
        sizes = [t.shape[0] for t in teacher_logits]
        joint = torch.cat(list(teacher_logits), dim=0)  # (sum B, K)
        probs = self.targets(joint, teacher_temp)
        return list(probs.split(sizes, dim=0))

    def forward(
        self, student_logits: Sequence[torch.Tensor], teacher_probs: Sequence[torch.Tensor]
    ) -> torch.Tensor:
        """Mean over (student crop, teacher crop) pairs of the batch-mean cross-entropy.

        Args:
            student_logits: (B, K) per student crop; the first len(teacher_probs)
                are the global crops, in the same order as teacher_probs.
            teacher_probs: (B, K) per global crop, from `teacher_probs`.

        Pairs of a global crop with its own teacher view are skipped (DINO).
        """
        n_global = len(teacher_probs)
        if n_global == 0 or len(student_logits) < n_global:
            raise ValueError(
                f"DINOLoss: need >= 1 teacher crop and at least as many student crops; got "
                f"{len(student_logits)} student and {n_global} teacher crops"
            )
        for name, tensors in (("student_logits", student_logits), ("teacher_probs", teacher_probs)):
            for i, t in enumerate(tensors):
                if t.ndim != 2 or t.shape[1] != self.out_dim:
                    raise ValueError(
                        f"DINOLoss: {name}[{i}] must be (B, {self.out_dim}), got {tuple(t.shape)}"
                    )
        total = student_logits[0].new_zeros((), dtype=torch.float32)
        n_terms = 0
        for s_idx, s in enumerate(student_logits):
            for t_idx, t in enumerate(teacher_probs):
                if s_idx == t_idx:  # same view: trivially matchable, DINO skips it
                    continue
                total = total + self.cross_entropy(t, s, self.student_temp).mean()
                n_terms += 1
        if n_terms == 0:
            raise ValueError(
                "DINOLoss: no cross-view pairs (1 global crop and no local crops); "
                "pass at least 2 crops"
            )
        return total / n_terms
