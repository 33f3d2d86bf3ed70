#!/usr/bin/env bash
# The project's test command (README, .ci/run). Runs from any directory.
#   scripts/test.sh            formatting, clippy, every cargo test, TensorBoard read-back
# Slow suites (long training runs, benchmarks) are separate commands; see README.md.
set -euo pipefail
cd "$(dirname "$0")/.."

echo "== cargo fmt --check"
cargo fmt --all -- --check

echo "== cargo clippy -D warnings"
cargo clippy --release --workspace --all-targets -- -D warnings
cargo clippy --release -p switchyard-comm --all-targets --features mpi -- -D warnings
# The NCCL backend must build without a GPU (cudarc loads CUDA/NCCL at run time).
cargo clippy --release -p switchyard-comm --all-targets --features nccl -- -D warnings
cargo clippy --release -p switchyard-parallel --all-targets --features mpi -- -D warnings

echo "== cargo test (release: burn is unusably slow unoptimised)"
test_log="$(mktemp)"
trap 'rm -f "$test_log"' EXIT
cargo test --release --workspace 2>&1 | tee "$test_log"
cargo_passed=$(grep -o 'test result: ok\. [0-9]* passed' "$test_log" | awk '{s += $4} END {print s + 0}')

echo "== comm conformance suite on MPI (mpirun -np 2, 3, 4; plus chunked counts with polling)"
cargo build --release -p switchyard-comm --features mpi --bin comm-conformance
conformance="${CARGO_TARGET_DIR:-target}/release/comm-conformance"
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
mpi_runs=0
for np in 2 3 4; do
  timeout 600 mpirun -np "$np" --oversubscribe "$conformance"
  mpi_runs=$((mpi_runs + 1))
done
timeout 600 mpirun -np 3 --oversubscribe "$conformance" --progress poll --max-count 1000
mpi_runs=$((mpi_runs + 1))

echo "== context-parallel attention (ring, TokenRing) vs dense attention on MPI (mpirun -np 2, 4)"
cargo build --release -p switchyard-parallel --features mpi --bin cp-parity
cp_parity="${CARGO_TARGET_DIR:-target}/release/cp-parity"
for np in 2 4; do
  timeout 600 mpirun -np "$np" --oversubscribe "$cp_parity"
  mpi_runs=$((mpi_runs + 1))
done

echo "== TensorBoard reads Switchyard's event files"
scripts/check_tensorboard_run.sh

# Every step above stops the script on failure, so reaching here means nothing failed.
echo "summary: $((cargo_passed + mpi_runs + 1)) passed, 0 failed"
