#!/usr/bin/env bash
# One H100/H200, under 10 minutes: `k5serve doctor`, then the GPU rows of BENCHMARKS.md, each step under its own
# time limit so that a slow step cannot eat the rest. Writes everything under OUT (default bench-gpu-<date>/):
# doctor.md, one JSON per bench step, and results.md (every table, with the machine and the date).
#
#   bash bench/gpu_check.sh [OUT]
#
# On a host without diffusers or network, put the wheels BENCHMARKS.md lists into .whl/ first: they are installed
# from there. Order: most important first (the worker boots; Lite 5 s baseline vs ours; NABLA vs dense at 10 s
# with both masks; the VAE decode peak; step caching at full steps).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-bench-gpu-$(date -u +%Y%m%d-%H%M)}
mkdir -p "$OUT"
export PYTHONPATH=$PWD K5_COMPILE_CACHE_DIR=${K5_COMPILE_CACHE_DIR:-/tmp/k5-inductor}
export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}
PY=${PYTHON:-python}
if [ -d .whl ]; then
  $PY -m pip install -q --no-index --find-links .whl diffusers==0.42.1 pydantic-settings av 2>&1 | tail -2
fi
start=$(date +%s)
step() {  # step SECONDS NAME COMMAND...: run with a limit, log, and say how long it took
  local limit=$1 name=$2; shift 2
  local t0; t0=$(date +%s)
  echo "== $name (limit ${limit}s, at $(( t0 - start ))s)" | tee -a "$OUT/log.txt"
  timeout "$limit" "$@" >>"$OUT/log.txt" 2>&1
  echo "   rc=$? in $(( $(date +%s) - t0 ))s" | tee -a "$OUT/log.txt"
}

{
  echo "# GPU check, $(date -u '+%Y-%m-%d %H:%M UTC')"
  echo
  $PY -c 'import torch, platform; print("machine:", torch.cuda.get_device_name() if torch.cuda.is_available()
    else "no CUDA device", "| torch", torch.__version__, "| CUDA", torch.version.cuda, "|", platform.node())'
} >"$OUT/results.md"

# 1. The preflight: torch/CUDA/driver, the C compiler Triton needs, Triton, compiled flex with a block mask.
step 120 doctor bash -c "$PY -m service.cli doctor --device-memory 80 >'$OUT/doctor.md'; exit 0"
# 2. Lite 5 s, sft (guidance) and distilled: the documented baseline vs the worker.
step 200 lite-121 $PY bench/pipeline.py --full --model lite --frames 121 --variants sft,distilled --steps 3 \
  --json "$OUT/lite-121.json"
# 3. Lite 10 s: NABLA with the random weights' mask and at the fixed trained density, then dense, as the worker runs.
step 120 lite-241-nabla $PY bench/pipeline.py --full --model lite --frames 241 --attention nabla \
  --nabla-mask sta,random --steps 2 --configs ours --json "$OUT/lite-241-nabla.json"
step 70 lite-241-dense $PY bench/pipeline.py --full --model lite --frames 241 --attention dense --steps 2 \
  --configs ours --json "$OUT/lite-241-dense.json"
# 4. The VAE decode's peak on the GPU (the auto-tiling rule in worker/speed.py was measured on a CPU).
step 60 vae $PY bench/vae_memory.py --sizes 768x512 --frames 121,241 --json "$OUT/vae.json"
# 5. Step caching over the full 16-step schedule of the distilled variant (its rows run the full step count).
step 90 step-cache $PY bench/pipeline.py --full --model lite --frames 121 --variants distilled \
  --configs ours,ours+step_cache=taylorseer+step_cache_interval=3 --json "$OUT/lite-121-cache.json"

{
  echo; echo "## doctor"; echo; cat "$OUT/doctor.md" 2>/dev/null
  echo; echo "## bench"; echo
  ls "$OUT"/lite-*.json >/dev/null 2>&1 && $PY bench/pipeline.py --table "$OUT"/lite-*.json
  echo; echo "## VAE decode peak"; echo
  $PY -c 'import json,sys; [print(r) for r in json.load(open(sys.argv[1]))]' "$OUT/vae.json" 2>/dev/null
  echo; echo "total $(( $(date +%s) - start )) s"
} >>"$OUT/results.md"
echo "wrote $OUT/results.md"
