#!/usr/bin/env bash
# Bytes per parameter of weights, gradients and AdamW moments, MEASURED per rank by the
# counting allocator (metrics.jsonl's memory/*), at dp = 1, 2, 4 (mpirun -np dp) for each
# parallel.shard_optimizer setting, on a model whose parameters are all replicated over dp.
# weights = held at the start of step 1 (before any moment exists); moments = what step 1
# added to it; gradients = the accumulated gradients held after the last micro-batch of
# step 2, before the sync (two micro-batches, so `states` keeps full local gradients while
# `states_and_grads` keeps only the owned sums). Needs a switchyard built with
# `--features mpi` (SWITCHYARD_BIN).
set -euo pipefail
cd "$(dirname "$0")/.."
bin="${SWITCHYARD_BIN:-${CARGO_TARGET_DIR:-target}/release/switchyard}"
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 RUST_LOG=warn
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
model=(--set model.d_model=512 --set model.n_heads=8 --set model.n_layers=4
       --set model.moe.expert_ffn_dim=512 --set data.seq_len=32 --set data.batch_size=8
       --set train.grad_accum_steps=2 --set train.steps=2 --set metrics.progress=false
       --set checkpoint.save_final=false --set checkpoint.every=0 --set run.threads=1)
params=$("$bin" estimate-memory --config configs/quickstart.yaml "${model[@]}" \
  | awk '/parameters held/ {print $3}')
echo "parameters: $params (every one replicated over dp)"
printf '%-18s %3s %10s %10s %10s %10s %10s\n' setting dp weights grads moments total goal
for shard in none states states_and_grads; do
  for dp in 1 2 4; do
    if [[ $dp == 1 && $shard != none ]]; then continue; fi
    out="$work/$shard-$dp"
    launcher=(env)
    [[ $dp -gt 1 ]] && launcher=(mpirun -np "$dp" --oversubscribe)
    "${launcher[@]}" "$bin" train --config configs/quickstart.yaml "${model[@]}" \
      --set "run.output_dir=$out" --set "parallel.dp=$dp" \
      --set "parallel.shard_optimizer=$shard" > "$out.log" 2>&1 || { tail "$out.log"; exit 1; }
    python3 - "$out/metrics.jsonl" "$params" "$shard" "$dp" <<'PY'
import json, sys
lines = [json.loads(l) for l in open(sys.argv[1])]
p, shard, dp = float(sys.argv[2]), sys.argv[3], int(sys.argv[4])
w = lines[0]["memory/held_bytes"] / p
m = (lines[1]["memory/held_bytes"] - lines[0]["memory/held_bytes"]) / p
g = lines[1]["memory/grad_bytes"] / p
goal = {"none": 16, "states": 8 + 8 / dp, "states_and_grads": 4 + 12 / dp}[shard]
print(f"{shard:<18} {dp:3d} {w:10.2f} {g:10.2f} {m:10.2f} {w + g + m:10.2f} {goal:10.2f}")
PY
  done
done
