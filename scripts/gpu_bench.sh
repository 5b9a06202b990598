#!/usr/bin/env bash
# Pretraining benchmark on a lent GPU machine, in one short command (docs/benchmarks.md).
#
#   device tool:  bash scripts/gpu_bench.sh          (timeout_s 600; results come back in $OUT)
#   anywhere:     bash scripts/gpu_bench.sh   (results in runs/bench-gpu/ unless OUT is set)
#
# Needs only torch (+ torchvision), timm, numpy, scipy and pyyaml: the package is used from src/
# (PYTHONPATH), no install, no network. First the kernels behind each lever alone
# (bench_kernels.py: patch embedding, attention kernels, DINO targets). Then per method, in its
# own process with its own time limit: base model, bf16 autocast, torch.compile as the trainer
# compiles, 20 timed steps, MFU against the card's bf16 matmul rate measured in the same run;
# MAE at batch 512; a plain timm ViT-B/8 supervised step as the yardstick (reference); DINOv2 at
# the largest batch from 512 down that fits (--fit-batch); SS-ViT at batch 512 inside 80 GiB (an
# H100's memory), recomputing as few blocks as that needs (--fit-checkpoint). If a compiled run
# fails or runs out of time the method is rerun eager, and the log says so (a compile error
# inside a run already falls back to eager in-process; the row carries "compile_error").
#
# Environment (all optional):
#   OUT       results folder (default runs/bench-gpu): kernels.json, bench-<method>.json,
#             bench.json (all rows), gpu_bench.log
#   METHODS   default "kernels mae reference dinov2 ssvit"; levers to compare: mae-nographs (MAE
#             without the preset's CUDA graphs), mae-flash, mae-efficient, mae-cudnn (MAE
#             preferring that attention kernel)
#   SCOPE     compile scope: networks (default; each backbone/head one graph, exactly as the
#             trainer compiles) or blocks (regional: much shorter compile); per method with
#             SCOPE_MAE, SCOPE_DINOV2, SCOPE_SSVIT
#   BATCH     starting batch (default 512);   QUICK=1 for 8 timed steps instead of 20
#   MEMORY_CAP  GiB SS-ViT must fit in (default 80)
#   DEADLINE  seconds this script may take in all (default 570); later runs get what is left
#   LIMIT_KERNELS / LIMIT_MAE / LIMIT_REFERENCE / LIMIT_DINOV2 / LIMIT_SSVIT  seconds for one
#             run (default 150/120/75/150/240)
#   PROFILE   1 (default): 3 more steps per method under torch.profiler -> profile-<method>.txt
#             (top kernels), GPU busy fraction and matmul share in the rows; 0 to skip
#   EXTRA     more bench_train.py flags, e.g. "--compile-mode max-autotune-no-cudagraphs"
set -uo pipefail
cd "$(dirname "$0")/.."
START=$SECONDS
OUT=${OUT:-$PWD/runs/bench-gpu}
METHODS=${METHODS:-kernels mae reference dinov2 ssvit}
SCOPE=${SCOPE:-networks}
BATCH=${BATCH:-512}
DEADLINE=${DEADLINE:-570}
QUICK_FLAG=$([ "${QUICK:-0}" = 1 ] && echo --quick || true)
PROFILE_FLAG=$([ "${PROFILE:-1}" = 1 ] && echo "--profile $OUT" || true)
PY=${PYTHON:-$(command -v python3 || command -v python)}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/gpu_bench.log") 2>&1

export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH}
# Compiled kernels are cached here: a second run on the same warm machine compiles much faster.
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-/tmp/hsissl-inductor-cache}
# The DINO heads see a different row count every step: growable segments avoid fragmentation.
export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}
DATA=${DATA:-/tmp/hsissl-bench-data}  # generated shards, shared by all methods (and reruns)

echo "== environment ($(date -u +%FT%TZ))"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || echo "no nvidia-smi"
"$PY" - <<'EOF' || { echo "== the python environment is not usable; stopping"; exit 2; }
import importlib, sys
import torch
print(f"python {sys.version.split()[0]}; torch {torch.__version__} (cuda {torch.version.cuda}); "
      f"cuda available {torch.cuda.is_available()}")
for name in ("timm", "torchvision", "numpy", "scipy", "yaml", "tqdm"):
    module = importlib.import_module(name)
    print(f"  {name} {getattr(module, '__version__', '?')}")
