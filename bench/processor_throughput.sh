#!/usr/bin/env bash
# Throughput of the built-in processors against `tr` and `cp` on the same file, same sink, same run.
#
#   bench/processor_throughput.sh [SIZE_MB] [TEXT]   (default 1024 mixed; median of 3 runs each)
#
# TEXT: `mixed` (ASCII with some non-ASCII words, ~60-byte lines), `ascii` (ASCII only) or
# `nonascii` (Greek, Cyrillic and German words, about 3 in 4 characters 2-byte UTF-8: the
# words and seed of bench/run.py's non-ASCII text).
#
# Prints MB/s for: cp (floor), tr a-z A-Z, pipe processor copy, pipe processor upper (ascii),
# pipe processor upper (unicode), and the ratio of each row's time to cp's and its speed to tr's.
# Uses the release binary.
set -euo pipefail
cd "$(dirname "$0")/.."
SIZE_MB=${1:-1024}
TEXT=${2:-mixed}
case "$TEXT" in mixed | ascii | nonascii) ;; *) echo "TEXT must be mixed, ascii or nonascii" >&2; exit 2 ;; esac
cargo build --release --locked --quiet
PIPE=$PWD/target/release/pipe
WORK=$(mktemp -d "${TMPDIR:-/tmp}/pipe-bench.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
mkdir -p "$WORK/in" "$WORK/out"
# Seeded text, ~60-byte lines (same bytes every time).
python3 - "$WORK/in/data.txt" "$SIZE_MB" "$TEXT" <<'PY'
import random, sys
path, size, text = sys.argv[1], int(sys.argv[2]) << 20, sys.argv[3]
rng = random.Random(1234)
words = {
    "mixed": ["alpha", "beta", "gamma", "delta", "straße", "café", "naïve", "omega", "sigma", "kappa"],
    "ascii": ["alpha", "beta", "gamma", "delta", "strasse", "cafe", "naive", "omega", "sigma", "kappa"],
    "nonascii": ["αλφα", "βήτα", "γάμμα", "δέλτα", "straße", "привет", "мир", "ωμέγα", "σίγμα", "καππα"],
}[text]
block = "".join(" ".join(rng.choice(words) for _ in range(8)) + "\n" for _ in range(20000)).encode()
with open(path, "wb") as f:
    written = 0
    while written < size:
        f.write(block); written += len(block)
PY
BYTES=$(stat -c %s "$WORK/in/data.txt")
median() { sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
time_it() { # command... → seconds (median of 3), output to $WORK/out
  for _ in 1 2 3; do
    rm -rf "$WORK/out"; mkdir -p "$WORK/out"
    sync
    local t0 t1; t0=$(date +%s.%N); "$@" >/dev/null; t1=$(date +%s.%N)
    echo "$t1 - $t0" | bc -l
  done | median
}
env_run() { # builtin params [cadence] → runs `pipe processor` with the protocol environment
  local extra=()
  if [ -n "${3:-}" ]; then extra=("PIPELINE_CHECKPOINT=$3"); fi
  env PIPELINE_INPUTS="[\"$WORK/in/data.txt\"]" PIPELINE_INPUT_ROOT="$WORK/in" \
    PIPELINE_OUTPUT_DIR="$WORK/out" PIPELINE_PARAMS="$2" "${extra[@]}" "$PIPE" processor "$1"
}
cat "$WORK/in/data.txt" > /dev/null  # warm the page cache
t_cp=$(time_it cp "$WORK/in/data.txt" "$WORK/out/data.txt")
t_tr=$(time_it sh -c "tr a-z A-Z < '$WORK/in/data.txt' > '$WORK/out/data.txt'")
t_copy=$(time_it env_run copy '{}')
t_ascii=$(time_it env_run upper '{"mode":"ascii"}')
t_uni=$(time_it env_run upper '{"mode":"unicode"}')
# Checkpoint cost: the default cadence (64 MiB / 5 s) above; here none (one final checkpoint per
# input) and the demo's every 10,000 lines.
t_none=$(time_it env_run upper '{"mode":"ascii"}' '{}')
t_10k=$(time_it env_run upper '{"mode":"ascii"}' '{"everyLines":10000}')
row() {
  printf '%-34s %8.0f MB/s   %5.2fx cp time   %5.2fx tr speed\n' "$1" \
    "$(echo "$BYTES / $2 / 1048576" | bc -l)" "$(echo "$2 / $t_cp" | bc -l)" "$(echo "$t_tr / $2" | bc -l)"
}
echo "input: $((BYTES >> 20)) MiB of $TEXT text, median of 3"
row "cp (floor)" "$t_cp"
row "tr a-z A-Z" "$t_tr"
row "pipe processor copy" "$t_copy"
row "pipe processor upper (ascii)" "$t_ascii"
row "pipe processor upper (unicode)" "$t_uni"
row "upper (ascii), no checkpoints" "$t_none"
row "upper (ascii), every 10000 lines" "$t_10k"
printf 'checkpoint cost, default cadence: %.1f%%; every 10000 lines: %.1f%%\n' \
  "$(echo "($t_ascii / $t_none - 1) * 100" | bc -l)" "$(echo "($t_10k / $t_none - 1) * 100" | bc -l)"
