#!/usr/bin/env python3
"""Per-stage file-system operations of a full pipe build (-j2, gen.py's N stages + fan-in).

    bench/fsops.py BINARY WORKDIR N

Generates (once) WORKDIR/nN with gen.py, removes pipe's outputs and state, builds under
`strace -ff` (one trace file per process, so no call is split across lines) and prints, divided
by N: folders created (each a new inode), files created (O_CREAT, but appends to files that
exist: the run log, audit log, process record), renames, links, removals and syncs, then the
paths (normalised) that occur at least N/4 times. Linux, needs strace."""
import re, subprocess, sys, shutil, os, collections, glob
GEN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "gen.py")
binary, wdir, n = os.path.abspath(sys.argv[1]), os.path.abspath(sys.argv[2]), int(sys.argv[3])
d = f"{wdir}/n{n}"
if not os.path.exists(d):
    subprocess.run(["python3", GEN, d, "--n", str(n)], check=True, capture_output=True)
for x in ["pipe-out", "pipe-all", "state", "cache", "locks", "tr"]:
    shutil.rmtree(f"{d}/{x}", ignore_errors=True)
os.makedirs(f"{d}/tr")
subprocess.run(["strace", "-ff", "-qq", "-o", f"{d}/tr/t", "-e", "trace=mkdir,mkdirat,openat,rename,renameat,renameat2,link,linkat,unlink,unlinkat,rmdir,fsync,fdatasync,syncfs",
                binary, "build", "-q", "-j2"], cwd=d, check=True)
c = collections.Counter(); pat = collections.Counter()
def norm(p):
    p = p.replace(d + "/", "")
    p = re.sub(r"[0-9a-f]{16,}", "H", p); p = re.sub(r"u\d{6}", "uN", p); p = re.sub(r"f\d{6}", "fN", p)
    p = re.sub(r"tmp-\d+", "tmp-P", p); p = re.sub(r"\d{8}T\d{6}Z-[0-9a-f]+", "RUN", p); p = re.sub(r"objects-v1/[0-9a-f]{2}", "objects-v1/XX", p)
    return p
for f in glob.glob(f"{d}/tr/t.*"):
    for line in open(f):
        m = re.match(r"(\w+)\((.*)\)\s+=\s+(-?\d+)", line)
        if not m: continue
        name, args, ret = m.groups(); ret = int(ret)
        if ret < 0: continue
        paths = re.findall(r'"([^"]*)"', args)
        if name in ("mkdir", "mkdirat"):
            c["mkdir (new dir inode)"] += 1; pat["mkdir " + norm(paths[0])] += 1
        elif name == "openat" and "O_CREAT" in args:
            if "O_APPEND" in args and not paths[0].endswith(".log"):
                c["open O_CREAT|O_APPEND (existing log files)"] += 1
            else:
                c["create file (new inode)"] += 1; pat["create " + norm(paths[0])] += 1
        elif name.startswith("rename"):
            c["rename"] += 1
        elif name in ("link", "linkat"):
            c["link"] += 1
        elif (name == "unlinkat" and "AT_REMOVEDIR" in args) or name == "rmdir":
            c["rmdir"] += 1; pat["rmdir " + norm(paths[0]) if paths else "rmdir ?"] += 1
        elif name in ("unlink", "unlinkat"):
            c["unlink"] += 1; pat["unlink " + norm(paths[0])] += 1
        elif name in ("fsync", "fdatasync", "syncfs"):
            c[name] += 1
for k, v in sorted(c.items()):
    print(f"  {k:45s} {v/n:6.2f} per stage ({v})")
print("  syncs per stage:", round(sum(c[k] for k in ("fsync", "fdatasync", "syncfs")) / n, 2))
print("  by path (>= N/4 occurrences):")
for k, v in sorted(pat.items(), key=lambda kv: -kv[1]):
    if v >= n / 4: print(f"    {v/n:5.2f} {k}")
