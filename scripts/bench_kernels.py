"""The kernels behind the pretraining levers of issue #19, timed alone at the real shapes.

    PYTHONPATH=src python scripts/bench_kernels.py [--json OUT] [--tiny]

Each lever is timed against what it replaced, forward + backward where training needs both:
- patch embedding: timm's strided convolution vs ``MatmulPatchEmbed`` (one GEMM);
- SS-ViT token fusion: two 1x1 Conv1d over the token axis vs one matrix product;
- attention: each fused scaled-dot-product kernel (cuDNN, flash, memory-efficient, math) at the
  sequence lengths of MAE's encoder (17 tokens) and decoder (65), DINOv2's global (65) and local
  (17) crops and SS-ViT's streams (69, 21);
- DINO targets and loss over K = 65,536 prototypes: the old Sinkhorn-Knopp (rewrites the matrix
  at every half-step), the one on potentials, eager and compiled, and the soft cross-entropy.

Milliseconds are medians of CUDA-event timings after warm-up. On a CPU (``--tiny`` shapes) the
script only shows that it runs. Needs torch and timm only.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from timm.layers import PatchEmbed
from torch.nn.attention import SDPBackend, sdpa_kernel

from hsissl.losses.centering import sinkhorn_knopp, soft_cross_entropy
from hsissl.models.patch_embed import MatmulPatchEmbed
from hsissl.models.ssvit import TokenFusion

BACKENDS = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
            "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}  # fmt: skip
# (name, batch, heads, tokens, head dim) at batch 512, ViT-B (12 heads of 64; MAE decoder 16 of 32)
ATTENTION = [("mae encoder", 512, 12, 17, 64), ("mae decoder", 512, 16, 65, 32),
             ("dinov2 global", 1024, 12, 65, 64), ("dinov2 local", 4096, 12, 17, 64),
             ("ssvit spatial", 1024, 12, 69, 64), ("ssvit spectral", 1024, 12, 21, 64)]  # fmt: skip
PROTOTYPES = 65_536
TARGET_ROWS = [("dino cls", 1024), ("ibot patches", 10_240)]  # 2 x 512 crops; ~15 % of 65,536


def legacy_sinkhorn(logits: torch.Tensor, temp: float, n_iters: int = 3) -> torch.Tensor:
    """The iteration before issue #19: rewrites the (K, B) matrix at every half-step."""
    log_q = (logits.float() / temp).t()
    log_k, log_b = math.log(log_q.shape[0]), math.log(log_q.shape[1])
    for _ in range(n_iters):
        log_q = log_q - torch.logsumexp(log_q, dim=1, keepdim=True) - log_k
        log_q = log_q - torch.logsumexp(log_q, dim=0, keepdim=True) - log_b
    return torch.exp(log_q + log_b).t()


