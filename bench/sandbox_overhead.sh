#!/usr/bin/env bash
# Per-stage cost of the offline sandbox: wall time of `pipe build` running one trivial stage, fresh
# each time (outputs, state and cache removed between runs, untimed), release binary.
#
#   bench/sandbox_overhead.sh [RUNS]                  (default 50 runs per row)
#   BASELINE_PIPE=/path/to/pipe bench/sandbox_overhead.sh   (adds rows for a binary without the
#                                                       sandbox, e.g. built from the commit before it)
#
# Rows, for an external stage (`/bin/true`) and the built-in `copy` of one 6-byte file:
#   strict    every layer: network namespace, Landlock, seccomp with user notification
#   static    `--offline-guard=static`: the re-exec helper and environment allowlist, no layer
#   baseline  BASELINE_PIPE, if given
# Prints mean, median and p90 in milliseconds, and the strict − baseline (or strict − static)
# difference of the medians: what the sandbox adds to one stage.
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${1:-50}
cargo build --release --locked --quiet
PIPE=$PWD/target/release/pipe
WORK=$(mktemp -d "${TMPDIR:-/tmp}/pipe-sandbox-bench.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
python3 - "$PIPE" "${BASELINE_PIPE:-}" "$WORK" "$RUNS" <<'PY'
import json, os, shutil, statistics, subprocess, sys, time
pipe, baseline, work, runs = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
stages = {
    "external /bin/true": {"processor": {"command": ["/bin/true"], "version": "1"}},
    "builtin copy": {"processor": {"builtin": "copy", "version": "1"}},
}
rows = [("strict", pipe, []), ("static", pipe, ["--offline-guard=static"])]
if baseline:
    rows.append(("baseline", baseline, []))

def measure(binary, args, stage):
    root = os.path.join(work, "p")
    shutil.rmtree(root, ignore_errors=True)
    os.makedirs(os.path.join(root, "input"))
    with open(os.path.join(root, "input", "a.txt"), "w") as f:
        f.write("hello\n")
    spec = {"version": 1, "stages": [{"name": "s", "inputs": ["input"], "outputDir": "out", **stage}]}
    with open(os.path.join(root, "Pipefile.json"), "w") as f:
        json.dump(spec, f)
    times = []
    for i in range(runs + 3):  # 3 warm-up runs
        for d in ("out", "state", "cache", "locks"):
            shutil.rmtree(os.path.join(root, d), ignore_errors=True)
        t = time.perf_counter()
        done = subprocess.run([binary, "build", "-q", *args], cwd=root, capture_output=True, timeout=120)
        elapsed = (time.perf_counter() - t) * 1000
        if done.returncode != 0:
            sys.exit(f"{binary} build {args} failed: {done.stderr.decode()}")
        if i >= 3:
            times.append(elapsed)
    times.sort()
    return statistics.mean(times), statistics.median(times), times[int(len(times) * 0.9) - 1]

print(f"pipe build of one trivial stage, {runs} runs per row (ms)")
for name, stage in stages.items():
    print(f"\n{name}")
    medians = {}
    for label, binary, args in rows:
        mean, median, p90 = measure(binary, args, stage)
        medians[label] = median
        print(f"  {label:9s} mean {mean:7.2f}   median {median:7.2f}   p90 {p90:7.2f}")
    reference = "baseline" if baseline else "static"
    print(f"  sandbox adds (strict - {reference}, medians): {medians['strict'] - medians[reference]:+.2f} ms")
PY
