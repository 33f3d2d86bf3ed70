#!/usr/bin/env bash
# The Slurm test: a real single-node Slurm cluster on localhost (scripts/slurm_cluster.sh)
# runs scripts written by `switchyard slurm-script`, and each job's result is checked.
#   scripts/slurm_test.sh              1. a short quickstart run as 2 MPI tasks (srun, ep=2):
#                                         COMPLETED, both shards, checkpoint, final loss
#                                      2. the requeue protocol with a stand-in trainer: SIGUSR1
#                                         -> exit 75 -> `scontrol requeue` -> second run
#   scripts/slurm_test.sh --preempt    3. also the real trainer: SIGUSR1 mid-training ->
#                                         checkpoint, exit 75, requeue, resume, finish
#   --keep-cluster                     leave the daemons running afterwards (default: stop them)
# Needs root (as in CI) and Debian's slurmctld, slurmd, slurm-client and munge (.ci/run
# installs them). SWITCHYARD_BIN picks the binary (default: the release build with
# `--features mpi`, built if
# missing). Takes ~30 s, plus ~40 s with --preempt.
set -euo pipefail
cd "$(dirname "$0")/.."
repo="$(pwd)"

preempt=0
keep=0
for arg in "$@"; do
  case "$arg" in
    --preempt) preempt=1 ;;
    --keep-cluster) keep=1 ;;
    *)
      echo "usage: $0 [--preempt] [--keep-cluster]" >&2
      exit 2
      ;;
  esac
done

if [[ "$(id -u)" != 0 ]]; then
  echo "slurm_test: needs root (the test cluster runs its daemons as root, as in CI)" >&2
  exit 1
fi

bin="${SWITCHYARD_BIN:-${CARGO_TARGET_DIR:-target}/release/switchyard}"
if [[ -z "${SWITCHYARD_BIN:-}" && ! -x "$bin" ]]; then
  cargo build --release -p switchyard-launch --features mpi --bin switchyard
fi
bin="$(realpath "$bin")"
readonly EXIT_PREEMPTED=75 # switchyard_trainer::EXIT_PREEMPTED

# One test cluster per machine (fixed ports): runs of this script queue up here.
exec 9>/tmp/switchyard-slurm-test.lock
flock -w 900 9

work="$(mktemp -d /tmp/switchyard-slurm-test.XXXXXX)"
cleanup() {
  local rc=$?
  if [[ "$keep" == 0 ]]; then
    scripts/slurm_cluster.sh down || true
  fi
  if [[ "$rc" == 0 ]]; then
    rm -rf "$work"
  else
    echo "slurm_test: FAILED; job files kept in $work, daemon logs in ${SLURM_TEST_DIR:-/tmp/switchyard-slurm}/log" >&2
  fi
}
trap cleanup EXIT

scripts/slurm_cluster.sh up
eval "$(scripts/slurm_cluster.sh env)"

fail() {
  echo "slurm_test: FAIL: $*" >&2
  exit 1
}
strip_ansi() { sed 's/\x1b\[[0-9;]*m//g' "$@"; }
job_field() { scontrol show job "$1" -o | tr ' ' '\n' | sed -n "s/^$2=//p"; }

# Waits until job $1 is finished (a requeue passes through PENDING and keeps waiting) and
# prints its final state. sbatch --wait would do, but it polls with a backoff of up to 30 s.
wait_job() {
  local id="$1" limit="$2" state="" t0=$SECONDS
  while ((SECONDS - t0 < limit)); do
    state="$(job_field "$id" JobState)"
    case "$state" in
      COMPLETED | FAILED | CANCELLED | TIMEOUT | NODE_FAIL | OUT_OF_MEMORY | BOOT_FAIL | DEADLINE | PREEMPTED)
        echo "$state"
        return
        ;;
    esac
    sleep 0.5
  done
  scancel "$id" || true
  echo "TIMEOUT_WAITING($state)"
}

# Waits until file $1 has at least $2 lines (the trainer is past step $2).
wait_lines() {
  local file="$1" n="$2" id="$3" t0=$SECONDS state
  while ((SECONDS - t0 < 120)); do
    [[ -f "$file" && "$(wc -l <"$file")" -ge "$n" ]] && return 0
    state="$(job_field "$id" JobState)"
    [[ "$state" == RUNNING || "$state" == PENDING ]] ||
      fail "job $id ended ($state) before $file had $n lines"
    sleep 0.2
  done
  fail "$file did not reach $n lines in 120 s"
}

show_logs() {
  local dir="$1"
  for f in "$dir"/slurm-*.out "$dir"/slurm-*.err; do
    [[ -f "$f" ]] || continue
    echo "---- $f (last 30 lines)" >&2
    strip_ansi "$f" | tail -n 30 >&2
  done
}

# ---- 1. A short quickstart run, start to finish, as 2 MPI tasks (ep=2) started by srun.
steps=20
run="$work/quickstart"
"$bin" slurm-script --config configs/quickstart.yaml \
  --set run.output_dir="$run" --set train.steps=$steps --set checkpoint.every=10 \
  --set metrics.progress=false --set parallel.ep=2 --set run.threads=1 \
  --nodes 1 --tasks-per-node 2 --time 00:10:00 --signal-lead-seconds 60 \
  --output "$work/quickstart.sbatch"
