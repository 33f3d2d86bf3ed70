#!/usr/bin/env bash
# Trains a few quickstart steps, stops and resumes, and loads the event files with TensorBoard's
# own reader, from the virtualenv that .ci/run sets up (this script installs nothing).
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
# 6 steps with a checkpoint at step 4, then a resume to 8 that recomputes steps 5 and 6:
# TensorBoard must show one curve 1..8, not steps 5 and 6 twice. optim.decay_steps fixes the
# schedule, so raising train.steps on resume keeps the trajectory (and is accepted).
common=(--config configs/quickstart.yaml --set "run.output_dir=$run_dir" --set train.eval_every=2
  --set checkpoint.every=4 --set metrics.progress=false --set optim.decay_steps=8)
cargo run --release --quiet -- train "${common[@]}" --set train.steps=6 \
  --set checkpoint.save_final=false >/dev/null
cargo run --release --quiet -- train "${common[@]}" --set train.steps=8 --resume auto >/dev/null
"$venv/bin/python" scripts/check_tensorboard.py "$run_dir" --steps 8 \
  --require train/loss --require moe/layer0/max_over_mean_load --require train/z_loss \
  --require train/step_time_s --require train/mfu --require memory/peak_bytes \
  --require-text "config=seed:" --require-hparam optim.lr --require-hparam model.moe.top_k
"$venv/bin/python" scripts/check_tensorboard.py "$run_dir" --require valid/loss >/dev/null
