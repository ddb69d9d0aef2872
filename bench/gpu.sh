#!/usr/bin/env bash
# The H200 check of issue #5, under 4 minutes on a machine with no network; partial results are
# written to $OUT as they come.
#   1. an 8B-shaped random-weight Llama (bench/step_time.py): plain decode step at batch 1 and at
#      batch 64 with 1K context, eager and compiled (CUDA graphs), against the memory floor;
#   2. the SmolLM2 pair (`eyas bench`): nospec vs adaptive at concurrency 1, 4, 16, 64, 1024/256.
# Usage on the device (after the GGUF parts and the gguf wheel were staged, see bench/device):
#   bash bench/gpu.sh /tmp/eyas-dev        # dir with gguf.part0* and gguf-*.whl
# Set EYAS_EAGER=1 to skip compiling (e.g. when the compile warm-up would not fit the budget).
set -uo pipefail
src=${1:-/tmp/eyas-dev}
OUT=${OUT:-/tmp/eyas-out}
mkdir -p "$OUT"
export EYAS_HOME=${EYAS_HOME:-/tmp/eyas-home} HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.txt" 2>&1
python3 -c "import torch; print(torch.__version__, torch.version.cuda)" >> "$OUT/gpu.txt"

echo "== 8B shape: decode step vs memory floor"
timeout 100 python3 bench/step_time.py --shape llama-3.1-8b --device cuda --dtype bfloat16 \
  --batch 1,64 --context 1024 --out "$OUT/step_time_8b.jsonl" 2>&1 | tail -n 8

echo "== SmolLM2 + drafter: nospec vs adaptive"
bash bench/device/prepare.sh "$src" > "$OUT/prepare.log" 2>&1 || { echo "prepare failed"; tail "$OUT/prepare.log"; exit 1; }
export PYTHONPATH=".:/tmp/eyas-site"
timeout 150 python3 -m eyas.cli bench --model smollm2-135m-instruct --draft smollm2-135m-instruct-eagle3 \
  --device cuda --concurrency 1,4,16,64 --input-len 1024 --output-len 256 --modes nospec,adaptive \
  --out "$OUT/bench_smollm2" 2>&1 | tail -n 20
ls -la "$OUT"
