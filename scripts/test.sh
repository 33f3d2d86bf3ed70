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

echo "== cargo test (release: burn is unusably slow unoptimised)"
cargo test --release --workspace

echo "== TensorBoard reads Switchyard's event files"
scripts/check_tensorboard_run.sh
