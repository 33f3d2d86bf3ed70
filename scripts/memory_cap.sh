#!/usr/bin/env bash
# A model that does not fit unsharded: every rank of `mpirun -np 4` (dp=4) runs under a
# per-process address-space cap (`prlimit --as`, default 2.6 GB). Unsharded AdamW needs about
# 1.8 GB of heap per rank at its peak (`switchyard estimate-memory` prints the phases) and
# dies of a failed allocation under the cap; `parallel.shard_optimizer: states_and_grads`
# trains under the same cap, and `switchyard eval` evaluates its checkpoint at the same
# layout under it (it reads the weights only). Needs a switchyard built with
# `--features mpi` (SWITCHYARD_BIN). Prints what happened; exits non-zero if the sharded run
# or the evaluation fails, or if the unsharded run does not.
set -uo pipefail
cd "$(dirname "$0")/.."
bin="${SWITCHYARD_BIN:-${CARGO_TARGET_DIR:-target}/release/switchyard}"
cap="${CAP:-2600000000}"
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 RUST_LOG=warn
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
model=(--config configs/quickstart.yaml --set model.d_model=1024 --set model.n_heads=8
       --set model.n_layers=4 --set model.moe.expert_ffn_dim=1024 --set data.seq_len=32
       --set data.batch_size=8 --set parallel.dp=4 --set train.steps=2
       --set metrics.progress=false --set run.threads=1 --set checkpoint.every=0)
capped=(mpirun -np 4 --oversubscribe prlimit "--as=$cap" "$bin")
for shard in none states_and_grads; do
  "$bin" estimate-memory "${model[@]}" --set "parallel.shard_optimizer=$shard" \
    | grep -E "peak \(estimate\)" | sed "s/^/$shard: /"
done
"${capped[@]}" train "${model[@]}" --set "run.output_dir=$work/none" \
  --set parallel.shard_optimizer=none > "$work/none.log" 2>&1
none_rc=$?
echo "unsharded under the cap: exit $none_rc; $(grep -m1 -E 'memory allocation|final:' "$work/none.log")"
"${capped[@]}" train "${model[@]}" --set "run.output_dir=$work/sharded" \
  --set parallel.shard_optimizer=states_and_grads > "$work/sharded.log" 2>&1
sharded_rc=$?
echo "states_and_grads under the cap: exit $sharded_rc; $(grep -m1 'final:' "$work/sharded.log")"
python3 - "$work/sharded/metrics.jsonl" <<'PY'
import json, sys
last = [json.loads(l) for l in open(sys.argv[1])][-1]
ranks = sorted((k, v) for k, v in last.items() if k.startswith("memory/rank"))
print("  measured peak per rank: " + ", ".join(f"{v / 2**20:.0f} MiB" for _, v in ranks))
PY
"${capped[@]}" eval "${model[@]}" --set "run.output_dir=$work/sharded" \
  --set parallel.shard_optimizer=states_and_grads \
  --checkpoint "$work/sharded/checkpoints/step-00000002" > "$work/eval.log" 2>&1
eval_rc=$?
echo "eval at dp=4 under the cap: exit $eval_rc; $(grep -m1 'valid loss' "$work/eval.log")"
[[ $none_rc -ne 0 && $sharded_rc -eq 0 && $eval_rc -eq 0 ]]
