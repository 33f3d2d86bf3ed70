#!/usr/bin/env bash
# Faults under mpirun (feature mpi; scripts/test.sh builds it). Each case prints what happened.
#  1. kill -9 of a random rank while a checkpoint is being written (seeds 1..3): the job ends
#     within the collective timeout + 30 s; the newest committed checkpoint loads and the
#     resumed run continues the single-process loss curve.
#  2. SIGUSR1 to ONE rank: every rank stops at the same step, the checkpoint is committed and
#     verifies, and the job exits 75.
#  3. A hung rank (SIGSTOP) mid-step: the others time out in their collective, name the
#     operation, and MPI_Abort ends the job within the timeout + 30 s.
set -euo pipefail
cd "$(dirname "$0")/.."
bin="$(realpath "${SWITCHYARD_BIN:-${CARGO_TARGET_DIR:-target}/release/switchyard}")"
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 RUST_LOG=warn
work="$(mktemp -d)"
[[ ${KEEP_WORK:-} ]] || trap 'rm -rf "$work"' EXIT; echo "work dir: $work"
timeout_s=10
common=(--config configs/quickstart.yaml --set train.steps=16 --set train.eval_every=0
        --set train.eval_batches=1 --set checkpoint.every=1 --set checkpoint.keep_last=3
        --set metrics.progress=false --set run.threads=1 --set optim.decay_steps=16
        --set comm.timeout_s=$timeout_s)

# PID of MPI rank $2 among the children of mpirun $1 (waits until it exists).
rank_pid() {
  local deadline=$((SECONDS + 60)) pid
  while ((SECONDS < deadline)); do
    for pid in $(pgrep -P "$1" || true); do
      if tr '\0' '\n' < "/proc/$pid/environ" 2>/dev/null | grep -cx "OMPI_COMM_WORLD_RANK=$2" > /dev/null; then
        echo "$pid"; return 0
      fi
    done
    sleep 0.05
  done
  echo "rank $2 of mpirun $1 not found" >&2; return 1
}

wait_for() { # glob pattern, seconds
  local deadline=$((SECONDS + $2))
  until compgen -G "$1" > /dev/null; do
    ((SECONDS < deadline)) || { echo "timed out waiting for $1" >&2; return 1; }
    sleep 0.01
  done
}

echo "-- reference: one process"
"$bin" train "${common[@]}" --set "run.output_dir=$work/ref" > /dev/null

compare() { # run dir: every logged step's loss equals the reference within 1e-5 relative
  python3 - "$work/ref" "$1" <<'PY'
import json, sys
def losses(d):
    out = {}
    for line in open(f"{d}/metrics.jsonl"):
        j = json.loads(line); out[j["step"]] = j["train/loss"]
    return out
ref, got = losses(sys.argv[1]), losses(sys.argv[2])
assert sorted(got) == sorted(ref), (sorted(got), sorted(ref))
worst = max(abs(got[s] - ref[s]) / abs(ref[s]) for s in ref)
assert worst <= 1e-5, worst
print(f"   loss curve after resume matches one process (worst relative difference {worst:.1e})")
PY
}

for seed in 1 2 3; do
  victim=$((seed % 2))
  dir="$work/kill$seed"
  echo "-- seed $seed: kill -9 rank $victim while a checkpoint is being written"
  mpirun -np 2 --oversubscribe "$bin" train "${common[@]}" --set parallel.ep=2 \
    --set "run.output_dir=$dir" > "$dir.log" 2>&1 &
  mpirun_pid=$!
  pid=$(rank_pid "$mpirun_pid" "$victim")
  # Let a few checkpoints commit first (seed-dependent), then strike during the next save.
  wait_for "$dir/checkpoints/step-0000000$((2 + seed))" 120
  wait_for "$dir/checkpoints/.step-*.tmp-*" 60
  kill -9 "$pid"
  killed_at=$SECONDS
  status=0; wait "$mpirun_pid" || status=$?
  took=$((SECONDS - killed_at))
  ((status != 0)) || { echo "mpirun exited 0 after a rank was killed" >&2; exit 1; }
  ((took <= timeout_s + 30)) || { echo "the job took ${took}s to end" >&2; exit 1; }
  newest=$(ls -d "$dir"/checkpoints/step-* | tail -1)
  echo "   job ended ${took}s after the kill (exit $status); newest committed: $(basename "$newest")"
  "$bin" inspect-checkpoint "$newest" > /dev/null
  mpirun -np 2 --oversubscribe "$bin" train "${common[@]}" --set parallel.ep=2 \
    --set "run.output_dir=$dir" --resume auto > /dev/null 2>> "$dir.log"
  compare "$dir"
done

echo "-- SIGUSR1 to rank 1 only"
dir="$work/usr1"
mpirun -np 2 --oversubscribe "$bin" train "${common[@]}" --set parallel.ep=2 \
  --set "run.output_dir=$dir" > "$dir.log" 2>&1 &
mpirun_pid=$!
pid=$(rank_pid "$mpirun_pid" 1)
wait_for "$dir/checkpoints/step-00000003" 120
kill -USR1 "$pid"
status=0; wait "$mpirun_pid" || status=$?
[[ $status == 75 ]] || { echo "exit $status, expected 75"; cat "$dir.log"; exit 1; }
grep -q "preempted at step" "$dir.log"
newest=$(ls -d "$dir"/checkpoints/step-* | tail -1)
"$bin" inspect-checkpoint "$newest" > /dev/null
echo "   exit 75; $(grep -oE 'preempted at step [0-9]+' "$dir.log" | head -1); $(basename "$newest") verifies"
mpirun -np 2 --oversubscribe "$bin" train "${common[@]}" --set parallel.ep=2 \
  --set "run.output_dir=$dir" --resume auto > /dev/null 2>> "$dir.log"
compare "$dir"

echo "-- a hung rank (SIGSTOP rank 1 mid-run), comm.timeout_s=$timeout_s"
dir="$work/hang"
mpirun -np 2 --oversubscribe "$bin" train "${common[@]}" --set parallel.ep=2 \
  --set checkpoint.every=0 --set train.steps=1000 --set "run.output_dir=$dir" > "$dir.log" 2>&1 &
mpirun_pid=$!
pid=$(rank_pid "$mpirun_pid" 1)
deadline=$((SECONDS + 120))
until [[ $(wc -l 2>/dev/null < "$dir/metrics.jsonl" || echo 0) -ge 3 ]]; do
  ((SECONDS < deadline)) || { echo "no progress" >&2; exit 1; }
  sleep 0.05
done
kill -STOP "$pid"
stopped_at=$SECONDS
status=0; wait "$mpirun_pid" || status=$?
took=$((SECONDS - stopped_at))
((status != 0)) || { echo "mpirun exited 0 with a hung rank" >&2; exit 1; }
((took <= timeout_s + 30)) || { echo "the job took ${took}s to end" >&2; exit 1; }
grep -c "aborts the job\|aborting the MPI job\|MPI_ABORT" "$dir.log" > /dev/null || { cat "$dir.log"; exit 1; }
echo "   job ended ${took}s after the hang (exit $status):"
grep -m1 "timed out\|timeout" "$dir.log" | cut -c1-300 | sed 's/^/   /'
echo "fault tests: all passed"