bash -n "$work/quickstart.sbatch" || fail "the generated script does not parse"
t0=$SECONDS
id="$(sbatch --parsable "$work/quickstart.sbatch")"
state="$(wait_job "$id" 150)"
echo "slurm_test: job $id (quickstart, $steps steps): $state in $((SECONDS - t0)) s"
[[ "$state" == COMPLETED ]] || {
  show_logs "$run"
  fail "job $id ended $state, expected COMPLETED"
}
[[ "$(job_field "$id" ExitCode)" == 0:0 ]] || fail "job $id exit code $(job_field "$id" ExitCode)"
[[ "$(job_field "$id" Restarts)" == 0 ]] || fail "job $id restarted"
ckpt="$run/checkpoints/$(printf 'step-%08d' $steps)"
[[ -d "$ckpt" ]] || fail "no checkpoint $ckpt"
[[ -f "$ckpt/model.rank-0001.safetensors" ]] || fail "rank 1 wrote no shard: srun did not start 2 MPI ranks"
"$bin" inspect-checkpoint "$ckpt" >/dev/null || fail "checkpoint $ckpt does not verify"
out="$run/slurm-quickstart-$id.out"
grep -Eq "^final: step $steps valid loss [0-9.]+ perplexity" "$out" ||
  fail "$out has no final validation loss"
grep "^final:" "$out"

# ---- 2. The requeue protocol with a stand-in trainer (no training: seconds, not minutes).
# On its first run it waits for SIGUSR1 and exits 75 as the trainer does after checkpointing;
# after the requeue (SLURM_RESTART_COUNT set) it finishes at once.
stand_in="$work/stand-in-trainer"
cat >"$stand_in" <<'EOF'
#!/bin/bash
if [[ -z "${SLURM_RESTART_COUNT:-}" ]]; then
  trap 'echo "stand-in: SIGUSR1: checkpoint, exit 75"; exit 75' USR1
  echo "stand-in: training ($*)"
  while :; do sleep 0.2 & wait $!; done
fi
echo "stand-in: run $((SLURM_RESTART_COUNT + 1)) resumed: $*"
EOF
chmod +x "$stand_in"
proto="$work/protocol"
"$bin" slurm-script --config configs/quickstart.yaml --set run.output_dir="$proto" \
  --set run.name=protocol --nodes 1 --tasks-per-node 1 --time 00:10:00 \
  --signal-lead-seconds 60 --binary "$stand_in" --output "$work/protocol.sbatch"
t0=$SECONDS
id="$(sbatch --parsable "$work/protocol.sbatch")"
out="$proto/slurm-protocol-$id.out"
wait_lines "$out" 2 "$id" # the run header and the stand-in's first line
scancel --signal=USR1 "$id"
state="$(wait_job "$id" 90)"
echo "slurm_test: job $id (requeue protocol): $state, restarts $(job_field "$id" Restarts), $((SECONDS - t0)) s"
[[ "$state" == COMPLETED && "$(job_field "$id" Restarts)" == 1 ]] || {
  show_logs "$proto"
  fail "job $id: expected COMPLETED after one requeue"
}
for line in "run 1," "srun exited with $EXIT_PREEMPTED" "requeueing job $id" "run 2," \
  "stand-in: run 2 resumed: train --config $repo/configs/quickstart.yaml" "srun exited with 0"; do
  grep -qF -- "$line" "$out" || {
    show_logs "$proto"
    fail "$out lacks '$line'"
  }
done
grep -qF -- "--resume auto" "$out" || fail "the srun line does not pass --resume auto"

# ---- 3. Preemption of the real trainer (needs its SIGUSR1 handling).
if [[ "$preempt" == 1 ]]; then
  steps=60
  run="$work/preempt"
  "$bin" slurm-script --config configs/quickstart.yaml \
    --set run.output_dir="$run" --set run.name=preempt --set train.steps=$steps \
    --set checkpoint.every=1000 --set metrics.progress=false \
    --nodes 1 --tasks-per-node 1 --time 00:10:00 --signal-lead-seconds 60 \
    --output "$work/preempt.sbatch"
  t0=$SECONDS
  id="$(sbatch --parsable "$work/preempt.sbatch")"
  wait_lines "$run/metrics.jsonl" 5 "$id"
  scancel --signal=USR1 "$id"
  echo "slurm_test: job $id: SIGUSR1 sent after step $(wc -l <"$run/metrics.jsonl")"
  state="$(wait_job "$id" 150)"
  restarts="$(job_field "$id" Restarts)"
  echo "slurm_test: job $id (preempted quickstart, $steps steps): $state, restarts $restarts, $((SECONDS - t0)) s"
  out="$run/slurm-preempt-$id.out"
  err="$run/slurm-preempt-$id.err"
  [[ "$state" == COMPLETED && "$restarts" == 1 ]] || {
    show_logs "$run"
    fail "job $id: expected COMPLETED after one requeue (the trainer must exit $EXIT_PREEMPTED on SIGUSR1)"
  }
  grep -qF "srun exited with $EXIT_PREEMPTED" "$out" || fail "$out: the first run did not exit $EXIT_PREEMPTED"
  strip_ansi "$err" | grep -c "resumed" > /dev/null || fail "$err: the second run did not resume"
  grep -Eq "^final: step $steps valid loss" "$out" || fail "$out has no final validation loss"
  # Every step logged exactly once: the second run continued, it did not start over.
  python3 - "$run/metrics.jsonl" "$steps" <<'EOF' || fail "metrics.jsonl: steps not 1..$steps exactly once"
import json, sys
steps = [json.loads(l)["step"] for l in open(sys.argv[1]) if l.strip()]
sys.exit(0 if steps == list(range(1, int(sys.argv[2]) + 1)) else 1)
EOF
  grep "^final:" "$out"
fi

echo "slurm_test: OK"
