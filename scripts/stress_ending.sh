#!/usr/bin/env bash
# The ending of short multi-rank runs, many times (#19 item 0: a run once hung after its
# final checkpoint). Every run must end by itself; a run still alive after $limit s is a
# hang and fails the script. Cases, each at ep=2 and dp=2 x ep=2:
#   plain      rank threads; checkpoints at steps 2 and 4 (the final one): exit 0
#   tight      rank threads with comm.timeout_s of 1-20 ms, so collectives time out on one
#              rank and complete on another at random places (a rank goes on alone into
#              the next agreement): exit 0, or 1 with one error and no panic
#   signal     rank threads, SIGTERM at a random instant (start-up, a step, a save, the
#              end): exit 0 or 75
#   mpi        mpirun -np 2 / -np 4 (feature mpi; $SWITCHYARD_BIN): exit 0
#   mpi-signal mpirun, SIGUSR1 to mpirun at a random instant: exit 0 or 75 (or, when the
#              signal reached the ranks during start-up and mpirun reports each rank's 75,
#              whatever mpirun itself exits with; when it reaches mpirun after the final
#              checkpoint committed and the ranks ended, mpirun dies of it: 138)
# Usage: scripts/stress_ending.sh [ROUNDS]   (default 10 rounds; scripts/test.sh runs 10)
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${1:-10}
bin="$(realpath "${SWITCHYARD_BIN:-${CARGO_TARGET_DIR:-target}/release/switchyard}")"
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 RUST_LOG=warn
work="$(mktemp -d)"
[[ ${KEEP_WORK:-} ]] || trap 'rm -rf "$work"' EXIT
limit=60 # seconds; a healthy run of this size ends in under 5

cat > "$work/tiny.yaml" <<'EOF'
run: {name: stress, output_dir: unset, seed: 5, threads: 1}
model:
  vocab_size: 256
  d_model: 32
  n_heads: 2
  n_layers: 2
  ffn_dim: 64
  max_seq_len: 32
  moe: {every: 1, num_experts: 4, top_k: 2, expert_ffn_dim: 32}
data:
  tokenizer: {type: byte}
  source: {type: synthetic, seed: 3, bytes: 40000}
  valid_fraction: 0.1
  seq_len: 16
  batch_size: 8
optim: {lr: 3.0e-3, warmup_steps: 2, decay_steps: 4, grad_clip: 1.0}
train: {steps: 4, eval_every: 2, eval_batches: 1}
checkpoint: {every: 2, keep_last: 2}
metrics: {progress: false}
EOF

runs=0 worst=0 last_ms=0 plain_ms=0 np=1

