#!/usr/bin/env bash
# Faults under mpirun (feature mpi; scripts/test.sh builds it), at np 2 (ep=2) and np 4
# (dp=2 x ep=2). Each case prints what happened.
#  1. kill -9 of a random rank while a checkpoint is being written (seeds 1..3): the job ends
#     within the collective timeout + 30 s; the newest committed checkpoint loads and the
#     resumed run continues the uninterrupted run of the same layout bit for bit, each step
#     once in metrics.jsonl.
#  2. SIGUSR1 to ONE rank: every rank stops at the same step, the checkpoint is committed and
#     verifies, and the job exits 75; the resume is bit-exact.
#  3. SIGTERM to mpirun itself: OpenMPI passes it to every rank, which commit a checkpoint and
#     exit 75; mpirun's own exit code is printed (OpenMPI 4 reports 1: see
#     docs/operations.md); the resume is bit-exact.
#  4. A hung rank (SIGSTOP) mid-step: the others time out in their collective, name the
#     operation, and MPI_Abort ends the job within the timeout + 30 s, without a panic; the
#     time from the hang to the end of the job is printed.
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

now() { date +%s.%N; }
since() { python3 -c "import sys; print(f'{float(sys.argv[2]) - float(sys.argv[1]):.1f}')" "$1" "$(now)"; }

no_panic() { # log: a failure is an error message, never a panic with a backtrace
  if grep -q "panicked\|stack backtrace" "$1"; then
    echo "a panic in $1:" >&2; cat "$1" >&2; exit 1
  fi
}

compare() { # reference run dir, run dir, N: metrics.jsonl lines are steps 1..N once each,
  # in order, with losses bit-identical to the reference's first N
  python3 - "$1" "$2" "$3" <<'PY'
import json, sys
def lines(d):
    return [(j["step"], j["train/loss"]) for j in map(json.loads, open(f"{d}/metrics.jsonl"))]
n = int(sys.argv[3])
ref, got = lines(sys.argv[1])[:n], lines(sys.argv[2])
steps = [s for s, _ in got]
assert steps == list(range(1, n + 1)), f"metrics.jsonl steps {steps}"
assert [s for s, _ in ref] == steps, [s for s, _ in ref]
diff = [(s, a, b) for (s, a), (_, b) in zip(got, ref) if a != b]
assert not diff, f"losses differ from the uninterrupted run: {diff}"
print(f"   resumed run: steps 1..{n} once each, losses bit-identical to the uninterrupted run")
PY
}

