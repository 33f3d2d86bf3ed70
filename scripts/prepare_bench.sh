#!/usr/bin/env bash
# prepare-data throughput (docs/benchmarks.md, "prepare-data"): MB/s of text tokenized into a
# Megatron .bin/.idx, on a corpus of >= 1 GB made by repeating Tiny Shakespeare, against the
# Python `tokenizers` library encoding the same corpus with the same tokenizer.json.
#   scripts/prepare_bench.sh [COPIES]     # default 900 copies: 1.004 GB
# Needs a release build of `switchyard` (SWITCHYARD_BIN picks another), python3, gzip, zstd
# and bc; creates a virtualenv with `tokenizers` under /tmp (PREPARE_BENCH_VENV). The corpus and
# outputs go to PREPARE_BENCH_DIR (default /tmp/prepare-bench, ~6 GB) and are removed at the
# end unless KEEP=1. Prints a Markdown table; each row is one run, one after the other.
set -euo pipefail
cd "$(dirname "$0")/.."
copies="${1:-900}"
bin="${SWITCHYARD_BIN:-${CARGO_TARGET_DIR:-target}/release/switchyard}"
venv="${PREPARE_BENCH_VENV:-/tmp/prepare-bench-venv}"
work="${PREPARE_BENCH_DIR:-/tmp/prepare-bench}"
[[ -x "$bin" ]] || { echo "no $bin; run cargo build --release" >&2; exit 1; }
if [[ ! -x "$venv/bin/python" ]]; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q tokenizers
fi
py="$venv/bin/python"
mkdir -p "$work"
[[ "${KEEP:-0}" == 1 ]] || trap 'rm -rf "$work"' EXIT

src="$work/input.txt"
gunzip -c data/tinyshakespeare/input.txt.gz >"$src"
corpus="$work/corpus.txt"
if [[ ! -f "$corpus" ]]; then
  for ((i = 0; i < copies; i++)); do cat "$src"; done >"$corpus"
fi
[[ -f "$corpus.zst" ]] || zstd -q -3 -T0 -c "$corpus" >"$corpus.zst"
bytes=$(stat -c %s "$corpus")
tok="$work/tokenizer.json"
"$py" scripts/prepare_bench.py train-bpe "$src" "$tok"

echo "corpus: $copies x Tiny Shakespeare = $bytes bytes ($(nproc) cores; $("$bin" build-info | head -1);" \
  "tokenizers $("$py" -c 'import tokenizers; print(tokenizers.__version__)'))"
echo
echo "| tool | tokenizer | input | threads | seconds | MB/s | CPU s | MB per CPU s | tokens | peak RSS MB |"
echo "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"
# tool, tokenizer, input, threads, command...: one row, timed with /usr/bin/time.
row() {
  local tool=$1 tokname=$2 input=$3 threads=$4
  shift 4
  local t0 t1 out rss
  t0=$(date +%s.%N)
  out=$(/usr/bin/time -f "rss %M cpu %U %S" "$@" 2>"$work/time.log")
  t1=$(date +%s.%N)
  rss=$(awk '/^rss/ {printf "%.0f", $2 / 1024}' "$work/time.log")
  local cpu
  cpu=$(awk '/^rss/ {printf "%.1f", $4 + $5}' "$work/time.log")
  local seconds tokens
  seconds=$(echo "$t1 - $t0" | bc)
  if [[ "$tool" == switchyard ]]; then
    tokens=$(grep -o '[0-9]* tokens' <<<"$out" | head -1 | cut -d' ' -f1)
  else
    tokens=$("$py" -c 'import json,sys; print(json.loads(sys.argv[1])["tokens"])' "$out")
  fi
  printf '| %s | %s | %s | %s | %.1f | %.2f | %s | %.2f | %s | %s |\n' "$tool" "$tokname" \
    "$input" "$threads" "$seconds" "$(echo "$bytes / 1000000 / $seconds" | bc -l)" "$cpu" \
    "$(echo "$bytes / 1000000 / $cpu" | bc -l)" "$tokens" "$rss"
}
out="$work/out"
# >= 1 GB: Switchyard against the Python library, both on every core.
row switchyard byte text 2 "$bin" prepare-data --input "$corpus" --output "$out"
row switchyard "BPE 4096" text 2 "$bin" prepare-data --input "$corpus" --tokenizer "$tok" --output "$out"
row "python tokenizers" "BPE 4096" text 2 "$py" scripts/prepare_bench.py encode "$tok" "$corpus"
row switchyard "BPE 4096" text.zst 2 "$bin" prepare-data --input "$corpus.zst" --tokenizer "$tok" --output "$out"
# One thread against two, and gzip, on the first tenth of the corpus.
small="$work/small.txt"
head -c $((bytes / 10)) "$corpus" >"$small"
gzip -1 -c "$small" >"$small.gz"
bytes=$(stat -c %s "$small")
row switchyard "BPE 4096" "text, 1/10" 1 "$bin" prepare-data --input "$small" --tokenizer "$tok" --output "$out" --workers 1
row switchyard "BPE 4096" "text, 1/10" 2 "$bin" prepare-data --input "$small" --tokenizer "$tok" --output "$out" --workers 2
row "python tokenizers" "BPE 4096" "text, 1/10" 1 env TOKENIZERS_PARALLELISM=false "$py" scripts/prepare_bench.py encode "$tok" "$small"
row "python tokenizers" "BPE 4096" "text, 1/10" 2 "$py" scripts/prepare_bench.py encode "$tok" "$small"
row switchyard "BPE 4096" "text.gz, 1/10" 2 "$bin" prepare-data --input "$small.gz" --tokenizer "$tok" --output "$out"
echo
echo "(switchyard counts the end-of-document token after the one document; MB/s: bytes of"
echo " text / wall seconds, decompression and writing included; CPU s: user + system; load"
echo " average at the end:" \
  "$(cut -d' ' -f1-3 /proc/loadavg))"
