"""iBOT masked-patch self-distillation loss."""

from __future__ import annotations

import torch

from hsissl.losses.centering import TeacherTargets, teacher_softmax
from hsissl.losses.dino import soft_cross_entropy


class IBOTPatchLoss(TeacherTargets):
    """Cross-entropy between teacher and student patch scores at masked positions.

    Each image's masked tokens are averaged first, then images are averaged, so
    an image with 1 masked patch weighs as much as one with 10. As in dinov2
    (`forward_masked`), the final division is by the full batch size B: images
    with no masked patch contribute 0 but still count.

    Args:
        out_dim: number of patch prototypes K.
        student_temp: student softmax temperature.
        center_momentum: EMA momentum, used only with centering="center".
        centering: "sinkhorn" (dinov2 default) or "center".
        sinkhorn_iters: Sinkhorn-Knopp iterations.
    """

    @torch.no_grad()
    def teacher_probs(
        self, teacher_patch_logits: torch.Tensor, teacher_temp: float
    ) -> torch.Tensor:
        """(M, K) teacher logits of the masked tokens -> (M, K) targets.

        Sinkhorn-Knopp runs over the masked tokens of all images (and all ranks).
        """
        return teacher_softmax(teacher_patch_logits, teacher_temp, self.center, self.sinkhorn_iters)

    def forward(
        self,
        student_patch_logits: torch.Tensor,
        teacher_patch_probs: torch.Tensor,
        masks: torch.Tensor,
    ) -> torch.Tensor:
        """Per-image-averaged masked-patch cross-entropy.

        Args:
            student_patch_logits: (M, K) student scores of the masked tokens,
                in row-major order of `masks` (i.e. `tokens[masks]`).
            teacher_patch_probs: (M, K) teacher targets for the same tokens.
            masks: (B, N) bool, True where the student's patch was masked; M = masks.sum().
        """
        if masks.ndim != 2 or masks.dtype != torch.bool:
            raise ValueError(
                f"IBOTPatchLoss: masks must be a (B, N) bool tensor, got "
                f"{tuple(masks.shape)} {masks.dtype}"
            )
        n_masked = int(masks.sum())
        expected = (n_masked, self.out_dim)
        for name, t in (("student", student_patch_logits), ("teacher", teacher_patch_probs)):
            if tuple(t.shape) != expected:
                raise ValueError(
                    f"IBOTPatchLoss: {name} patch tensor must be (masks.sum()={n_masked}, "
                    f"{self.out_dim}), got {tuple(t.shape)}"
                )
        per_token = soft_cross_entropy(teacher_patch_probs, student_patch_logits, self.student_temp)
        per_image_count = masks.sum(dim=-1).clamp(min=1).float()  # (B,)
        # Weight each masked token by 1 / (#masked in its image); same order as tokens[masks].
        weights = (1.0 / per_image_count).unsqueeze(-1).expand_as(masks)[masks]  # (M,)
        return (per_token * weights).sum() / masks.shape[0]
