#!/usr/bin/env python3
"""Interleaved A/B of full pipe builds (-j2) on copies of one gen.py workload.

    bench/ab_full.py WORKDIR ROUNDS N NAME=BINARY NAME=BINARY...

Each round builds once with every binary (the order alternates between rounds), each in its own
copy of the workload after removing pipe's outputs, state, cache and locks (untimed, then
`sync`). Prints per binary the median, min, max and every run, and for two binaries the median
and range of the per-round ratio (robust to the machine's load drifting between rounds), and the
user and system CPU seconds of each build's process tree (less sensitive to other load than
wall time; file-system work is system time)."""
import resource, subprocess, sys, time, shutil, os, statistics
GEN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "gen.py")
wdir, rounds, n = os.path.abspath(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
bins = [(a.split("=", 1)[0], os.path.abspath(a.split("=", 1)[1])) for a in sys.argv[4:]]
base = f"{wdir}/ab-{n}"
if not os.path.exists(f"{base}/src"):
    subprocess.run(["python3", GEN, f"{base}/src", "--n", str(n)], check=True, capture_output=True)
for name, _ in bins:
    if not os.path.exists(f"{base}/{name}"):
        shutil.copytree(f"{base}/src", f"{base}/{name}")
times = {name: [] for name, _ in bins}
cpu = {name: [] for name, _ in bins}  # (user, sys) seconds of the build's process tree
for r in range(rounds):
    order = bins if r % 2 == 0 else list(reversed(bins))
    for name, binary in order:
        d = f"{base}/{name}"
        for x in ["pipe-out", "pipe-all", "state", "cache", "locks"]:
            shutil.rmtree(f"{d}/{x}", ignore_errors=True)
        subprocess.run(["sync"])
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        t = time.monotonic()
        subprocess.run([binary, "build", "-q", "-j2"], cwd=d, check=True)
        times[name].append(time.monotonic() - t)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu[name].append((after.ru_utime - before.ru_utime, after.ru_stime - before.ru_stime))
names = [name for name, _ in bins]
if len(names) == 2:
    ratios = sorted(b / a for a, b in zip(times[names[0]], times[names[1]]))
    print(f"paired ratio {names[1]}/{names[0]} per round: median {statistics.median(ratios):.3f}  range {ratios[0]:.3f}-{ratios[-1]:.3f}")
for name, ts in times.items():
    print(f"{name:10s} median {statistics.median(ts):.3f} s  min {min(ts):.3f}  max {max(ts):.3f}  per stage {statistics.median(ts)/n*1000:.2f} ms  runs {' '.join(f'{t:.2f}' for t in ts)}")
for name, cs in cpu.items():
    users, syss = [u for u, _ in cs], [k for _, k in cs]
    print(f"{name:10s} CPU of the process tree: user median {statistics.median(users):.3f} s, sys median {statistics.median(syss):.3f} s (sys range {min(syss):.3f}-{max(syss):.3f})")
