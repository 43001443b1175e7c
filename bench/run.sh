#!/usr/bin/env bash
# The benchmark harness of pipe against ninja, make, b3sum, sha256sum, tr and cp (bench/README.md).
#
#   bench/run.sh [--smoke] [--no-install] [--only SECTION...] [--n N...] [--map-n N...]
#                [--size-mb MB] [--runs R] [--out DIR] [--keep]
#
#   sections: full noop onetouch hashing processing mapnoop memory (default: all)
#   --smoke       tiny sizes, one run each: checks that the harness works (run_tests.sh runs it);
#                 never installs anything
#   --no-install  do not try to install missing peers; their rows say "skipped: ..."
#
# Installs what is missing when it can: `apt-get install -y ninja-build hyperfine` (as root with
# apt-get), `cargo install --locked b3sum`. Uses $PIPE_BIN, else target/release/pipe (built with
# `cargo build --release -p pipe-engine` if missing). Writes only under target/ (or --out):
# results.md (also printed), results.json, json/ (hyperfine exports and logs).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

install=1
for arg in "$@"; do
  case "$arg" in
    --smoke | --no-install) install=0 ;;
  esac
done
args=()
for arg in "$@"; do
  [ "$arg" = "--no-install" ] || args+=("$arg")
done

say() { printf '[bench] %s\n' "$*" >&2; }

if [ "$install" = 1 ]; then
  missing_apt=()
  command -v ninja > /dev/null || missing_apt+=(ninja-build)
  command -v hyperfine > /dev/null || missing_apt+=(hyperfine)
  command -v make > /dev/null || missing_apt+=(make)
  if [ ${#missing_apt[@]} -gt 0 ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get > /dev/null; then
      say "installing ${missing_apt[*]} with apt-get"
      if ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing_apt[@]}"; }; then
        say "apt-get install ${missing_apt[*]} failed: the rows needing them are skipped"
      fi
    else
      say "missing ${missing_apt[*]} and not root with apt-get: install them (apt-get install ${missing_apt[*]}); their rows are skipped"
    fi
  fi
  if ! command -v b3sum > /dev/null && [ ! -x "$HOME/.cargo/bin/b3sum" ]; then
    if command -v cargo > /dev/null; then
      say "installing b3sum with cargo install --locked b3sum"
      cargo install --locked b3sum || say "cargo install b3sum failed: the b3sum rows are skipped"
    else
      say "b3sum missing and no cargo: the b3sum rows are skipped"
    fi
  fi
fi

if [ -n "${PIPE_BIN:-}" ]; then
  PIPE=$PIPE_BIN
else
  PIPE=$ROOT/target/release/pipe
  if [ ! -x "$PIPE" ] || [ ! -x "$(dirname "$PIPE")/pipe-spawn" ]; then
    say "building the release binaries (cargo build --release -p pipe-engine)"
    cargo build --release --locked -p pipe-engine
  fi
fi
[ -x "$PIPE" ] || { say "no pipe binary at $PIPE"; exit 2; }
# Without its spawn server beside it, pipe forks every processor from a jemalloc process of its
# own (`pipe __zygote`), which costs more per stage: the numbers would not be those of an install.
[ -x "$(dirname "$PIPE")/pipe-spawn" ] ||
  say "warning: no pipe-spawn beside $PIPE: processors are forked by \`pipe __zygote\`, slower than an install"

exec python3 "$ROOT/bench/run.py" --pipe "$PIPE" ${args[@]+"${args[@]}"}
