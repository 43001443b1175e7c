#!/usr/bin/env bash
# How much of a full build is the engine waiting for its own syncs: interleaved full builds of the
# same workload, with the engine's fsync/fdatasync/syncfs as they are, and with them turned into
# no-ops by an LD_PRELOAD shim (an experiment only: a build without them is not crash-safe).
#
#   bench/sync_share.sh DIR [ROUNDS] [N]     (default 5 rounds, gen.py --n 1000; -j2)
#
# DIR decides the filesystem measured (a journaled ext4 is where syncs cost). The shim reaches
# only the engine process's libc calls: not the processors (the spawn server starts them with a
# cleared environment, so their SDK still syncs each output) and not the raw `syncfs` system call
# (one per fan-in). Prints each round's two wall times and the median of their ratio.
# Needs gcc (or cc). Uses $PIPE_BIN, else target/release/pipe.
set -euo pipefail
HERE=$(cd "$(dirname "$0")/.." && pwd)
DIR=${1:?usage: bench/sync_share.sh DIR [ROUNDS] [N]}
ROUNDS=${2:-5}
N=${3:-1000}
PIPE=${PIPE_BIN:-$HERE/target/release/pipe}
[ -x "$PIPE" ] || { echo "no pipe binary at $PIPE (cargo build --release, or set PIPE_BIN)" >&2; exit 2; }
CC=$(command -v gcc || command -v cc || true)
[ -n "$CC" ] || { echo "needs gcc or cc to build the LD_PRELOAD shim" >&2; exit 2; }
SHIM="$HERE/target/bench-nosync/libnosync.so"
mkdir -p "$(dirname "$SHIM")"
printf '%s\n' 'int fsync(int fd) { (void)fd; return 0; }' \
  'int fdatasync(int fd) { (void)fd; return 0; }' \
  'int syncfs(int fd) { (void)fd; return 0; }' > "$(dirname "$SHIM")/nosync.c"
"$CC" -shared -fPIC -O2 -o "$SHIM" "$(dirname "$SHIM")/nosync.c"

mkdir -p "$DIR"
WORK="$DIR/sync-share-$N"
rm -rf "$WORK"
python3 "$HERE/bench/gen.py" "$WORK" --n "$N" > /dev/null
cd "$WORK"
ratios=()
for round in $(seq "$ROUNDS"); do
  # Alternate which goes first, so that neither always follows the other's removals.
  if [ $((round % 2)) = 1 ]; then order="synced unsynced"; else order="unsynced synced"; fi
  for mode in $order; do
    rm -rf state cache pipe-out pipe-all locks
    sync
    preload=""
    [ "$mode" = unsynced ] && preload=$SHIM
    start=$(date +%s%N)
    LD_PRELOAD=$preload "$PIPE" build -q -j2 > /dev/null
    end=$(date +%s%N)
    eval "ms_$mode=$(((end - start) / 1000000))"
  done
  # shellcheck disable=SC2154
  ratio=$(awk -v a="$ms_unsynced" -v b="$ms_synced" 'BEGIN { printf "%.3f", a / b }')
  ratios+=("$ratio")
  echo "round $round: synced ${ms_synced} ms, engine syncs off ${ms_unsynced} ms, ratio $ratio"
done
median=$(printf '%s\n' "${ratios[@]}" | sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}')
echo "median ratio (engine syncs off / as built): $median"
cd "$HERE"
rm -rf "$WORK"
