#!/usr/bin/env bash
# The one prepared GPU run (#20): everything that needs a GPU, in one script that finishes in
# under 10 minutes on one GPU, from binaries built on a CPU machine (GPU time is scarce).
#
#   scripts/gpu_check.sh build [DIR]   on a CPU machine (no GPU or CUDA toolkit needed):
#                                      builds `--features cuda` (+ mpi), strips, and puts the
#                                      binaries, xz-compressed (~35 MB), into DIR (default
#                                      gpu-bin/, git-ignored; carry it to the GPU machine).
#                                      Measured: 27 min from a warm default build (2 cores)
#   scripts/gpu_check.sh run [DIR]     on the GPU machine, from the repository root: runs the
#                                      checks below and prints one summary table
#
# The checks (each bounded by `timeout`; a failed one is a FAIL row, the rest still run):
#   - GPU parity: the MoE layer and a transformer step, CUDA against the CPU backend (fp32
#     2e-3, bf16 5e-2; trainer/tests/gpu_parity.rs); expert-parallel (plain, chunked
#     pipelined, migration), ring attention and TokenRing layouts on the GPU against one
#     process on the GPU (tools/tests/gpu_parallel.rs, 2e-3)
#   - an ep=2 and a cp=2 training run of two ranks sharing the one GPU (`device: cuda:0`),
#     over MPI when this machine has mpirun and the MPI binary loads, else as rank threads
#     (the table says which)
#   - the quickstart on cuda in fp32 and in bf16
#   - `switchyard bench` on bench-small and configs/gpu/bench-gpu.yaml: tokens/s, MFU against
#     the bf16 matmul measured in the same run, device memory
#   - scripts/torch_reference.py on bench-gpu on the same GPU (when python3 has torch with
#     CUDA), for the tokens/s ratio
#   - NCCL on the one GPU (one rank; needs mpirun): the device path of `parallel` and the
#     host-staged operations against the values they must reproduce, the two paths' speed
#     side by side, the watchdog (tools/tests/gpu_nccl.rs); the communicator conformance
#     suite over NCCL (`comm-conformance --backend nccl`, mpirun -np 1); the quickstart
#     trained with `comm.backend.type: nccl` (mpirun -np 1)
# NCCL needs one GPU per rank: on one GPU no multi-rank NCCL job can run; the table says
# which NCCL paths ran and which did not.
set -uo pipefail
cd "$(dirname "$0")/.."
mode=${1:-}
dir=${2:-gpu-bin}

# test_binary PACKAGE TEST [FEATURES]: builds the test with `--features cuda` (or FEATURES)
# and writes the binary to stdout (`--no-run` reports where it went).
test_binary() {
  local path
  path=$(cargo test --release -p "$1" --features "${3:-cuda}" --test "$2" --no-run \
    --message-format=json 2> /dev/null | python3 -c '
import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] == sys.argv[1]:
        print(m["executable"])' "$2")
  [[ -n $path ]] || { echo "gpu_check: building the test $2 of $1 failed" >&2; return 1; }
  cat "$path"
}

build() {
  set -e
  export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-target}"
  local out="$CARGO_TARGET_DIR/release"
  mkdir -p "$dir"
  cargo build --release -p switchyard-launch --features cuda
  cp "$out/switchyard" "$dir/switchyard"
  # MPI and NCCL (nccl implies mpi).
  cargo build --release -p switchyard-launch --features cuda,nccl
  cp "$out/switchyard" "$dir/switchyard-mpi"
  cargo build --release -p switchyard-tools --features nccl --bin comm-conformance
  cp "$out/comm-conformance" "$dir/comm-conformance"
  test_binary switchyard-trainer gpu_parity > "$dir/gpu_parity"
  test_binary switchyard-tools gpu_parallel > "$dir/gpu_parallel"
  test_binary switchyard-tools gpu_nccl cuda,nccl > "$dir/gpu_nccl"
  local bins=(switchyard switchyard-mpi comm-conformance gpu_parity gpu_parallel gpu_nccl)
  chmod +x "${bins[@]/#/$dir/}"
  strip "${bins[@]/#/$dir/}"
  # ~300 MB stripped, under 50 MB as xz -9: under the device tool's 64 MiB carry limit.
  xz -T0 -9 -f "${bins[@]/#/$dir/}"
  ls -l "$dir"
  du -sh "$dir"
  echo "carry $dir to the GPU machine, then: scripts/gpu_check.sh run $dir"
}

rows=()
row() { rows+=("$(printf '| %s | %s | %s |' "$1" "$2" "$3")"); }
# step NAME SECONDS LOG COMMAND...: runs with a time limit; the status is the return value.
step() {
  local name=$1 limit=$2 log=$3; shift 3
  echo "== $name" >&2
  timeout "$limit" "$@" > "$log" 2>&1
  local status=$?
  tail -n 5 "$log" >&2
  return $status
}
field() { grep -m1 "^$1" "$2" | sed "s/^$1 *//"; }