import hsissl.pretrain.trainer  # noqa: F401  (fails here, early, if an import is missing)
EOF

left() { echo $((DEADLINE - (SECONDS - START))); }

capped() {  # capped LIMIT: LIMIT, or less when the deadline is nearer (0: skip)
  local cap=$(($(left) - 10))
  if ((cap < 30)); then echo 0; elif (($1 > cap)); then echo "$cap"; else echo "$1"; fi
}

run() {  # run METHOD LIMIT JSON ARGS...: one method in its own process under a time limit
  local method=$1 json=$3 limit
  limit=$(capped "$2")
  shift 3
  if ((limit == 0)); then
    echo "== $method: skipped, only $(left) s of the ${DEADLINE} s deadline left"
    return 124
  fi
  echo "== $method: $* (limit ${limit} s)"
  timeout --signal=INT --kill-after=15 "$limit" "$PY" scripts/bench_train.py --methods "$method" \
    --data "$DATA" --json "$json" $QUICK_FLAG $PROFILE_FLAG ${EXTRA:-} "$@"
}

for method in $METHODS; do
  if [ "$method" = kernels ]; then
    limit=$(capped "${LIMIT_KERNELS:-150}")
    ((limit == 0)) && { echo "== kernels: skipped, no time left"; continue; }
    echo "== kernels: scripts/bench_kernels.py (limit ${limit} s)"
    timeout --signal=INT --kill-after=15 "$limit" "$PY" scripts/bench_kernels.py \
      --json "$OUT/kernels.json" || echo "== kernels: exit $?"
    continue
  fi
  case $method in
    mae) limit=${LIMIT_MAE:-120} scope=${SCOPE_MAE:-$SCOPE} extra=() ;;
    mae-nographs) limit=${LIMIT_MAE:-120} scope=${SCOPE_MAE:-$SCOPE}  # the lever undone
      extra=(--compile-mode default) ;;
    mae-flash | mae-efficient | mae-cudnn) limit=${LIMIT_MAE:-120} scope=${SCOPE_MAE:-$SCOPE}
      extra=(--sdpa "${method#mae-}") ;;  # a lever: another attention kernel
    reference) limit=${LIMIT_REFERENCE:-75} scope=$SCOPE extra=() ;;
    dinov2) limit=${LIMIT_DINOV2:-150} scope=${SCOPE_DINOV2:-$SCOPE} extra=(--fit-batch) ;;
    ssvit) limit=${LIMIT_SSVIT:-240} scope=${SCOPE_SSVIT:-$SCOPE}
      extra=(--memory-cap "${MEMORY_CAP:-80}" --fit-checkpoint) ;;
    *) echo "== unknown method $method (kernels, mae, mae-<lever>, reference, dinov2, ssvit)"
      continue ;;
  esac
  run "${method%%-*}" "$limit" "$OUT/bench-$method.json" --batch "$BATCH" "${extra[@]}" \
    --compile --compile-scope "$scope"
  rc=$?
  if ((rc != 0)); then
    echo "== $method: the compiled run failed or timed out (exit $rc); FALLING BACK TO EAGER"
    run "${method%%-*}" 75 "$OUT/bench-$method-eager.json" --batch "$BATCH" "${extra[@]}" --no-compile
    echo "== $method: eager run exit $?"
  fi
done

echo "== summary ($((SECONDS - START)) s)"
"$PY" - "$OUT" <<'EOF'
import json, sys
from pathlib import Path

sys.path.insert(0, "scripts")
from bench_train import format_row  # noqa: E402  (one formatter for the log and this table)

out = Path(sys.argv[1])
rows, device, peak = [], "?", None
for path in sorted(out.glob("bench-*.json")):
    result = json.loads(path.read_text())
    device, peak = result.get("device", device), result.get("peak_flops") or peak
    rows += result.get("rows", [])
    for method, error in result.get("failed", {}).items():
        print(f"{method}: FAILED {error}")
(out / "bench.json").write_text(json.dumps({"device": device, "peak_flops": peak, "rows": rows}, indent=1))
print(f"device: {device}; bf16 matmul peak measured {peak / 1e12 if peak else float('nan'):.0f} TFLOP/s")
for r in rows:
    print(format_row(r) + (f" | compile error: {r['compile_error']}" if "compile_error" in r else ""))
EOF