for np in 2 4; do
  layout=(--set parallel.ep=2)
  ((np == 4)) && layout+=(--set parallel.dp=2)
  mpi=(mpirun -np "$np" --oversubscribe "$bin" train "${common[@]}" "${layout[@]}")
  last=$((np - 1))
  echo "== np $np (${layout[*]})"
  echo "-- reference: uninterrupted, 40 steps (the others compare with its first 16)"
  "${mpi[@]}" --set train.steps=40 --set "run.output_dir=$work/ref$np" > "$work/ref$np.log" 2>&1 \
    || { cat "$work/ref$np.log"; exit 1; }

  for seed in 1 2 3; do
    victim=$((seed % np))
    dir="$work/kill$np-$seed"
    echo "-- seed $seed: kill -9 rank $victim while a checkpoint is being written"
    "${mpi[@]}" --set "run.output_dir=$dir" > "$dir.log" 2>&1 &
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
    no_panic "$dir.log"
    newest=$(ls -d "$dir"/checkpoints/step-* | tail -1)
    echo "   job ended ${took}s after the kill (exit $status); newest committed: $(basename "$newest")"
    "$bin" inspect-checkpoint "$newest" > /dev/null
    "${mpi[@]}" --set "run.output_dir=$dir" --resume auto > /dev/null 2>> "$dir.log"
    compare "$work/ref$np" "$dir" 16
  done

  echo "-- SIGUSR1 to rank $last only"
  dir="$work/usr1-$np"
  "${mpi[@]}" --set "run.output_dir=$dir" > "$dir.log" 2>&1 &
  mpirun_pid=$!
  pid=$(rank_pid "$mpirun_pid" "$last")
  wait_for "$dir/checkpoints/step-00000003" 120
  kill -USR1 "$pid"
  status=0; wait "$mpirun_pid" || status=$?
  [[ $status == 75 ]] || { echo "exit $status, expected 75"; cat "$dir.log"; exit 1; }
  grep -q "preempted at step" "$dir.log"
  no_panic "$dir.log"
  newest=$(ls -d "$dir"/checkpoints/step-* | tail -1)
  "$bin" inspect-checkpoint "$newest" > /dev/null
  echo "   exit 75; $(grep -oE 'preempted at step [0-9]+' "$dir.log" | head -1); $(basename "$newest") verifies"
  "${mpi[@]}" --set "run.output_dir=$dir" --resume auto > /dev/null 2>> "$dir.log"
  compare "$work/ref$np" "$dir" 16

  echo "-- SIGTERM to mpirun itself"
  # OpenMPI passes the signal on to the ranks about a second later: a 40-step run.
  dir="$work/term-$np"
  "${mpi[@]}" --set train.steps=40 --set "run.output_dir=$dir" > "$dir.log" 2>&1 &
  mpirun_pid=$!
  rank_pid "$mpirun_pid" "$last" > /dev/null
  wait_for "$dir/checkpoints/step-00000003" 120
  kill -TERM "$mpirun_pid"
  status=0; wait "$mpirun_pid" || status=$?
  ((status != 0)) || { echo "mpirun exited 0 after SIGTERM" >&2; cat "$dir.log"; exit 1; }
  no_panic "$dir.log"
  # Each rank's own line (mpirun stops relaying output before the ranks' final message).
  stopped=$(grep -c "preempted: checkpoint committed, stopping" "$dir.log" || true)
  ((stopped == np)) || { echo "$stopped of $np ranks committed and stopped"; cat "$dir.log"; exit 1; }
  step=$(grep -om1 "stopping step=[0-9]*" "$dir.log" | grep -o "[0-9]*$")
  newest=$(ls -d "$dir"/checkpoints/step-* | tail -1)
  "$bin" inspect-checkpoint "$newest" > /dev/null
  echo "   mpirun exit $status; every rank committed step $step and stopped; $(basename "$newest") verifies"
  "${mpi[@]}" --set train.steps=40 --set "run.output_dir=$dir" --resume auto > /dev/null 2>> "$dir.log"
  compare "$work/ref$np" "$dir" 40

  echo "-- a hung rank (SIGSTOP rank $last mid-run), comm.timeout_s=$timeout_s"
  dir="$work/hang-$np"
  "${mpi[@]}" --set checkpoint.every=0 --set train.steps=1000 --set "run.output_dir=$dir" \
    > "$dir.log" 2>&1 &
  mpirun_pid=$!
  pid=$(rank_pid "$mpirun_pid" "$last")
  deadline=$((SECONDS + 120))
  until [[ $(wc -l 2>/dev/null < "$dir/metrics.jsonl" || echo 0) -ge 3 ]]; do
    ((SECONDS < deadline)) || { echo "no progress" >&2; exit 1; }
    sleep 0.05
  done
  kill -STOP "$pid"
  stopped_at=$(now)
  status=0; wait "$mpirun_pid" || status=$?
  took=$(since "$stopped_at")
  ((status != 0)) || { echo "mpirun exited 0 with a hung rank" >&2; exit 1; }
  python3 -c "import sys; sys.exit(float(sys.argv[1]) > $timeout_s + 30)" "$took" \
    || { echo "the job took ${took}s to end" >&2; exit 1; }
  grep -c "aborts the job\|aborting the MPI job\|MPI_ABORT" "$dir.log" > /dev/null || { cat "$dir.log"; exit 1; }
  no_panic "$dir.log"
  echo "   hang detected: the job ended ${took}s after the SIGSTOP (comm.timeout_s=$timeout_s; exit $status):"
  grep -m1 "timed out" "$dir.log" | cut -c1-300 | sed 's/^/   /'
done
echo "fault tests: all passed"
