#!/usr/bin/env bash
# Builds the release binary and runs the demo pipeline twice: the first run copies input/ to work/
# and upper-cases it into output/; the second run finds nothing changed and skips both stages.
set -euo pipefail
cd "$(dirname "$0")"
cargo build --release --locked --quiet
PIPE=./target/release/pipe
echo "--- first build: runs both stages"
"$PIPE" build
echo "--- second build: nothing changed, both stages skipped"
"$PIPE" build
echo "--- output/hello.txt:"
cat output/hello.txt
