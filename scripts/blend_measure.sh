#!/usr/bin/env bash
# The blend measurement of docs/benchmarks.md ("Blends"): Tiny Shakespeare's speeches cut
# into three JSONL datasets (first, second, last third), each prepared with prepare-data,
# and the quickstart model trained for 100 steps on a 0.5 / 0.3 / 0.2 blend of them; prints
# each source's share of the training tokens from metrics.jsonl against its weight.
# Usage: scripts/blend_measure.sh [OUT_DIR] (default runs/blend-measure; BIN=path/to/switchyard)
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-${CARGO_TARGET_DIR:-target}/release/switchyard}
OUT=${1:-runs/blend-measure}
rm -rf "$OUT"
mkdir -p "$OUT/data"
python3 - "$OUT/data" <<'PY'
import gzip, json, sys
text = gzip.open("data/tinyshakespeare/input.txt.gz", "rt").read()
speeches = [s for s in text.split("\n\n") if s.strip()]
n = len(speeches)
thirds = [speeches[: n // 3], speeches[n // 3 : 2 * n // 3], speeches[2 * n // 3 :]]
for name, part in zip("abc", thirds):
    with open(f"{sys.argv[1]}/{name}.jsonl", "w") as f:
        f.writelines(json.dumps({"text": s}) + "\n" for s in part)
PY
for s in a b c; do
    "$BIN" prepare-data --input "$OUT/data/$s.jsonl" --output "$OUT/data/$s"
done
# The quickstart model and schedule, 100 steps, on the blend (prefixes relative to the config).
sed -e "s|source: {type: synthetic, seed: 7, bytes: 400000}|source:\n    type: blend\n    sources:\n      - {prefix: data/a, weight: 0.5}\n      - {prefix: data/b, weight: 0.3}\n      - {prefix: data/c, weight: 0.2}|" \
    -e "s|output_dir: runs/quickstart|output_dir: $OUT/run|" \
    -e "s|steps: 150|steps: 100|" \
    configs/quickstart.yaml > "$OUT/blend.yaml"
"$BIN" train --config "$OUT/blend.yaml"
python3 - "$OUT/run/metrics.jsonl" 64 <<'PY'
import json, sys
lines = [json.loads(l) for l in open(sys.argv[1])]
seq_len = int(sys.argv[2])
last = lines[-1]
total = last["train/tokens_seen"]
print(f"step {last['step']}: {total:.0f} training tokens, valid/loss {last.get('valid/loss')}")
for name, weight in [("a", 0.5), ("b", 0.3), ("c", 0.2)]:
    key = f"data/{name}/tokens_seen"
    tokens = last[key]
    share = tokens / total
    # Largest distance from the weight's share over every step, in sequences.
    worst = max(abs(l[key] - weight * l["train/tokens_seen"]) / seq_len for l in lines)
    print(f"{name}: weight {weight}  tokens {tokens:.0f}  share {share:.5f}  "
          f"relative error {(share - weight) / weight:+.3%}  epochs {last[f'data/{name}/epochs']:.3f}  "
          f"largest deviation over the {len(lines)} steps {worst:.2f} sequences")
losses = {name: last[f"valid/{name}/loss"] for name in "abc"}
mean = 0.5 * losses["a"] + 0.3 * losses["b"] + 0.2 * losses["c"]
print("valid loss per source: " + ", ".join(f"{n} {v:.4f}" for n, v in losses.items())
      + f"; 0.5/0.3/0.2 mean {mean:.6f} against valid/loss {last['valid/loss']:.6f}")
PY
