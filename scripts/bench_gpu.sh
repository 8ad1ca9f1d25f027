#!/usr/bin/env bash
# The arbitrator benchmarks that need a GPU, in one call (each output to $OUT/<name>.txt):
#   OUT=runs/gpu_bench bash scripts/bench_gpu.sh
# On a machine whose Python lacks some of jaxspeech's light dependencies, put their wheels in
# .whl/ (librosa, audioread, soxr, pooch, soundfile, decorator, platformdirs, ml_collections,
# jiwer, rapidfuzz, tensorboardX for the CUDA image of experiments/RESULTS.md); they are
# installed to /tmp/site first. Each benchmark is cut at LIMIT seconds (default 240): the
# frame_costs runs compile six streaming loops of 16 blocks, ~3 min on an H200 machine.
#   frame_costs_s{1,16}: streaming time with every component on for 0-8 frames of each chunk, a
#                        random 16-block model (the chunk_price_share of that machine)
#   synthetic_{commands,librispeech}: batched gathered vs masked execution, random gates
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/gpu_bench}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
fi
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm --format=csv
python3 -c "import jax, flax, jaxspeech.models.arbitrator, librosa, ml_collections; \
print('jax', jax.__version__, 'flax', flax.__version__, jax.devices())" || exit 1

LIMIT=${LIMIT:-240}
run() {
  local name=$1
  shift
  local t0=$SECONDS
  timeout "$LIMIT" python3 "$@" > "$OUT/$name.txt" 2>&1
  echo "== $name (rc $?, $((SECONDS - t0)) s): $*"
  grep -v "^ \|^{\|^}" "$OUT/$name.txt" | tail -6
}
DEEP16="--config experiments/commands_arbitrator.py:none,scratch,deep --set num_layers=16"
run synthetic_commands scripts/bench_arbitrator.py --synthetic --batch 32 --seconds 6
run synthetic_librispeech scripts/bench_arbitrator.py --synthetic \
  --config experiments/librispeech_arbitrator.py --batch 16 --seconds 16 --keep 1,0.6,0.4,0.2
run frame_costs_s1 scripts/bench_arbitrator.py --frame_costs $DEEP16 --utterances 8 --seconds 3
run frame_costs_s16 scripts/bench_arbitrator.py --frame_costs $DEEP16 --streams 16 \
  --utterances 8 --seconds 3
