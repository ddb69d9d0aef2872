#!/usr/bin/env bash
# On a GPU machine with no network: pull SmolLM2 from the staged GGUF, measure the plain engine,
# train the shipped EAGLE-3 drafter, evaluate it, and leave everything under $OUT.
# Usage: OUT=/some/dir bash bench/device/train_gpu.sh [STAGED_DIR]
set -uo pipefail
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 EYAS_HOME=${EYAS_HOME:-/tmp/eyas-home}
OUT=${OUT:-/tmp/eyas-out}; mkdir -p "$OUT"
bash bench/device/prepare.sh "${1:-/tmp/eyas-dev}" 2>&1 | tail -3
export PYTHONPATH=".:/tmp/eyas-site"
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, transformers; print(torch.__version__, transformers.__version__)" | tee -a "$OUT/gpu.txt"

timeout ${BENCH_TIMEOUT:-60} python3 bench/engine_vs_hf.py --device cuda --dtype bfloat16 \
  --concurrency 1,16,64 --new-tokens 128 --out "$OUT/engine_vs_hf_gpu.json" 2>&1 | grep -v Warn | tail -8 | tee "$OUT/engine.log"

W=/tmp/eyas-drafter
timeout ${TRAIN_TIMEOUT:-200} python3 -m eyas.cli train-drafter --target smollm2-135m-instruct \
  --prompts data/prompts/train.jsonl --out $W --device cuda --samples-per-prompt ${SAMPLES:-4} \
  --temperature 0 --extra-sample-temperature 0.8 --max-new-tokens 256 --max-num-seqs 512 \
  --kv-cache-memory 16GiB --draft-vocab 8192 --ttt-steps 7 --epochs ${EPOCHS:-6} --batch-tokens 32768 \
  --no-progress --json 2>&1 | tail -40 | tee "$OUT/train.log"
cp $W/train_summary.json "$OUT/" 2>/dev/null
if [ -f $W/model.safetensors ]; then
  cp $W/config.json "$OUT/drafter_config.json"
  split -b 15M -d $W/model.safetensors "$OUT/drafter.safetensors.part"
  timeout ${EVAL_TIMEOUT:-90} python3 -m eyas.cli eval-drafter --target smollm2-135m-instruct --draft $W \
    --prompts data/prompts/eval.jsonl --max-tokens 128 --device cuda --json 2>&1 | tail -30 | tee "$OUT/eval.log"
fi
ls -la "$OUT"