# Whether the process $1 (self) or $3 children of mpirun $1 catch SIGUSR1 (SigCgt bit 10).
handlers_in() {
  local pids=$1 n=0 pid mask
  [[ $2 == mpirun ]] && pids=$(pgrep -P "$1" || true)
  for pid in $pids; do
    mask=$(awk '/^SigCgt/ {print $2}' "/proc/$pid/status" 2>/dev/null) || continue
    [[ -n $mask ]] && (((0x$mask >> 9) & 1)) && n=$((n + 1))
  done
  ((n >= $3))
}
declare -A outcomes=()
# Takes one run back from an outcome's count (it is counted under a more exact name).
uncount() {
  outcomes["$1"]=$((${outcomes["$1"]} - 1))
  ((outcomes["$1"] > 0)) || unset 'outcomes["$1"]'
}
# run NAME ALLOWED_EXITS SIGNAL_TARGET(none|self|mpirun) COMMAND...
run() {
  local name=$1 allowed=$2 signal=$3; shift 3
  local dir="$work/$name-$runs" log="$work/$name-$runs.log"
  local started=$SECONDS started_ns status=0
  started_ns=$(date +%s%N)
  "$@" --set "run.output_dir=$dir" > "$log" 2>&1 &
  local pid=$!
  if [[ $signal != none ]]; then
    # From the moment every rank's handlers exist (before that a signal meets the default
    # action, or mpirun has no rank to pass it to: outside Switchyard's reach) to the end of
    # a plain run of this layout: start-up, the steps, the saves, the final checkpoint, the
    # exit.
    local ranks=1
    [[ $signal == mpirun ]] && ranks=$np
    until handlers_in "$pid" "$signal" "$ranks" || ! kill -0 "$pid" 2>/dev/null; do
      ((SECONDS - started <= limit)) || break
      sleep 0.002
    done
    local delay_ms=$((RANDOM % (plain_ms + 1)))
    sleep "$((delay_ms / 1000)).$(printf %03d $((delay_ms % 1000)))"
    kill -s "$([[ $signal == mpirun ]] && echo USR1 || echo TERM)" "$pid" 2>/dev/null || true
  fi
  # A run alive after $limit s is a hang: killed, and the script fails. Except mpirun
  # itself still waiting after every one of its ranks has exited 75 at start-up (seen once
  # in ~20 such runs with Open MPI 4.1: it printed that it aborted the job and never
  # returned): no Switchyard process is left, so it is counted apart.
  local hung=0 launcher_hung=0
  while kill -0 "$pid" 2>/dev/null; do
    if ((SECONDS - started > limit)); then
      if [[ $signal == mpirun ]] && [[ -z $(ps --ppid "$pid" -o stat= | grep -v "^Z") ]] \
        && grep -q "Exit code: *75" "$log" \
        && [[ $(grep -c "stop signal before the first step" "$log") == "$np" ]]; then
        launcher_hung=1
      else
        hung=1
      fi
      pkill -9 -P "$pid" 2>/dev/null || true; kill -9 "$pid" 2>/dev/null || true
      break
    fi
    sleep 0.02
  done
  wait "$pid" || status=$?
  local took=$((SECONDS - started))
  last_ms=$((($(date +%s%N) - started_ns) / 1000000))
  ((took > worst)) && worst=$took
  runs=$((runs + 1))
  outcomes["$name exit $status"]=$((${outcomes["$name exit $status"]:-0} + 1))
  if ((hung)); then
    echo "HANG: $name ($*) was still running after ${limit}s; log:" >&2
    cat "$log" >&2; exit 1
  fi
  if ((launcher_hung)); then
    uncount "$name exit $status"
    outcomes["$name mpirun hung after every rank exited 75 at start-up (killed)"]=$((${outcomes["$name mpirun hung after every rank exited 75 at start-up (killed)"]:-0} + 1))
    allowed="$allowed $status"
  fi
  # A signal that reaches the ranks during start-up makes each exit 75 before MPI is up;
  # mpirun then reports the ranks' 75 but may exit with a code of its own (seen: 141).
  if [[ $signal == mpirun && " $allowed " != *" $status "* ]] \
    && grep -q "Exit code: *75" "$log" && ! grep "Exit code:" "$log" | grep -vq "Exit code: *75$"; then
    uncount "$name exit $status"
    outcomes["$name exit $status (every rank 75 at start-up)"]=$((${outcomes["$name exit $status (every rank 75 at start-up)"]:-0} + 1))
    allowed="$allowed $status"
  fi
  # A SIGUSR1 that reaches mpirun after every rank has ended (the final checkpoint
  # committed, mpirun tearing down with its handlers gone) kills mpirun itself: 138.
  if [[ $signal == mpirun && " $allowed " != *" $status "* ]] && ((status == 138)) \
    && [[ -f $dir/checkpoints/step-00000004/manifest.json ]] && grep -q "^final:" "$log"; then
    uncount "$name exit $status"
    outcomes["$name exit $status (mpirun killed after the run ended)"]=$((${outcomes["$name exit $status (mpirun killed after the run ended)"]:-0} + 1))
    allowed="$allowed $status"
  fi
  if [[ " $allowed " != *" $status "* ]]; then
    echo "$name: exit $status, expected one of: $allowed; log:" >&2
    cat "$log" >&2; exit 1
  fi
  if grep -q "panicked" "$log"; then
    echo "$name: a panic in the log:" >&2; cat "$log" >&2; exit 1
  fi
  if ((status == 1)) && [[ $(grep -c "^error:" "$log") != 1 ]]; then
    echo "$name: exit 1 without exactly one error line:" >&2; cat "$log" >&2; exit 1
  fi
  rm -rf "$dir"
}

train=("$bin" train --config "$work/tiny.yaml")
layouts=("--set parallel.ep=2" "--set parallel.dp=2 --set parallel.ep=2")
for ((round = 0; round < rounds; round++)); do
  for layout in "${layouts[@]}"; do
    # shellcheck disable=SC2086 # the layout is several words on purpose
    set -- $layout
    tag=$([[ $# == 2 ]] && echo ep2 || echo dp2ep2)
    run "plain-$tag" "0" none "${train[@]}" "$@"
    plain_ms=$last_ms
    ms=$((1 + RANDOM % 20))
    run "tight-$tag" "0 1" none "${train[@]}" "$@" --set "comm.timeout_s=0.0$(printf %02d "$ms")"
    run "signal-$tag" "0 75" self "${train[@]}" "$@"
    if ((round % 5 == 0)); then # mpirun starts slowly: a fifth of the rounds
      np=$([[ $tag == ep2 ]] && echo 2 || echo 4)
      mpi=(mpirun -np "$np" --oversubscribe "${train[@]}" "$@")
      run "mpi-$tag" "0" none "${mpi[@]}"
      plain_ms=$last_ms
      run "mpi-signal-$tag" "0 75" mpirun "${mpi[@]}"
    fi
  done
done
echo "stress_ending: $runs runs, none hung; the longest took ${worst}s (limit ${limit}s)"
for key in "${!outcomes[@]}"; do echo "  $key: ${outcomes[$key]}"; done | sort
