#!/usr/bin/env python3
"""Interleaved A/B of one-touch builds: two or more pipe binaries on one built gen.py workload.

    bench/ab_onetouch.py WORKDIR ROUNDS NAME=BINARY NAME=BINARY...

WORKDIR is a gen.py workload that pipe has built once (and whose outputs are older than pipe's
2 s racy-timestamp window, so that only the edited stage reruns). Each round appends a line to
`input/f000009.txt` and runs `pipe build -q` with every binary in turn (the order alternates
between rounds): every build reruns that stage and the fan-in. Prints per binary the median, min
and max wall time and the median CPU (user + system) of the build's process tree, and for two
binaries the median and range of the per-round ratio (robust to the machine's load drifting
between rounds). The binaries share the workspace, so each build sees the previous one's state."""
import os
import resource
import statistics
import subprocess
import sys
import time


def main() -> None:
    if len(sys.argv) < 4:
        sys.exit(__doc__)
    workdir, rounds = sys.argv[1], int(sys.argv[2])
    binaries = dict(arg.split("=", 1) for arg in sys.argv[3:])
    os.chdir(workdir)
    wall = {name: [] for name in binaries}
    cpu = {name: [] for name in binaries}
    for r in range(rounds):
        order = list(binaries) if r % 2 == 0 else list(reversed(list(binaries)))
        for name in order:
            with open("input/f000009.txt", "a") as f:
                f.write(f"edit {r} {name}\n")
            before = resource.getrusage(resource.RUSAGE_CHILDREN)
            start = time.perf_counter()
            subprocess.run([binaries[name], "build", "-q"], check=True)
            wall[name].append(time.perf_counter() - start)
            after = resource.getrusage(resource.RUSAGE_CHILDREN)
            cpu[name].append(after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime)
    for name in binaries:
        runs = wall[name]
        print(f"{name}: median {statistics.median(runs) * 1000:.0f} ms (min {min(runs) * 1000:.0f}, "
              f"max {max(runs) * 1000:.0f}), cpu median {statistics.median(cpu[name]) * 1000:.0f} ms")
    names = list(binaries)
    if len(names) == 2:
        ratios = [b / a for a, b in zip(wall[names[0]], wall[names[1]])]
        print(f"paired {names[1]}/{names[0]}: median {statistics.median(ratios):.3f} "
              f"(range {min(ratios):.2f}-{max(ratios):.2f})")


if __name__ == "__main__":
    main()