def time_ms(fn: Callable[[], Any], device: torch.device, reps: int, warmup: int = 2) -> float:
    """Median milliseconds of ``fn()`` (CUDA events on a GPU, wall clock on the CPU)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def fwd_bwd(fn: Callable[..., torch.Tensor], *args: Any) -> Callable[[], None]:
    """A call of ``fn(*args)`` and its backward pass."""

    def run() -> None:
        fn(*args).float().sum().backward()

    return run


def bench_patch_embed(device: torch.device, batch: int, dim: int, reps: int) -> dict[str, float]:
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    conv = PatchEmbed(64, 8, 32, dim, output_fmt="NHWC", strict_img_size=False).to(device)
    mine = MatmulPatchEmbed(64, 8, 32, dim, output_fmt="NHWC", strict_img_size=False).to(device)
    mine.load_state_dict(conv.state_dict())
    x = torch.randn(batch, 32, 64, 64, device=device)  # the input needs no gradient (as in MAE)
    out = {}
    for name, module in (("conv (timm)", conv), ("matmul (hsissl)", mine)):
        with torch.autocast(device.type, dtype, enabled=device.type == "cuda"):
            out[name] = time_ms(fwd_bwd(module, x), device, reps)
    return out


def bench_token_fusion(device: torch.device, batch: int, dim: int, reps: int) -> dict[str, float]:
    """SS-ViT's fusion (69 + 21 tokens -> 69 and 21): two Conv1d(k=1) vs one matrix product."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    fusion = TokenFusion(69, 21).to(device)
    spatial = torch.randn(batch, 69, dim, device=device, requires_grad=True)
    spectral = torch.randn(batch, 21, dim, device=device, requires_grad=True)

    def convs(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        x = torch.cat([a, b], dim=1)
        return torch.cat([a + fusion.to_spatial(x), b + fusion.to_spectral(x)], dim=1)

    def matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.cat(fusion(a, b), dim=1)

    out = {}
    for name, fn in (("conv1d k=1 (before)", convs), ("matmul (hsissl)", matmul)):
        with torch.autocast(device.type, dtype, enabled=device.type == "cuda"):
            out[name] = time_ms(fwd_bwd(fn, spatial, spectral), device, reps)
    return out


def bench_attention(
    device: torch.device, scale: int, reps: int
) -> dict[str, dict[str, float | str]]:
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    results: dict[str, dict[str, float | str]] = {}
    for name, batch, heads, n, d in ATTENTION:
        shape = (batch // scale, heads, n, d)  # the fused kernels take (B, heads, N, D) only
        q, k, v = (torch.randn(shape, device=device, dtype=dtype, requires_grad=True)
                   for _ in range(3))  # fmt: skip
        row: dict[str, float | str] = {}
        for backend, kind in BACKENDS.items():
            if device.type != "cuda" and backend != "math":
                continue
            try:
                with sdpa_kernel([kind]):
                    sdpa = fwd_bwd(F.scaled_dot_product_attention, q, k, v)
                    row[backend] = time_ms(sdpa, device, reps)
            except RuntimeError as exc:  # the kernel does not take this shape or dtype
                row[backend] = f"unsupported: {str(exc).splitlines()[0][:80]}"
        results[f"{name} ({batch} x {heads} heads x {n} tokens x {d})"] = row
    return results


def bench_targets(device: torch.device, scale: int, reps: int, backend: str
                  ) -> dict[str, dict[str, float]]:  # fmt: skip
    compiled_sinkhorn = torch.compile(sinkhorn_knopp, dynamic=True, backend=backend)
    compiled_ce = torch.compile(soft_cross_entropy, dynamic=True, backend=backend)
    results = {}
    for name, rows in TARGET_ROWS:
        logits = torch.randn(rows // scale, PROTOTYPES // scale, device=device) * 3
        student = torch.randn_like(logits, requires_grad=True)
        probs = sinkhorn_knopp(logits, 0.07)
        results[f"{name} ({rows // scale} x {PROTOTYPES // scale})"] = {
            "sinkhorn before": time_ms(partial(legacy_sinkhorn, logits, 0.07), device, reps),
            "sinkhorn potentials eager": time_ms(partial(sinkhorn_knopp, logits, 0.07), device, reps),
            "sinkhorn potentials compiled": time_ms(partial(compiled_sinkhorn, logits, 0.07), device, reps),
            "cross-entropy fwd+bwd eager": time_ms(
                fwd_bwd(soft_cross_entropy, probs, student, 0.1), device, reps),
            "cross-entropy fwd+bwd compiled": time_ms(
                fwd_bwd(compiled_ce, probs, student, 0.1), device, reps),
        }  # fmt: skip
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--tiny", action="store_true", help="small shapes (default on the CPU)")
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--compile-backend", default="inductor", help="aot_eager: no codegen")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tiny = args.tiny or device.type == "cpu"
    scale = 64 if tiny else 1
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(
        f"device: {name}; torch {torch.__version__}; shapes {'tiny' if tiny else 'real'}",
        flush=True,
    )
    result: dict[str, Any] = {"device": name, "torch": torch.__version__, "tiny": tiny}
    result["patch_embed_ms"] = bench_patch_embed(device, 512 // scale, 768, args.reps)
    print(f"patch embedding fwd+bwd (ms): {result['patch_embed_ms']}", flush=True)
    result["token_fusion_ms"] = bench_token_fusion(device, 1024 // scale, 768, args.reps)
    print(f"SS-ViT token fusion fwd+bwd (ms): {result['token_fusion_ms']}", flush=True)
    result["attention_ms"] = bench_attention(device, scale, args.reps)
    for shape, row in result["attention_ms"].items():
        print(f"attention fwd+bwd {shape} (ms): {row}", flush=True)
    result["targets_ms"] = bench_targets(device, scale, min(args.reps, 5), args.compile_backend)
    for shape, row in result["targets_ms"].items():
        print(f"DINO targets/loss {shape} (ms): {row}", flush=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
