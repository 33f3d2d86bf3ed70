#!/usr/bin/env bash
# Trains the quickstart for 30 steps and checks its Hugging Face export with transformers
# itself (scripts/check_hf_export.py: logits within 1e-4 in fp32, greedy tokens identical,
# the tokenizer's ids), then imports a random Mixtral made by transformers (scripts/
# check_hf_import.py: logits within 1e-4, f32 and bf16 weights), from the virtualenv that .ci/run sets up (this script installs nothing).
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${SWITCHYARD_HF_VENV:-$HOME/.cache/switchyard/hfvenv}"
if [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -c "import torch, transformers" 2>/dev/null; then
  echo "check_hf_export_run.sh: no virtualenv with torch and transformers at $venv;" \
    "run .ci/run once (it creates it), or: python3 -m venv $venv &&" \
    "$venv/bin/pip install torch transformers safetensors numpy" >&2
  exit 1
fi
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
cargo build --release --quiet -p switchyard-launch
bin="${CARGO_TARGET_DIR:-target}/release/switchyard"
RUST_LOG=warn "$bin" train --config configs/quickstart.yaml --set "run.output_dir=$work/run" \
  --set train.steps=30 --set metrics.progress=false > /dev/null
"$venv/bin/python" scripts/check_hf_export.py --switchyard "$bin" \
  --checkpoint "$work/run/checkpoints" --work "$work/check" 2>&1 \
  | grep -v -e "Loading weights" -e "deprecated" -e "max_new_tokens" -e "^$"
"$venv/bin/python" scripts/check_hf_import.py --switchyard "$bin" \
  --tokenizer "$work/check/mixtral-fp32/tokenizer.json" --work "$work/import" 2>&1 \
  | grep -v -e "Writing model shards" -e "Loading weights" -e "deprecated" -e "^$"
