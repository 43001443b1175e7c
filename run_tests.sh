#!/usr/bin/env bash
# One-click tests: lint, build, Rust tests and the black-box pytest suite against the built binary,
# with coverage gates (Rust lines >= 80% across cargo tests and pytest runs of the instrumented
# binary; Python SDK/processors >= 80%). Installs what it needs; exits non-zero on any failure;
# leaves `git status` clean (everything it writes is under target/ or .venv/, both ignored).
set -euo pipefail
cd "$(dirname "$0")"
ROOT=$PWD
RUST_MIN=${RUST_COVERAGE_MIN:-80}
PY_MIN=${PY_COVERAGE_MIN:-80}
LLVM_COV_VERSION=0.9.1

step() { printf '\n==> %s\n' "$*"; }

step "toolchain"
rustup component list --installed 2>/dev/null | grep -q '^llvm-tools' || rustup component add llvm-tools-preview
rustup component list --installed 2>/dev/null | grep -q '^rustfmt' || rustup component add rustfmt
rustup component list --installed 2>/dev/null | grep -q '^clippy' || rustup component add clippy
if ! cargo llvm-cov --version 2>/dev/null | grep -q "$LLVM_COV_VERSION"; then
  cargo install cargo-llvm-cov --locked --version "$LLVM_COV_VERSION"
fi

# The benchmark smoke test (tests/test_bench_smoke.py) runs pipe beside ninja and hyperfine when
# they are there; without them its rows say "skipped" and it still checks the harness runs.
if ! command -v ninja > /dev/null || ! command -v hyperfine > /dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get > /dev/null; then
    apt-get install -y -qq ninja-build hyperfine > /dev/null 2>&1 \
      || echo "warning: could not install ninja-build/hyperfine; benchmark smoke rows will be skipped"
  fi
fi

step "format and lint"
cargo fmt --all -- --check
cargo clippy --all-targets --locked -- -D warnings

step "python venv"
if [ ! -x .venv/bin/python ]; then python3 -m venv .venv; fi
.venv/bin/python -m pip install --quiet --disable-pip-version-check -r requirements-dev.txt

step "instrumented build and Rust tests"
export CARGO_TARGET_DIR="$ROOT/target/cov"
eval "$(cargo llvm-cov show-env --sh 2>/dev/null)"
cargo llvm-cov clean --workspace
cargo build --locked
cargo test --locked --workspace

step "black-box tests (pytest) against the instrumented binary"
if [ -n "${SLURM_CONF:-}" ]; then
  echo "Slurm: SLURM_CONF=$SLURM_CONF (tests/test_slurm.py runs against it)"
else
  echo "Slurm: SLURM_CONF is not set: tests/test_slurm.py is SKIPPED (start one with scripts/slurm-single-node.sh start)"
fi
export PIPE_BIN="$CARGO_TARGET_DIR/debug/pipe"
export COVERAGE_FILE="$ROOT/target/python.coverage"
.venv/bin/python -m pytest tests -p no:cacheprovider -q -rs \
  --cov=processors/python --cov-report=term-missing:skip-covered --cov-fail-under="$PY_MIN"

step "black-box tests again with the spawn server off (the posix_spawn fallback)"
# A build forks its processors from a spawn server (docs/offline.md); when that server cannot be
# started, every attempt is posix_spawned instead. PIPE_SPAWN_SERVER=off takes that path on
# purpose: the kill, interrupt, sandbox, memory, orphan and retry behaviour must be the same.
PIPE_SPAWN_SERVER=off .venv/bin/python -m pytest -p no:cacheprovider -q \
  tests/test_lock_and_interrupt.py tests/test_offline.py tests/test_memory.py \
  tests/test_orphans.py tests/test_failure_retry.py

step "Rust coverage (cargo tests + pytest runs of the binary)"
cargo llvm-cov report --summary-only --fail-under-lines "$RUST_MIN"

printf '\nall checks passed\n'
