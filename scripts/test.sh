#!/usr/bin/env bash
# The project's test command (README, .ci/run). Runs from any directory.
#   scripts/test.sh            formatting, clippy, every cargo test, TensorBoard read-back,
#                              the Slurm test (root; Debian's slurmctld, slurmd, munge)
# Slow suites (long training runs, benchmarks) are separate commands; see README.md.
set -euo pipefail
cd "$(dirname "$0")/.."

echo "== cargo fmt --check"
cargo fmt --all -- --check

echo "== no import circles between crates or between the files of a crate"
python3 scripts/import_cycles.py

echo "== cargo clippy -D warnings"
cargo clippy --release --workspace --all-targets -- -D warnings
cargo clippy --release -p switchyard-comm -p switchyard-trainer -p switchyard-launch \
  -p switchyard-parallel -p switchyard-tools --all-targets --features mpi -- -D warnings
# GPU code is type-checked here so it cannot rot unseen: the `cuda` and `nccl` features of
# every crate that has them (burn's CUDA backend, the NCCL backend, the CUDA probe) check
# without a GPU or the CUDA toolkit (cudarc loads CUDA/NCCL at run time). Checking, not
# building: on the 2-core machine ~70 s after the default build, ~9 s warm (a release
# build of `--features cuda` is ~37 min cold; README, "GPU").
cargo clippy --release -p switchyard-comm -p switchyard-parallel -p switchyard-trainer \
  -p switchyard-launch -p switchyard-tools --all-targets --features cuda,nccl -- -D warnings
# The second backend's suite (wgpu on Vulkan), built and run below.
cargo clippy --release -p switchyard-tools --all-targets --features wgpu -- -D warnings

echo "== cargo test (release: burn is unusably slow unoptimised)"
test_log="$(mktemp)"
trap 'rm -f "$test_log"' EXIT
cargo test --release --workspace 2>&1 | tee "$test_log"

echo "== the parity matrix on a second backend: burn's wgpu on Mesa's lavapipe (software Vulkan), through the generic paths"
# A build of its own (burn with the wgpu backend; ~14 min cold on the 2-core machine, kept
# in the target directory) and ~20 min of tests (186 cases), one at a time (lavapipe uses both cores:
# two tests at once took 13 min).
# Mesa's Vulkan loader wants a runtime directory (it prints an error per device without one).
XDG_RUNTIME_DIR="${XDG_RUNTIME_DIR:-$(mktemp -d)}" \
  cargo test --release -p switchyard-tools --features wgpu --test parity_wgpu -- --test-threads 1 2>&1 | tee -a "$test_log"
cargo_passed=$(grep -o 'test result: ok\. [0-9]* passed' "$test_log" | awk '{s += $4} END {print s + 0}')

echo "== MPI builds: switchyard, comm-conformance, parity-mpi, cp-parity (feature mpi)"
cargo build --release -p switchyard-comm -p switchyard-trainer -p switchyard-launch \
  -p switchyard-parallel -p switchyard-tools --features mpi
# A copy: later steps (the TensorBoard check) rebuild the default `switchyard` in place.
export SWITCHYARD_BIN="${CARGO_TARGET_DIR:-target}/release/switchyard-mpi"
cp "${CARGO_TARGET_DIR:-target}/release/switchyard" "$SWITCHYARD_BIN"

echo "== comm conformance suite on MPI (mpirun -np 2, 3, 4; chunked counts with polling; no signature check)"
conformance="${CARGO_TARGET_DIR:-target}/release/comm-conformance"
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
mpi_runs=0
for np in 2 3 4; do
  timeout 600 mpirun -np "$np" --oversubscribe "$conformance"
  mpi_runs=$((mpi_runs + 1))
done
timeout 600 mpirun -np 3 --oversubscribe "$conformance" --progress poll --max-count 1000
mpi_runs=$((mpi_runs + 1))
timeout 600 mpirun -np 4 --oversubscribe "$conformance" --no-verify
mpi_runs=$((mpi_runs + 1))

echo "== context-parallel attention (ring, TokenRing) vs dense attention on MPI (mpirun -np 2, 4)"
for np in 2 4; do
  timeout 600 mpirun -np "$np" --oversubscribe "${CARGO_TARGET_DIR:-target}/release/cp-parity"
  mpi_runs=$((mpi_runs + 1))
done

echo "== layout parity under MPI (dp x cp x ep = 2 and 4 ranks; loss, gradients, weights after 3 steps)"
for np in 2 4; do
  timeout 600 mpirun -np "$np" --oversubscribe "${CARGO_TARGET_DIR:-target}/release/parity-mpi"
  mpi_runs=$((mpi_runs + 1))
done

echo "== training under mpirun follows the single-process curve; checkpoints move between layouts"
scripts/mpi_train_test.sh
mpi_runs=$((mpi_runs + 1))

echo "== faults under mpirun at np 2 and 4: kill -9 during a save (3 seeds), SIGUSR1 to one rank, SIGTERM to mpirun, a hung rank"
scripts/fault_test.sh
mpi_runs=$((mpi_runs + 2 * 6)) # cases, not runs

echo "== the ending of short ep=2 and dp=2 x ep=2 runs, 340 times (threads, mpirun, signals, tight timeouts): no hang"
scripts/stress_ending.sh 50
mpi_runs=$((mpi_runs + 1))

echo "== TensorBoard reads Switchyard's event files"
scripts/check_tensorboard_run.sh

echo "== Hugging Face: Mixtral exports loaded and run by transformers"
scripts/check_hf_export_run.sh

echo "== Slurm: a single-node cluster on localhost runs scripts from \`switchyard slurm-script\`"
scripts/slurm_test.sh --preempt
slurm_jobs=3 # the quickstart job, the requeue-protocol job, the preempted-and-requeued job

# Every step above stops the script on failure, so reaching here means nothing failed.
echo "summary: $((cargo_passed + mpi_runs + 1 + slurm_jobs)) passed, 0 failed"
