#!/usr/bin/env bash
# The Hugging Face checks of #21, with transformers itself, from the virtualenv that .ci/run
# sets up (this script installs nothing):
#  - three tiny models trained 10 steps, exported (scripts/check_hf_export.py: logits within
#    1e-4 in fp32, loss equal to `switchyard eval`'s, greedy tokens identical with and
#    without the KV cache, the tokenizer's ids): the quickstart trained at ep=2 (experts saved
#    by two ranks) as mixtral and qwen2_moe; a
#    Qwen2-MoE-shaped one (grouped-query attention, q/k/v biases, two ungated shared
#    experts, a dense layer, no top-k renormalisation) as qwen2_moe; a Qwen3-MoE-shaped one
#    (one kv head, head_dim 48, q/k norms, all biases, a dense layer) as qwen3_moe;
#  - a null-expert model refused by export-hf through the CLI: exit 2, the message, nothing
#    written;
#  - random Mixtral, Qwen2-MoE and Qwen3-MoE models made by transformers, imported, and a
#    dense Llama upcycled (scripts/check_hf_import.py).
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
quiet() { grep -v -e "Loading weights" -e "deprecated" -e "max_new_tokens" -e "Writing model shards" -e "^$" || true; }

check_export() { # NAME FORMATS [--set K=V ...]
  local name="$1" formats="$2"
  shift 2
  local sets=(--set "run.output_dir=$work/$name" "$@")
  RUST_LOG=warn "$bin" train --config configs/quickstart.yaml "${sets[@]}" \
    --set train.steps=10 --set metrics.progress=false > /dev/null
  echo "== $name, trained 10 steps, exported as $formats"
  "$venv/bin/python" scripts/check_hf_export.py --switchyard "$bin" --config configs/quickstart.yaml \
    "${sets[@]/#--set/--set}" --checkpoint "$work/$name/checkpoints" --formats "$formats" \
    --work "$work/check-$name" 2>&1 | quiet
  return "${PIPESTATUS[0]}"
}
check_export quickstart-ep2 mixtral,qwen2_moe --set parallel.ep=2
check_export qwen2-shaped qwen2_moe --set model.n_layers=3 --set model.moe.every=2 \
  --set model.attention.kv_heads=2 --set model.attention.bias=qkv \
  --set 'model.moe.shared_expert={count: 2, ffn_dim: 32, gate: false}' \
  --set 'model.moe.router={type: top_k_softmax, normalize_weights: false}'
check_export qwen3-shaped qwen3_moe --set model.n_layers=3 --set model.moe.every=2 \
  --set model.attention.kv_heads=1 --set model.attention.head_dim=48 \
  --set model.attention.bias=all --set model.attention.qk_norm=true

echo "== a null-expert model refused by export-hf"
RUST_LOG=warn "$bin" train --config configs/quickstart.yaml --set "run.output_dir=$work/null" \
  --set 'model.moe.router={type: null_experts, num_null: 2}' --set train.steps=2 \
  --set metrics.progress=false > /dev/null
status=0
"$bin" export-hf --checkpoint "$work/null/checkpoints" --format mixtral --out "$work/null-hf" \
  2> "$work/refusal.txt" || status=$?
cat "$work/refusal.txt"
if [ "$status" -ne 2 ] || ! grep -q "null experts" "$work/refusal.txt" || [ -e "$work/null-hf" ] \
  || compgen -G "$work/.null-hf*" > /dev/null; then
  echo "FAIL: export-hf of a null-expert model: exit $status (want 2), message above, output" \
    "$(ls -d "$work"/null-hf "$work"/.null-hf* 2>/dev/null || echo absent)" >&2
  exit 1
fi
echo "refused with exit 2, nothing written"

echo "== imports and upcycling"
"$venv/bin/python" scripts/check_hf_import.py --switchyard "$bin" \
  --tokenizer "$work/check-quickstart-ep2/mixtral-fp32/tokenizer.json" --work "$work/import" 2>&1 | quiet
exit "${PIPESTATUS[0]}"
