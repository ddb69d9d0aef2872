#!/usr/bin/env bash
# On a GPU machine with no network: train an EAGLE-3 drafter for SmolLM2 (regeneration with our
# engine, features captured while it generates, TTT training) and hand it back under $OUT
# (config + safetensors in 15 MB parts; join with `cat drafter.safetensors.part* >
# model.safetensors`). Evaluate it afterwards on the CPU with eval-drafter: that costs no device time.
# Usage: OUT=/some/dir bash bench/device/train_gpu.sh [STAGED_DIR]    (after bench/device/prepare.sh)
set -uo pipefail
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 EYAS_HOME=${EYAS_HOME:-/tmp/eyas-home}
OUT=${OUT:-/tmp/eyas-out}
R="$OUT/train"
mkdir -p "$R"
bash bench/device/prepare.sh "${1:-/tmp/eyas-dev}" > "$R/prepare.log" 2>&1 || { echo "prepare failed"; exit 1; }
export PYTHONPATH=".:/tmp/eyas-site"

W=/tmp/eyas-drafter
cat data/prompts/train.jsonl data/prompts/topics.jsonl data/prompts/self.jsonl data/prompts/self-1.jsonl \
  data/prompts/ask.jsonl data/prompts/ask-1.jsonl data/prompts/forms.jsonl \
  > /tmp/eyas-prompts.jsonl  # 30,517 prompts
timeout "${T_TRAIN:-240}" python3 -m eyas.cli train-drafter --target smollm2-135m-instruct \
  --prompts /tmp/eyas-prompts.jsonl --out $W --device cuda --samples-per-prompt "${SAMPLES:-1}" \
  --temperature 0 --extra-sample-temperature 0.8 --max-new-tokens 256 --max-num-seqs 512 \
  --kv-cache-memory 16GiB --draft-vocab 8192 --ttt-steps 7 --epochs "${EPOCHS:-6}" \
  --batch-tokens 8192 --lr 1e-3 --patience 2 --no-progress --json > "$R/train.log" 2>&1
echo "train rc=$?"; grep -v -i warn "$R/train.log" | tail -n 25
cp $W/train_summary.json "$R/" 2>/dev/null
ls -la $W $W/work 2>/dev/null | head -20 > "$R/files.txt"
if [ -f $W/model.safetensors ]; then
  cp $W/config.json "$OUT/drafter_config.json"
  split -b 15M -d $W/model.safetensors "$OUT/drafter.safetensors.part"
fi
