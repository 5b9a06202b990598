"""iBOT masked-patch self-distillation loss."""

from __future__ import annotations

import torch

from hsissl.losses.centering import TeacherTargets


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
        return self.targets(teacher_patch_logits, teacher_temp)

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
                On the data's device: nothing is read back to the host (no sync), so
                M = masks.sum() is checked only for CPU masks.
        """
        if masks.ndim != 2 or masks.dtype != torch.bool:
            raise ValueError(
                f"IBOTPatchLoss: masks must be a (B, N) bool tensor, got "
                f"{tuple(masks.shape)} {masks.dtype}"
            )
        n_masked = student_patch_logits.shape[0]  # M, static: no count read back from the GPU
        if _can_count(masks):  # CPU masks: checking M against masks.sum() costs no GPU sync
            n_masked = int(masks.sum())
        expected = (n_masked, self.out_dim)
        for name, t in (("student", student_patch_logits), ("teacher", teacher_patch_probs)):
            if tuple(t.shape) != expected:
                raise ValueError(
                    f"IBOTPatchLoss: {name} patch tensor must be (masks.sum()={n_masked}, "
                    f"{self.out_dim}), got {tuple(t.shape)}"
                )
        per_token = self.cross_entropy(teacher_patch_probs, student_patch_logits, self.student_temp)
        return masked_image_mean(per_token, masks)


def masked_image_mean(per_token: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Mean over the B images of each image's mean over its masked tokens (0 if it has none).

    per_token (M,) values of the masked tokens in row-major order of masks (B, N) bool. Fixed
    shapes, no host sync: every token gets the index of its image from the per-image counts
    (``repeat_interleave`` with the static output size M) and the weight ``1 / clamp(count, 1)``
    of that image; the weighted tokens are summed and divided by B (the same sum, in the same
    order, as boolean indexing gave, without its data-dependent shape).
    """
    counts = masks.sum(dim=-1)  # (B,) masked tokens per image
    weights = 1.0 / counts.clamp(min=1).to(per_token.dtype)  # (B,)
    image = torch.arange(len(counts), device=masks.device)
    image = image.repeat_interleave(counts, output_size=per_token.shape[0])  # (M,)
    return (per_token * weights[image]).sum() / masks.shape[0]


def _can_count(masks: torch.Tensor) -> bool:
    """Whether masks.sum() can be read on the host for free: CPU tensors, outside compilation."""
    return masks.device.type == "cpu" and not torch.compiler.is_compiling()
