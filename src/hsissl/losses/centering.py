"""Teacher-output centering for DINO/iBOT: Sinkhorn-Knopp and EMA centering.

Both keep the teacher from collapsing onto one prototype. Sinkhorn-Knopp
(dinov2's default, Ruan et al. 2023) balances prototype usage within the batch;
EMA centering (original DINO) subtracts a running mean of the teacher logits.
Both are DDP-correct: when torch.distributed is initialised, the statistics are
all-reduced so every rank sees the global batch.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _all_reduce(tensor: torch.Tensor, op_max: bool = False) -> None:
    """In-place all-reduce (sum, or max) across ranks; a no-op in a single process."""
    if _distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX if op_max else dist.ReduceOp.SUM)


def _check_logits(teacher_logits: torch.Tensor, where: str) -> None:
    if teacher_logits.ndim != 2:
        raise ValueError(
            f"{where}: teacher_logits must be (B, K), got shape {tuple(teacher_logits.shape)}"
        )


def _logsumexp_over_ranks(x: torch.Tensor, dim: int) -> torch.Tensor:
    """logsumexp along `dim`, where `dim` is split across ranks (the sample axis)."""
    peak = x.amax(dim=dim, keepdim=True)
    _all_reduce(peak, op_max=True)
    sum_exp = torch.exp(x - peak).sum(dim=dim, keepdim=True)
    _all_reduce(sum_exp)
    return peak + torch.log(sum_exp)


@torch.no_grad()
def sinkhorn_knopp(teacher_logits: torch.Tensor, temp: float, n_iters: int = 3) -> torch.Tensor:
    """Sinkhorn-Knopp assignment of B samples to K prototypes (dinov2 / SwAV).

    The iteration of dinov2's `sinkhorn_knopp_teacher`, in log space so that large logits /
    small temperatures cannot overflow exp() or leave a prototype with an all-zero row (0/0 =
    NaN). Its normalisations are kept as two potentials, a (K,) per prototype and c (B,) per
    sample, with log Q = logits / temp - a - c: each half-step reads the (B, K) scores once and
    writes one vector (under torch.compile, one fused reduction), instead of rewriting Q.

    Args:
        teacher_logits: (B, K) teacher head outputs; B may differ between ranks.
        temp: teacher temperature.
        n_iters: alternating prototype/sample normalisations (>= 1).

    Returns:
        (B, K) float32 assignment probabilities: each row sums to 1; with enough
        iterations each column sums to B_total / K (every prototype equally used).
    """
    _check_logits(teacher_logits, "sinkhorn_knopp")
    if n_iters < 1:
        raise ValueError(f"sinkhorn_knopp: n_iters must be >= 1, got {n_iters}")
    scores = teacher_logits.float() / temp  # (B, K): log of exp(logits / temp)
    n_prototypes = scores.shape[1]
    n_samples = torch.full((), float(scores.shape[0]), device=scores.device)  # no host sync
    _all_reduce(n_samples)  # global B, also right when ranks hold different counts
    log_k, log_b = math.log(n_prototypes), torch.log(n_samples)
    sample_pot = scores.new_zeros(scores.shape[0], 1)  # c: (B, 1)
    # dinov2 first divides Q by its total; the first prototype normalisation absorbs that.
    for i in range(n_iters):
        # Each prototype gets total mass 1/K across the global batch.
        proto_pot = _logsumexp_over_ranks(scores - sample_pot, dim=0) + log_k  # a: (1, K)
        if i + 1 < n_iters:
            # Each sample gets mass 1/B (samples are local, so no reduce needed).
            sample_pot = torch.logsumexp(scores - proto_pot, dim=1, keepdim=True) + log_b
    # The last sample normalisation times B is a row softmax: exact row sums, however large
    # the scores (exp(scores - a - c) would lose digits to the cancellation).
    return torch.softmax(scores - proto_pot, dim=1)  # (B, K)


class Centering(nn.Module):
    """EMA centering of teacher logits (original DINO): softmax((x - c) / temp).

    The center c is updated as c <- m * c + (1 - m) * mean(x) over all rows of
    the (global) batch.
    """

    center: torch.Tensor

    def __init__(self, out_dim: int, momentum: float = 0.9) -> None:
        super().__init__()
        self.momentum = momentum
        self.register_buffer("center", torch.zeros(1, out_dim))  # (1, K)

    @torch.no_grad()
    def softmax_center(self, teacher_logits: torch.Tensor, temp: float) -> torch.Tensor:
        """(N, K) logits -> (N, K) probabilities, centered with the current EMA center."""
        _check_logits(teacher_logits, "Centering.softmax_center")
        return F.softmax((teacher_logits.float() - self.center) / temp, dim=-1)

    @torch.no_grad()
    def update(self, teacher_logits: torch.Tensor) -> None:
        """Move the center towards the mean of (N, K) teacher logits (all ranks' rows)."""
        _check_logits(teacher_logits, "Centering.update")
        if teacher_logits.shape[1] != self.center.shape[1]:
            raise ValueError(
                f"Centering.update: expected {self.center.shape[1]} logits per row, "
                f"got {teacher_logits.shape[1]}"
            )
        row_sum = teacher_logits.float().sum(dim=0, keepdim=True)  # (1, K)
        n_rows = torch.full((), float(teacher_logits.shape[0]), device=row_sum.device)
        _all_reduce(row_sum)
        _all_reduce(n_rows)
        batch_mean = row_sum / n_rows
        self.center.mul_(self.momentum).add_(batch_mean * (1.0 - self.momentum))


CENTERING_MODES = ("sinkhorn", "center")


def check_centering_mode(centering: str, where: str) -> None:
    """Raise a clear error for an unknown centering option."""
    if centering not in CENTERING_MODES:
        raise ValueError(f"{where}: centering must be one of {CENTERING_MODES}, got {centering!r}")


@torch.no_grad()
def teacher_softmax(
    teacher_logits: torch.Tensor,
    temp: float,
    center: Centering | None,
    n_iters: int,
    sinkhorn: Callable[..., torch.Tensor] = sinkhorn_knopp,
) -> torch.Tensor:
    """Teacher targets: Sinkhorn-Knopp when `center` is None, else EMA-centered softmax.

    With EMA centering the center is updated with this batch after it is used,
    so the targets depend only on earlier batches (as in DINO). `sinkhorn`: the implementation
    to run (`TeacherTargets.compile_kernels` passes a compiled one).
    """
    if center is None:
        return sinkhorn(teacher_logits, temp, n_iters)
    probs = center.softmax_center(teacher_logits, temp)
    center.update(teacher_logits)
    return probs


class TeacherTargets(nn.Module):
    """Shared set-up of the DINO and iBOT losses: student temperature and teacher centering.

    Args:
        out_dim: number of prototypes K.
        student_temp: student softmax temperature.
        center_momentum: EMA momentum, used only with centering="center".
        centering: "sinkhorn" (dinov2 default) or "center" (original DINO EMA).
        sinkhorn_iters: Sinkhorn-Knopp iterations.
    """

    def __init__(
        self,
        out_dim: int,
        student_temp: float = 0.1,
        center_momentum: float = 0.9,
        centering: str = "sinkhorn",
        sinkhorn_iters: int = 3,
    ) -> None:
        super().__init__()
        check_centering_mode(centering, type(self).__name__)
        self.out_dim = out_dim
        self.student_temp = student_temp
        self.centering = centering
        self.sinkhorn_iters = sinkhorn_iters
        self.center = Centering(out_dim, center_momentum) if centering == "center" else None
        # The (N, K) kernels of the loss; compile_kernels swaps in compiled versions.
        self.sinkhorn: Callable[..., torch.Tensor] = sinkhorn_knopp
        self.cross_entropy: Callable[..., torch.Tensor] = soft_cross_entropy

    def compile_kernels(self, **options: Any) -> None:
        """torch.compile the Sinkhorn-Knopp targets and the soft cross-entropy (dynamic row
        count): each is a dozen passes over an (N, K) float32 matrix in eager mode (for iBOT N is
        ~10,000 masked tokens and K 65,536 prototypes: 2.6 GB a pass), fused into a few."""
        self.sinkhorn = torch.compile(sinkhorn_knopp, **{"dynamic": True, **options})
        self.cross_entropy = torch.compile(soft_cross_entropy, **{"dynamic": True, **options})

    def targets(self, teacher_logits: torch.Tensor, temp: float) -> torch.Tensor:
        """(N, K) teacher probabilities with the configured centering."""
        return teacher_softmax(teacher_logits, temp, self.center, self.sinkhorn_iters,
                               self.sinkhorn)  # fmt: skip


def soft_cross_entropy(
    teacher_probs: torch.Tensor, student_logits: torch.Tensor, student_temp: float
) -> torch.Tensor:
    """Per-row -sum(t * log_softmax(s / temp)): (..., K), (..., K) -> (...)."""
    log_probs = F.log_softmax(student_logits.float() / student_temp, dim=-1)
    return -(teacher_probs.float() * log_probs).sum(dim=-1)
