"""Where a training step's time goes: the top kernels (or CPU ops) and how busy the GPU is.

Used by ``bench_train.py --profile DIR``. A GPU that is busy for much less than the wall time
is waiting for the host (launch overhead, syncs, data); a busy GPU with a small matrix-multiply
share is spending its time in memory-bound kernels (norms, activations, copies).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

# Kernel-name fragments of dense matrix products (cuBLAS, cuBLASLt, CUTLASS, Triton mm templates).
GEMM_NAMES = ("gemm", "xmma", "cutlass", "nvjet", "matmul", "triton_tem_fused_mm", "_mm_")


def _device_us(event: Any) -> float:
    """Self device time of one averaged event in microseconds (attribute renamed in torch 2.4)."""
    for name in ("self_device_time_total", "self_cuda_time_total"):
        if hasattr(event, name):
            return float(getattr(event, name))
    return 0.0


def _table(events: Any, cuda: bool, rows: int) -> str:
    keys = ("self_device_time_total", "self_cuda_time_total") if cuda else ("self_cpu_time_total",)
    for key in keys:
        try:
            return events.table(sort_by=key, row_limit=rows)
        except (AttributeError, KeyError, ValueError):
            continue
    return events.table(row_limit=rows)


def profile_steps(step: Callable[[], Any], steps: int, device: torch.device, path: Path,
                  title: str, rows: int = 30) -> dict[str, Any]:  # fmt: skip
    """Run ``step`` ``steps`` times under the profiler; write the top ``rows`` kernels (CUDA) or
    ops (CPU) by self time to ``path``; return the GPU busy fraction and the matmul share of GPU
    time (both None on the CPU). The profiler slows the host a little, so the busy fraction is
    a lower bound."""
    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    if cuda:
        torch.cuda.synchronize(device)
    with profile(activities=activities) as prof:
        start = time.perf_counter()
        for _ in range(steps):
            step()
        if cuda:
            torch.cuda.synchronize(device)
        wall_us = (time.perf_counter() - start) * 1e6
    events = prof.key_averages()
    kernels = [e for e in events if getattr(e, "device_type", None) == DeviceType.CUDA]
    kernel_us = sum(_device_us(e) for e in kernels)
    gemm_us = sum(_device_us(e) for e in kernels if any(g in e.key.lower() for g in GEMM_NAMES))
    stats = {
        "profiled_steps": steps,
        "step_ms": wall_us / steps / 1e3,
        "gpu_busy": kernel_us / wall_us if cuda else None,
        "gemm_share": gemm_us / kernel_us if kernel_us else None,
    }
    lines = [f"# {title}", f"# {steps} steps, {stats['step_ms']:.1f} ms/step under the profiler"]
    if stats["gemm_share"] is not None:
        lines.append(f"# GPU busy {stats['gpu_busy']:.1%} of wall time; matrix products "
                     f"{stats['gemm_share']:.1%} of GPU time")  # fmt: skip
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n" + _table(events, cuda, rows) + "\n")
    return stats | {"profile": str(path)}
