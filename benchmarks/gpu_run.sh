#!/usr/bin/env bash
# One call on a GPU machine (issue 12): every GPU measurement, each bounded, in well under 10 minutes.
#
#   bash benchmarks/gpu_run.sh              # from the repository root, on a machine with CUDA
#   DRY_RUN=1 bash benchmarks/gpu_run.sh    # on CPU with tiny sizes, results under /tmp (checks the script)
#
# Runs, each under its own `timeout` so one hang cannot eat the budget, continuing past failures:
#   1. benchmarks/torch_search.py --device cuda: backend="torch" search fp32 and bf16+rescore vs
#      matmul+topk, faiss brute force (faiss-gpu knn_gpu when faiss has GPU support, else faiss-cpu), and
#      the roofline at the measured copy bandwidth and matmul peak -> results/torch_search_gpu.json
#   2. benchmarks/step.py (if present): the Memorizing-Transformer step with backend torch on cuda, exact
#      and faiss beside it -> results/step_gpu.json/.png. step.py's torch device is taken from --device if
#      it has that flag, else set through its BUILD table.
#   3. benchmarks/jax_search.py when jax sees a GPU -> results/jax_search_gpu.json
# plus results/gpu_env_gpu.txt (nvidia-smi, library versions) and results/gpu_run_gpu.log (all output).
# Commit benchmarks/results/*_gpu* afterwards.
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python}

if [ "${DRY_RUN:-0}" = 1 ]; then
  DEVICE=cpu; OUT=$(mktemp -d /tmp/gpu_run_dry.XXXXXX); SUFFIX=_dry
  TORCH_ARGS="--small --warmup 1 --repeats 2"; STEP_ARGS="--quick --backends torch,exact"
  JAX_ARGS="--small"; LIMIT=120
  export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
else
  DEVICE=cuda; OUT=benchmarks/results; SUFFIX=_gpu
  TORCH_ARGS=""; STEP_ARGS="--backends torch,exact,faiss --capacities 16384,65536 --repeats 3"
  JAX_ARGS=""; LIMIT=170
fi
mkdir -p "$OUT"
LOG="$OUT/gpu_run$SUFFIX.log"
: > "$LOG"
say() { echo "[gpu_run $(date -u +%H:%M:%S)] $*" | tee -a "$LOG"; }
run() {  # run LIMIT_SECONDS NAME COMMAND...: bounded, logged, never fatal
  local limit=$1 name=$2; shift 2
  say "$name: $(echo "$*" | tr -s ' \n' ' ')"
  timeout --kill-after=10 "$limit" "$@" 2>&1 | tee -a "$LOG"
  local rc=${PIPESTATUS[0]}
  say "$name: exit $rc$([ "$rc" = 124 ] && echo ' (timed out)')"
}

{
  echo "date: $(date -u)"; echo "device: $DEVICE"
  nvidia-smi 2>&1 | head -15 || true
  $PY - <<'EOF' 2>&1
import importlib
for name in ("torch", "faiss", "jax", "numpy"):
    try:
        m = importlib.import_module(name)
        print(name, getattr(m, "__version__", "?"))
    except Exception as e:  # noqa: BLE001
        print(name, "not importable:", e)
try:
    import torch
    print("cuda:", torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
except Exception as e:  # noqa: BLE001
    print("torch cuda check failed:", e)
try:
    import faiss
    print("faiss gpus:", faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0)
except Exception as e:  # noqa: BLE001
    print("faiss:", e)
try:
    import jax
    print("jax devices:", jax.devices())
except Exception as e:  # noqa: BLE001
    print("jax:", e)
EOF
} > "$OUT/gpu_env$SUFFIX.txt" 2>&1
cat "$OUT/gpu_env$SUFFIX.txt" | tee -a "$LOG"

# 1. torch search, fp32 and bf16 (one run measures both), faiss beside it
# shellcheck disable=SC2086
run "$LIMIT" torch_search $PY benchmarks/torch_search.py --device "$DEVICE" $TORCH_ARGS --out "$OUT/torch_search$SUFFIX.json"

# 2. the step benchmark with the torch backend on the device
if [ -f benchmarks/step.py ]; then
  if $PY -m benchmarks.step --help 2>/dev/null | grep -q -- "--device"; then
    # shellcheck disable=SC2086
    run "$LIMIT" step $PY -m benchmarks.step $STEP_ARGS --device "$DEVICE" --note "torch backend on $DEVICE (benchmarks/gpu_run.sh)" --tag "${SUFFIX#_}" --out-dir "$OUT"
  else
    # shellcheck disable=SC2086
    run "$LIMIT" step $PY -c '
import sys
from benchmarks import step
step.BUILD.setdefault("torch", {})["device"] = sys.argv[1]
step.main(sys.argv[2:])
' "$DEVICE" $STEP_ARGS --note "torch backend on $DEVICE (benchmarks/gpu_run.sh)" --tag "${SUFFIX#_}" --out-dir "$OUT"
  fi
else
  say "step: skipped, benchmarks/step.py is not in this checkout"
fi

# 3. jax search, when jax has a GPU (or in a dry run)
if [ "$DEVICE" = cpu ] || $PY -c 'import jax, sys; sys.exit(0 if any(d.platform == "gpu" for d in jax.devices()) else 1)' 2>/dev/null; then
  # shellcheck disable=SC2086
  run "$LIMIT" jax_search $PY -m benchmarks.jax_search $JAX_ARGS --out "$OUT/jax_search$SUFFIX.json"
else
  say "jax_search: skipped, jax sees no GPU"
fi

say "done; results in $OUT:"
ls -l "$OUT"/*"$SUFFIX"* 2>&1 | tee -a "$LOG"
