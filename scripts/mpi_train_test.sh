#!/usr/bin/env bash
# Training under mpirun follows the single-process loss curve, and checkpoints move between
# layouts: quickstart (4 experts) for 6 steps in one process; under `mpirun -np 2` at ep=2;
# under `mpirun -np 4` at ep=4 and at cp=2 x ep=2 (TokenRing attention); and under `mpirun -np 4` at dp=2 x ep=2 resumed from the
# ep=2 run's step-3 checkpoint; the ep=4 run's step-3 checkpoint resumed under `mpirun -np 2`
# (ep=2) and in one process. Every step's train loss must match within 1e-5 relative.
# The other commands run at the layout too: the ep=2 run's last checkpoint evaluated under
# `mpirun -np 2` at ep=2 gives the loss of its evaluation as rank threads and in one process;
# `record-routing` under `mpirun -np 2` at ep=2 saves the statistics of rank threads; `bench`
# under `mpirun -np 2` prints one report.
# Needs a switchyard built with `--features mpi` (scripts/test.sh builds it and points
# SWITCHYARD_BIN at it).
set -euo pipefail
cd "$(dirname "$0")/.."
bin="${SWITCHYARD_BIN:-${CARGO_TARGET_DIR:-target}/release/switchyard}"
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 RUST_LOG=warn
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
common=(--config configs/quickstart.yaml --set train.steps=6 --set train.eval_every=3
        --set checkpoint.every=3 --set metrics.progress=false --set run.threads=1)

run() { # name, launcher..., -- extra args
  local name=$1; shift
  local launcher=()
  while [[ $1 != -- ]]; do launcher+=("$1"); shift; done; shift
  echo "-- $name"
  timeout 600 "${launcher[@]}" "$bin" train "${common[@]}" --set "run.output_dir=$work/$name" "$@" \
    | grep '^final:'
}

run one env -- 
run ep2 mpirun -np 2 --oversubscribe -- --set parallel.ep=2
run ep4 mpirun -np 4 --oversubscribe -- --set parallel.ep=4
run cp2ep2 mpirun -np 4 --oversubscribe -- --set parallel.cp=2 --set parallel.ep=2 \
  --set parallel.cp_algorithm=token_ring
mkdir -p "$work/dp2ep2/checkpoints"
cp -a "$work/ep2/checkpoints/step-00000003" "$work/dp2ep2/checkpoints/"
run dp2ep2 mpirun -np 4 --oversubscribe -- --set parallel.dp=2 --set parallel.ep=2 --resume auto
# The 4-rank ep=4 checkpoint of step 3, resumed on 2 ranks (ep=2) and in one process.
for name in ep4to2 ep4to1; do
  mkdir -p "$work/$name/checkpoints"
  cp -a "$work/ep4/checkpoints/step-00000003" "$work/$name/checkpoints/"
done
run ep4to2 mpirun -np 2 --oversubscribe -- --set parallel.ep=2 --resume auto
run ep4to1 env -- --resume auto
test -f "$work/ep2/checkpoints/step-00000006/model.rank-0001.safetensors"

# A command at ep=2 on the ep=2 run's directory; its stdout goes to $work/NAME.out.
on_ep2_run() { # name, launcher..., -- command args
  local name=$1; shift
  local launcher=()
  while [[ $1 != -- ]]; do launcher+=("$1"); shift; done; shift
  echo "-- $name"
  timeout 600 "${launcher[@]}" "$bin" "$@" "${common[@]}" --set "run.output_dir=$work/ep2" \
    > "$work/$name.out"
}
on_ep2_run eval-mpi mpirun -np 2 --oversubscribe -- eval --set parallel.ep=2
on_ep2_run eval-threads env -- eval --set parallel.ep=2
on_ep2_run eval-one env -- eval
for name in mpi threads; do
  launcher=(env); [[ $name == mpi ]] && launcher=(mpirun -np 2 --oversubscribe)
  on_ep2_run "routing-$name" "${launcher[@]}" -- record-routing --set parallel.ep=2 --steps 3 \
    --out "$work/routing-$name.json"
done
on_ep2_run bench-mpi mpirun -np 2 --oversubscribe -- bench --set parallel.ep=2 --steps 2 --warmup 1
test "$(grep -c '^step time (mean)' "$work/bench-mpi.out")" = 1
# The console under mpirun: one progress line per step (rank 0's), none from rank 1.
echo "-- console"
RUST_LOG=info timeout 600 mpirun -np 2 --oversubscribe "$bin" train "${common[@]}" \
  --set "run.output_dir=$work/console" --set parallel.ep=2 --set metrics.log_every=1 \
  > "$work/console.out" 2> "$work/console.err"
test "$(grep -c 'step 6/6 | loss .* | val .* | MFU .* | ETA' "$work/console.err")" = 1
test "$(grep -c 'step [0-9]/6 |' "$work/console.err")" = 6
! grep -q '^\[rank 1\].* INFO ' "$work/console.err"

python3 - "$work" <<'PY'
import json, re, sys
work = sys.argv[1]
def eval_loss(name):
    text = open(f"{work}/{name}.out").read()
    assert "(step 6)" in text, text
    return float(re.search(r"^valid loss (\S+)", text, re.M).group(1))
mpi, threads, one = (eval_loss(f"eval-{n}") for n in ["mpi", "threads", "one"])
for name, loss in [("rank threads", threads), ("one process", one)]:
    assert abs(mpi - loss) <= 1e-5 * abs(loss), f"eval under mpirun {mpi}, {name} {loss}"
print(f"eval of the ep=2 checkpoint: mpirun -np 2 {mpi}, rank threads {threads}, one process {one}")
routing = [json.load(open(f"{work}/routing-{n}.json")) for n in ["mpi", "threads"]]
for key in ["moe_layers", "num_experts", "records", "tokens", "transitions"]:
    assert routing[0][key] == routing[1][key], (key, routing[0][key], routing[1][key])
print("record-routing under mpirun -np 2 equals rank threads")
def losses(name):
    return {j["step"]: j["train/loss"] for j in map(json.loads, open(f"{work}/{name}/metrics.jsonl"))}
one = losses("one")
assert sorted(one) == list(range(1, 7)), one
worst = 0.0
for name, steps in [("ep2", range(1, 7)), ("ep4", range(1, 7)), ("cp2ep2", range(1, 7)),
                    ("dp2ep2", range(4, 7)),
                    ("ep4to2", range(4, 7)), ("ep4to1", range(4, 7))]:
    got = losses(name)
    assert sorted(got) == list(steps), (name, sorted(got))
    for s in steps:
        rel = abs(got[s] - one[s]) / abs(one[s])
        worst = max(worst, rel)
        assert rel <= 1e-5, f"{name} step {s}: {got[s]} vs one process {one[s]}"
print(f"mpirun training matches one process: worst relative loss difference {worst:.2e}")
PY
