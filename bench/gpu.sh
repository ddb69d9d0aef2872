#!/usr/bin/env bash
# The H200 check of issue #5, under 4 minutes on a machine with no network; results land in
# $OUT/gpu as they come (each stage has its own time limit, so one slow stage cannot eat the rest).
#   8b:      bench/step_time.py, plain decode step of random-weight models: SmolLM2-135M's shape
#            at batch 1 and 64, and Llama-3.1-8B's at batch 1 and at batch 64 with 1K context,
#            eager / CUDA graphs / torch.compile + CUDA graphs (8B: MODES_8B, default eager and
#            graphs, since compiling it takes long), against the memory floor;
#   smollm2: `eyas bench` on the SmolLM2 pair, nospec vs adaptive at concurrency 1, 4, 16, 64,
#            1024/256 (needs the staged GGUF parts and gguf wheel, see bench/device/prepare.sh).
# Usage on the device:
#   PARTS="8b smollm2" bash bench/gpu.sh /tmp/eyas-dev      # dir with gguf.part0* and gguf-*.whl
# EYAS_EAGER=1 skips CUDA graphs in the bench; EYAS_COMPILE_BACKEND=inductor compiles its steps.
set -uo pipefail
src=${1:-/tmp/eyas-dev}
OUT=${OUT:-/tmp/eyas-out}
R="$OUT/gpu"
mkdir -p "$R"
PARTS=${PARTS:-"8b smollm2"}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 EYAS_HOME=${EYAS_HOME:-/tmp/eyas-home}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$R/gpu.txt" 2>&1
python3 -c "import torch; print(torch.__version__, torch.version.cuda)" >> "$R/gpu.txt" 2>&1

if [[ " $PARTS " == *" 8b "* ]]; then
  echo "== step time vs memory floor (random weights)"
  timeout "${T_SMOL:-60}" python3 bench/step_time.py --shape smollm2-135m --device cuda --dtype bfloat16 \
    --batch 1,64 --context 1024 --out "$R/step_time.jsonl" > "$R/step_time_smollm2.log" 2>&1
  echo "smollm2 shape rc=$?"; grep '^{' "$R/step_time_smollm2.log" | cut -c1-220
  timeout "${T_8B:-100}" python3 bench/step_time.py --shape llama-3.1-8b --device cuda --dtype bfloat16 \
    --batch 1,64 --context 1024 --modes "${MODES_8B:-eager,graph}" --out "$R/step_time.jsonl" > "$R/step_time_8b.log" 2>&1
  echo "8b shape rc=$?"; grep '^{' "$R/step_time_8b.log" | cut -c1-220
fi

if [[ " $PARTS " == *" smollm2 "* ]]; then
  echo "== SmolLM2 + drafter: nospec vs adaptive"
  if ! bash bench/device/prepare.sh "$src" > "$R/prepare.log" 2>&1; then
    echo "prepare failed"; tail -5 "$R/prepare.log"; exit 1
  fi
  export PYTHONPATH=".:/tmp/eyas-site"
  timeout "${T_BENCH:-150}" python3 -m eyas.cli bench --model smollm2-135m-instruct \
    --draft smollm2-135m-instruct-eagle3 --device cuda --concurrency 1,4,16,64 --input-len 1024 \
    --output-len 256 --modes nospec,adaptive --kv-cache-memory 8GiB --max-model-len 1280 --out "$R/bench_smollm2" > "$R/bench.log" 2>&1
  echo "bench rc=$?"; grep -v -i warn "$R/bench.log" | tail -n 14
fi
