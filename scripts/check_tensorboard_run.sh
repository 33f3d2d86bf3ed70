#!/usr/bin/env bash
# Trains a few quickstart steps and loads the event files with TensorBoard's own reader,
# from the virtualenv that .ci/run sets up (this script installs nothing).
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${SWITCHYARD_TB_VENV:-$HOME/.cache/switchyard/tbvenv}"
if [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -c "import tensorboard" 2>/dev/null; then
  echo "check_tensorboard_run.sh: no virtualenv with TensorBoard at $venv;" \
    "run .ci/run once (it creates it), or: python3 -m venv $venv &&" \
    "$venv/bin/pip install tensorboard" >&2
  exit 1
fi
run_dir="$(mktemp -d)"
trap 'rm -rf "$run_dir"' EXIT
cargo run --release --quiet -- train --config configs/quickstart.yaml \
  --set "run.output_dir=$run_dir" --set train.steps=3 --set train.eval_every=3 \
  --set checkpoint.every=0 --set checkpoint.save_final=false --set metrics.progress=false \
  >/dev/null
"$venv/bin/python" scripts/check_tensorboard.py "$run_dir" \
  --require train/loss --require valid/loss --require moe/layer0/max_over_mean_load
