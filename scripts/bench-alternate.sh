#!/usr/bin/env bash
# Runs two benchmark commands alternately and prints each run's tokens/s and CPU time per
# step, then the medians and the ratio B / A. On a shared, noisy host this is how two
# builds (or Switchyard and PyTorch) are compared: side by side, run by run.
#
#   scripts/bench-alternate.sh PAIRS 'COMMAND A' 'COMMAND B'
#
# Each command must print the `switchyard bench` lines `tokens/s` and `CPU time per step`
# (scripts/torch_reference.py prints them too on the CPU). Example, against PyTorch:
#   scripts/bench-alternate.sh 5 \
#     'python3 scripts/torch_reference.py --config configs/bench-small.yaml --device cpu --threads 2 --steps 6 --warmup 2' \
#     'target/release/switchyard bench --config configs/bench-small.yaml --steps 6 --warmup 2'
set -euo pipefail
if [[ $# -ne 3 ]] || ! [[ $1 =~ ^[1-9][0-9]*$ ]]; then
  echo "usage: $0 PAIRS 'COMMAND A' 'COMMAND B'   (PAIRS >= 1)" >&2
  exit 2
fi
pairs=$1
commands=("$2" "$3")
declare -a tokens_a tokens_b cpu_a cpu_b

run() { # $1: command -> "tokens/s cpu-s"
  local out
  if ! out=$(bash -c "$1" 2>&1); then
    echo "$out" | tail -20 >&2
    echo "bench-alternate: command failed: $1" >&2
    exit 1
  fi
  local tok cpu
  tok=$(awk '/^tokens\/s  /{print $2}' <<<"$out")
  cpu=$(awk '/^CPU time per step/{print $5}' <<<"$out")
  if [[ -z $tok || -z $cpu ]]; then
    echo "$out" | tail -20 >&2
    echo "bench-alternate: no 'tokens/s' / 'CPU time per step' lines from: $1" >&2
    exit 1
  fi
  echo "$tok $cpu"
}

median() { printf '%s\n' "$@" | sort -g | awk '{v[NR]=$1} END {print (NR%2 ? v[(NR+1)/2] : (v[NR/2]+v[NR/2+1])/2)}'; }

printf '%-5s %12s %12s %12s %12s\n' pair "A tokens/s" "B tokens/s" "A CPU s/step" "B CPU s/step"
for ((i = 1; i <= pairs; i++)); do
  read -r ta ca < <(run "${commands[0]}")
  read -r tb cb < <(run "${commands[1]}")
  tokens_a+=("$ta"); tokens_b+=("$tb"); cpu_a+=("$ca"); cpu_b+=("$cb")
  printf '%-5s %12s %12s %12s %12s\n' "$i" "$ta" "$tb" "$ca" "$cb"
done
ma=$(median "${tokens_a[@]}"); mb=$(median "${tokens_b[@]}")
ca=$(median "${cpu_a[@]}"); cb=$(median "${cpu_b[@]}")
printf '%-5s %12s %12s %12s %12s\n' median "$ma" "$mb" "$ca" "$cb"
awk -v ma="$ma" -v mb="$mb" -v ca="$ca" -v cb="$cb" 'BEGIN {
  printf "B / A: tokens/s %.3f (medians), CPU time per step %.3f (A / B: %.3f)\n", mb / ma, cb / ca, ca / cb }'
