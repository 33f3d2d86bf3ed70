#!/usr/bin/env bash
# Expert-placement benchmark: record routing statistics from real training runs on Tiny
# Shakespeare, then compare contiguous, heuristic and ILP placements on them.
# Usage: scripts/placement_bench.sh [OUT_DIR] (default runs/placement); needs
# a release build of `switchyard` (the corpus is the shipped data/tinyshakespeare/input.txt.gz).
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-runs/placement}
bin=${SWITCHYARD:-${CARGO_TARGET_DIR:-target}/release/switchyard}
steps=${STEPS:-400}
mkdir -p "$out"

record() { # name, then --set overrides
    local name=$1
    shift
    local sets=()
    for s in "$@"; do sets+=(--set "$s"); done
    if [[ ! -f $out/$name.json ]]; then
        "$bin" record-routing --config configs/placement-record.yaml "${sets[@]}" \
            --steps "$steps" --out "$out/$name.json"
    fi
}

# name                 experts                    MoE layers        load-balancing loss
record e16-l2-bal      model.moe.num_experts=16   model.n_layers=2  model.moe.load_balance_coef=0.01
record e32-l4-bal      model.moe.num_experts=32   model.n_layers=4  model.moe.load_balance_coef=0.01
record e32-l4-skew     model.moe.num_experts=32   model.n_layers=4  model.moe.load_balance_coef=0
record e64-l4-bal      model.moe.num_experts=64   model.n_layers=4  model.moe.load_balance_coef=0.01
record e64-l4-mild     model.moe.num_experts=64   model.n_layers=4  model.moe.load_balance_coef=0.001
record e64-l4-skew     model.moe.num_experts=64   model.n_layers=4  model.moe.load_balance_coef=0

plan() { # stats, ranks, extra args (default: every strategy, ILP limited to 1 s, gap 1%)
    local stats=$1 ranks=$2
    shift 2
    [[ $# -gt 0 ]] || set -- --time-limit 1
    echo "=== $stats, $ranks ranks $*"
    "$bin" plan-placement --stats "$out/$stats.json" --ranks "$ranks" "$@"
    echo
}

plan e16-l2-bal 4
plan e32-l4-bal 4
plan e32-l4-bal 8
plan e32-l4-skew 8
plan e64-l4-bal 8
plan e64-l4-bal 8 --strategy ilp --time-limit 10 --mip-gap 0
plan e64-l4-mild 8 --strategy ilp --time-limit 10 --mip-gap 0
plan e64-l4-mild 8
plan e64-l4-skew 8
plan e64-l4-skew 8 --time-limit 1 --ranks-per-node 4 --inter-node-slowdown 9
