#!/usr/bin/env bash
# Pretraining benchmark on a lent GPU machine, in one short command (docs/benchmarks.md).
#
#   device tool:  bash scripts/gpu_bench.sh          (timeout_s 330; results come back in $OUT)
#   anywhere:     bash scripts/gpu_bench.sh   (results in runs/bench-gpu/ unless OUT is set)
#
# Needs only torch (+ torchvision), timm, numpy, scipy and pyyaml: the package is used from src/
# (PYTHONPATH), no install, no network. Per method, in its own process with its own time limit:
# base model, bf16 autocast, torch.compile, batch 512 for MAE and the largest batch from 512 down
# that fits for DINOv2 and SS-ViT (--fit-batch). If a compiled run fails or runs out of time the
# method is rerun eager, and the log says so (a compile error inside a run already falls back to
# eager in-process; the row then carries "compile_error").
#
# Environment (all optional):
#   OUT       results folder (default runs/bench-gpu): bench-<method>.json, bench.json (all rows),
#             gpu_bench.log
#   METHODS   default "mae dinov2 ssvit"
#   SCOPE     compile scope: blocks (default; regional, much shorter compile) or networks (each
#             backbone/head one graph, exactly as the trainer compiles)
#   BATCH     starting batch (default 512);   QUICK=0 for 20 timed steps instead of 8
#   DEADLINE  seconds this script may take in all (default 300); later runs get what is left
#   LIMIT_MAE / LIMIT_DINOV2 / LIMIT_SSVIT  seconds for one compiled run (default 90/120/120)
#   PROFILE   1 (default): 3 more steps per method under torch.profiler -> profile-<method>.txt
#             (top kernels), GPU busy fraction and matmul share in the rows; 0 to skip
#   EXTRA     more bench_train.py flags, e.g. "--compile-mode max-autotune-no-cudagraphs"
set -uo pipefail
cd "$(dirname "$0")/.."
START=$SECONDS
OUT=${OUT:-$PWD/runs/bench-gpu}
METHODS=${METHODS:-mae dinov2 ssvit}
SCOPE=${SCOPE:-blocks}
BATCH=${BATCH:-512}
DEADLINE=${DEADLINE:-300}
QUICK_FLAG=$([ "${QUICK:-1}" = 1 ] && echo --quick || true)
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

run() {  # run METHOD LIMIT JSON ARGS...: one method in its own process under a time limit
  local method=$1 limit=$2 json=$3
  shift 3
  local cap
  cap=$(($(left) - 10))
  if ((cap < 30)); then
    echo "== $method: skipped, only $(left) s of the ${DEADLINE} s deadline left"
    return 124
  fi
  ((limit > cap)) && limit=$cap
  echo "== $method: $* (limit ${limit} s)"
  timeout --signal=INT --kill-after=15 "$limit" "$PY" scripts/bench_train.py --methods "$method" \
    --data "$DATA" --json "$json" $QUICK_FLAG $PROFILE_FLAG ${EXTRA:-} "$@"
}

for method in $METHODS; do
  case $method in
    mae) limit=${LIMIT_MAE:-90} fit="" ;;
    dinov2) limit=${LIMIT_DINOV2:-120} fit=--fit-batch ;;
    ssvit) limit=${LIMIT_SSVIT:-120} fit=--fit-batch ;;
    *) echo "== unknown method $method (mae, dinov2, ssvit)"; continue ;;
  esac
  run "$method" "$limit" "$OUT/bench-$method.json" --batch "$BATCH" $fit \
    --compile --compile-scope "$SCOPE"
  rc=$?
  if ((rc != 0)); then
    echo "== $method: the compiled run failed or timed out (exit $rc); FALLING BACK TO EAGER"
    run "$method" 75 "$OUT/bench-$method-eager.json" --batch "$BATCH" $fit --no-compile
    echo "== $method: eager run exit $?"
  fi
done

echo "== summary ($((SECONDS - START)) s)"
"$PY" - "$OUT" <<'EOF'
import json, sys
from pathlib import Path

out = Path(sys.argv[1])
rows, device = [], "?"
for path in sorted(out.glob("bench-*.json")):
    result = json.loads(path.read_text())
    device = result.get("device", device)
    rows += result.get("rows", [])
    for method, error in result.get("failed", {}).items():
        print(f"{method}: FAILED {error}")
(out / "bench.json").write_text(json.dumps({"device": device, "rows": rows}, indent=1))
print(f"device: {device}")
def pct(v): return "n/a" if v is None else f"{v:.1%}"
for r in rows:
    mode = f"compiled/{r['compile_scope']}" if r["compiled"] else "EAGER"
    print(f"{r['method']:7s} batch {r['batch']:4d} {mode:18s} model {r['model_img_per_s']:8.0f} img/s"
          f" | end-to-end {r['end_to_end_img_per_s']:8.0f} img/s | MFU {pct(r['mfu'])}"
          f" (end-to-end {pct(r['mfu_end_to_end'])}) | peak {r['peak_mem_gib']:.1f} GiB"
          f" | loader {r['loader_tiles_per_s']:.0f} tiles/s = {r['loader_over_training']:.2f}x model"
          f" | warm-up {r['warmup_s']:.0f} s | syncs/step {r['host_syncs_per_step']}"
          + (f" | GPU busy {r['gpu_busy']:.0%}, matmul {r['gemm_share']:.0%}"
             if r.get("gpu_busy") is not None and r.get("gemm_share") is not None else "")
          + (f" | compile error: {r['compile_error']}" if "compile_error" in r else ""))
EOF