run() {
  local logs
  logs="$(mktemp -d)"
  export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 RUST_LOG=warn
  # The binaries arrive compressed (build): unpacked next to the logs (xz, or Python's lzma
  # where xz is not installed).
  mkdir -p "$logs/bin"
  for b in switchyard switchyard-mpi comm-conformance gpu_parity gpu_parallel gpu_nccl; do
    if [[ -f $dir/$b.xz ]]; then
      if command -v xz > /dev/null; then
        xz -dc "$dir/$b.xz" > "$logs/bin/$b"
      else
        python3 -c 'import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2], "wb"))' \
          "$dir/$b.xz" "$logs/bin/$b"
      fi
      chmod +x "$logs/bin/$b"
    elif [[ -x $dir/$b ]]; then
      cp "$dir/$b" "$logs/bin/$b"
    fi
  done
  dir="$logs/bin"
  for b in switchyard gpu_parity gpu_parallel; do
    [[ -x $dir/$b ]] || { echo "gpu_check: $b is missing; run \`scripts/gpu_check.sh build\` on a CPU machine and carry its directory here" >&2; exit 2; }
  done
  if command -v nvidia-smi > /dev/null; then
    nvidia-smi -L > "$logs/gpus" 2>&1 || : > "$logs/gpus"
  else
    ls /dev/nvidia[0-9]* > "$logs/gpus" 2> /dev/null || : > "$logs/gpus"
  fi
  if [[ ! -s $logs/gpus ]]; then
    echo "gpu_check: no GPU here (neither nvidia-smi -L nor /dev/nvidia0 found one); nothing to check" >&2
    exit 2
  fi
  local gpu
  gpu=$(head -n1 "$logs/gpus")
  echo "gpu_check on: $gpu" >&2
  local started=$SECONDS

  # GPU parity (each test prints its worst difference).
  if step "GPU parity: MoE layer and transformer step, CUDA vs CPU" 240 "$logs/parity" \
    "$dir/gpu_parity" --nocapture --test-threads 1; then
    row "MoE layer + transformer step, CUDA vs CPU (fp32 2e-3, bf16 5e-2)" ok \
      "$(grep -E 'worst relative' "$logs/parity" | sed 's/|/\//g' | paste -sd ';' -)"
  else
    row "MoE layer + transformer step, CUDA vs CPU" FAIL "$(tail -n 3 "$logs/parity" | paste -sd ' ' -)"
  fi
  if step "GPU layouts: ep (plain, pipelined, migration), ring attention, TokenRing" 240 "$logs/layouts" \
    "$dir/gpu_parallel" --nocapture --test-threads 1; then
    row "ep=2 / cp=2 layouts on the GPU vs one process (2e-3)" ok \
      "$(grep -c '^cuda:' "$logs/layouts") cases, worst $(grep -o 'error [0-9.e-]*' "$logs/layouts" | awk '{print $2}' | sort -g | tail -n1)"
  else
    row "ep=2 / cp=2 layouts on the GPU" FAIL "$(grep -m1 panicked "$logs/layouts" | cut -c1-200)"
  fi

  # Two ranks on the one GPU: MPI when it runs here, else rank threads.
  local launcher=("$dir/switchyard") how="rank threads (no usable mpirun)"
  if command -v mpirun > /dev/null && [[ -x $dir/switchyard-mpi ]] && "$dir/switchyard-mpi" --version > /dev/null 2>&1; then
    launcher=(mpirun -np 2 --oversubscribe "$dir/switchyard-mpi") how="mpirun -np 2"
  fi
  for layout in "parallel.ep=2" "parallel.cp=2"; do
    local out="$logs/run-${layout#parallel.}"
    if step "quickstart at $layout on cuda:0 ($how)" 150 "$out.log" "${launcher[@]}" train \
      --config configs/quickstart.yaml --set "$layout" --set device=cuda:0 --set train.steps=30 \
      --set comm.backend.type=auto \
      --set checkpoint.every=0 --set "run.output_dir=$out"; then
      row "$layout, two ranks on one GPU ($how), 30 steps" ok "$(grep -m1 '^final:' "$out.log")"
    else
      row "$layout, two ranks on one GPU ($how)" FAIL "$(tail -n 2 "$out.log" | paste -sd ' ' -)"
    fi
  done

  for precision in fp32 bf16; do
    local out="$logs/quickstart-$precision"
    if step "quickstart on cuda, $precision" 150 "$out.log" "$dir/switchyard" train \
      --config configs/quickstart.yaml --set device=cuda --set "precision=$precision" \
      --set "run.output_dir=$out"; then
      row "quickstart on cuda, $precision (150 steps)" ok "$(grep -m1 '^final:' "$out.log")"
    else
      row "quickstart on cuda, $precision" FAIL "$(tail -n 2 "$out.log" | paste -sd ' ' -)"
    fi
  done

  local sw_tps="" torch_tps=""
  for config in configs/bench-small.yaml configs/gpu/bench-gpu.yaml; do
    local name out
    name=$(basename "$config" .yaml)
    out="$logs/bench-$name.log"
    if step "bench $name on cuda, bf16" 180 "$out" "$dir/switchyard" bench --config "$config" \
      --set device=cuda --set precision=bf16 --steps 5 --warmup 2; then
      row "bench $name (cuda, bf16)" ok \
        "tokens/s $(field 'tokens/s' "$out"); MFU $(field 'MFU (achieved / device GEMM)' "$out"); device GEMM $(grep -m1 '^device GEMM' "$out" | awk '{print $NF}') GFLOP/s; memory $(field 'device memory' "$out")"
      [[ $name == bench-gpu ]] && sw_tps=$(field 'tokens/s' "$out")
    else
      row "bench $name (cuda, bf16)" FAIL "$(tail -n 2 "$out" | paste -sd ' ' -)"
    fi
  done
  if python3 -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' 2> /dev/null; then
    local out="$logs/torch.log"
    if step "PyTorch eager reference on bench-gpu" 180 "$out" python3 scripts/torch_reference.py \
      --config configs/gpu/bench-gpu.yaml --device cuda --steps 5 --warmup 2; then
      torch_tps=$(field 'tokens/s' "$out")
      row "PyTorch eager, bench-gpu (bf16 autocast)" ok \
        "tokens/s $torch_tps; MFU $(field 'MFU (achieved / matmul peak)' "$out"); $(field 'peak memory' "$out")"
    else
      row "PyTorch eager, bench-gpu" FAIL "$(tail -n 2 "$out" | paste -sd ' ' -)"
    fi
  else
    row "PyTorch eager, bench-gpu" "not run" "python3 has no torch with CUDA on this machine"
  fi
  if [[ -n $sw_tps && -n $torch_tps ]]; then
    row "Switchyard / PyTorch tokens/s (bench-gpu)" ok "$(python3 -c "print(f'{$sw_tps / $torch_tps:.2f}x')")"
  fi
  # NCCL on the one GPU, one rank (a multi-rank NCCL job needs a GPU per rank).
  if command -v mpirun > /dev/null && [[ -x $dir/switchyard-mpi ]] && "$dir/switchyard-mpi" --version > /dev/null 2>&1; then
    if step "NCCL: device path, host staging, watchdog (one rank)" 180 "$logs/nccl" \
      "$dir/gpu_nccl" --nocapture --test-threads 1; then
      row "NCCL device path and host staging, one rank (exact)" ok \
        "$(grep -m1 '^all-reduce of 64 MiB' "$logs/nccl"); $(grep -m1 '^watchdog' "$logs/nccl" | cut -c1-120)"
    else
      row "NCCL device path and host staging, one rank" FAIL "$(grep -m1 panicked "$logs/nccl" | cut -c1-200)"
    fi
    if step "NCCL: communicator conformance (mpirun -np 1)" 120 "$logs/nccl-conformance" \
      mpirun -np 1 "$dir/comm-conformance" --backend nccl; then
      row "comm-conformance --backend nccl, mpirun -np 1" ok "$(tail -n 1 "$logs/nccl-conformance")"
    else
      row "comm-conformance --backend nccl, mpirun -np 1" FAIL "$(tail -n 2 "$logs/nccl-conformance" | paste -sd ' ' -)"
    fi
    local out="$logs/quickstart-nccl"
    if step "quickstart with comm.backend.type=nccl (mpirun -np 1)" 150 "$out.log" \
      mpirun -np 1 "$dir/switchyard-mpi" train --config configs/quickstart.yaml --set device=cuda \
      --set comm.backend.type=nccl --set train.steps=30 --set checkpoint.every=0 \
      --set "run.output_dir=$out"; then
      row "quickstart, comm nccl, mpirun -np 1, 30 steps" ok "$(grep -m1 '^final:' "$out.log")"
    else
      row "quickstart, comm nccl, mpirun -np 1" FAIL "$(tail -n 2 "$out.log" | paste -sd ' ' -)"
    fi
  else
    row "NCCL (device path, conformance, training)" "not run" "no usable mpirun on this machine (NCCL is bootstrapped over MPI)"
  fi
  row "NCCL across ranks (ep/cp/dp > 1 over NCCL)" "not run" \
    "one GPU: NCCL needs a GPU per rank; the two-rank runs above use MPI on shared cuda:0"

  echo
  echo "gpu_check on $gpu, $((SECONDS - started)) s"
  echo "| check | result | figures |"
  echo "| --- | --- | --- |"
  printf '%s\n' "${rows[@]}"
  ! printf '%s\n' "${rows[@]}" | grep -q '| FAIL |'
}

case $mode in
  build) build ;;
  run) run ;;
  *)
    echo "usage: scripts/gpu_check.sh build [DIR] | run [DIR]  (see the top of this file)" >&2
    exit 2
    ;;
esac
