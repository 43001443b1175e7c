#!/usr/bin/env python3
"""Interleaved no-op builds of one built workload with two or more `pipe` binaries.

    bench/ab_noop.py WORKDIR ROUNDS NAME=BINARY... [--no-memo]

WORKDIR is a workload already built (e.g. `gen.py DIR --n 10000`, then `pipe build`, then a wait
of more than 2 s so the skip memo can vouch for the stages). Each round runs `pipe build -q` once
per binary, the order alternating between rounds. With `--no-memo`, `cache/skip-v1.json` is
removed before every build, so every stage is decided the full way (as in the first no-op after
a build that ran them). Prints each binary's median wall time, its median user and system CPU,
and the median and range of its per-round ratio to the first binary.
"""

from __future__ import annotations

import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path


def main() -> int:
    args = [a for a in sys.argv[1:] if a != "--no-memo"]
    no_memo = len(args) != len(sys.argv) - 1
    if len(args) < 3 or not all("=" in a for a in args[2:]):
        print(__doc__, file=sys.stderr)
        return 2
    work, rounds = Path(args[0]), int(args[1])
    binaries = [tuple(a.split("=", 1)) for a in args[2:]]
    wall: dict[str, list[float]] = {name: [] for name, _ in binaries}
    cpu: dict[str, list[tuple[float, float]]] = {name: [] for name, _ in binaries}
    for r in range(rounds):
        for name, binary in binaries if r % 2 == 0 else binaries[::-1]:
            if no_memo:
                (work / "cache" / "skip-v1.json").unlink(missing_ok=True)
            before = resource.getrusage(resource.RUSAGE_CHILDREN)
            start = time.perf_counter()
            subprocess.run([binary, "build", "-q"], cwd=work, check=True)
            wall[name].append(time.perf_counter() - start)
            after = resource.getrusage(resource.RUSAGE_CHILDREN)
            cpu[name].append((after.ru_utime - before.ru_utime, after.ru_stime - before.ru_stime))
    first = wall[binaries[0][0]]
    for name, _ in binaries:
        ratios = [a / b for a, b in zip(wall[name], first)]
        user = statistics.median(c[0] for c in cpu[name]) * 1000
        system = statistics.median(c[1] for c in cpu[name]) * 1000
        print(
            f"{name}: median {statistics.median(wall[name]) * 1000:.1f} ms, "
            f"user {user:.0f} ms, sys {system:.0f} ms; "
            f"paired ratio {statistics.median(ratios):.3f} (range {min(ratios):.3f}-{max(ratios):.3f})"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
