#!/usr/bin/env bash
# The memory estimate (`switchyard estimate-memory`) against the measured peak: each row
# trains 3 steps (under `mpirun -np N` when the layout has N > 1 ranks) and compares the
# largest rank's `memory/peak_bytes` of the last step (the counting allocator) with the
# estimate for the same config. The configs of docs/operations.md "Memory". Needs a
# switchyard built with `--features mpi` (SWITCHYARD_BIN).
set -uo pipefail
cd "$(dirname "$0")/.."
bin="${SWITCHYARD_BIN:-${CARGO_TARGET_DIR:-target}/release/switchyard}"
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 RUST_LOG=warn
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

row() { # label, ranks, --set ... (on configs/quickstart.yaml)
  local label=$1 np=$2; shift 2
  local sets=(--config configs/quickstart.yaml "$@")
  local launcher=(env)
  [[ $np -gt 1 ]] && launcher=(mpirun -np "$np" --oversubscribe)
  rm -rf "$work/run"
  if ! "${launcher[@]}" "$bin" train "${sets[@]}" --set "run.output_dir=$work/run" \
      --set train.steps=3 --set metrics.progress=false --set checkpoint.save_final=false \
      --set checkpoint.every=0 --set run.threads=1 > "$work/log" 2>&1; then
    echo "$label: training failed"; tail -3 "$work/log"; return 1
  fi
  local est
  est=$("$bin" estimate-memory "${sets[@]}" | awk '/peak \(estimate\)/ {print $3}')
  python3 - "$label" "$est" "$work/run/metrics.jsonl" <<'PY'
import json, sys
label, est, path = sys.argv[1], float(sys.argv[2]), sys.argv[3]
last = [json.loads(l) for l in open(path)][-1]
ranks = [v / 2**20 for k, v in sorted(last.items()) if k.startswith("memory/rank")]
peak = last["memory/peak_bytes"] / 2**20
print(f"{label:<62} measured {peak:7.1f} MiB (ranks {', '.join(f'{r:.1f}' for r in ranks)})"
      f"  estimate {est:7.1f} MiB  ({(est - peak) / peak * 100:+.1f}%)")
PY
}

gqa=(--set model.d_model=256 --set model.n_heads=8 --set model.n_layers=4
     --set model.attention.kv_heads=2 --set model.attention.head_dim=48
     --set model.attention.bias=qkv --set model.attention.qk_norm=true
     --set model.moe.shared_expert.ffn_dim=128 --set model.moe.shared_expert.gate=true
     --set data.seq_len=128)
wide=(--set model.d_model=512 --set model.n_heads=8 --set model.n_layers=4)
for mode in none full selective; do
  row "quickstart, 8 layers, $mode" 1 --set model.n_layers=8 \
    --set "train.activation_checkpointing=$mode"
done
row "d512 L4, dp=2 x ep=2, states_and_grads, 2 micro-batches, selective" 4 "${wide[@]}" \
  --set parallel.dp=2 --set parallel.ep=2 --set parallel.shard_optimizer=states_and_grads \
  --set train.grad_accum_steps=2 --set train.activation_checkpointing=selective
row "6 layers, S 128, cp=2 ring" 2 --set model.n_layers=6 --set data.seq_len=128 \
  --set parallel.cp=2
row "d512 L4, dp=4, states" 4 "${wide[@]}" --set parallel.dp=4 \
  --set parallel.shard_optimizer=states
row "GQA model, one process" 1 "${gqa[@]}"
row "GQA model, dp=2, selective" 2 "${gqa[@]}" --set parallel.dp=2 \
  --set train.activation_checkpointing=selective
row "GQA model, ep=2" 2 "${gqa[@]}" --set parallel.ep=2
row "GQA model, one process, full" 1 "${gqa[@]}" --set train.activation_checkpointing=full
for mode in none full; do
  row "quickstart, 4 layers, bf16, $mode" 1 --set model.n_layers=4 --set precision=bf16 \
    --set "train.activation_checkpointing=$mode"
done
