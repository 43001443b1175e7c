#!/usr/bin/env python3
"""The benchmark runner (called by bench/run.sh, which installs the peers and finds the binary).

    bench/run.py --pipe PATH [--smoke] [--only SECTION...] [--n N...] [--map-n N...]
                 [--size-mb MB] [--runs R] [--out DIR] [--work DIR]

Sections (all by default): full, noop, onetouch, hashing, processing, mapnoop, memory.
Every timed section is ONE hyperfine invocation with pipe and its peers, so they share the
machine's state at that moment. Results: DIR/results.md (printed at the end), DIR/results.json,
and hyperfine's own exports in DIR/json/. See bench/README.md for what each row means.

Python 3 standard library only.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
GEN = HERE / "gen.py"
SECTIONS = ["full", "noop", "onetouch", "hashing", "processing", "mapnoop", "memory"]

# The targets of issue 9: section → (description, predicate on the ratio).
TARGETS = {
    "noop": ("≤ 1.0× faster of ninja/make (N=10,000)", lambda r: r <= 1.0),
    "onetouch": ("≤ 1.0× ninja", lambda r: r <= 1.0),
    "full": ("≤ 1.2× ninja", lambda r: r <= 1.2),
    "hashing-b3sum": ("≤ 1.1× b3sum MT", lambda r: r <= 1.1),
    "hashing-sha256": ("≥ 3× faster than sha256sum (≤ 0.33×)", lambda r: r <= 1 / 3),
    "upper-tr": ("≥ 1.0× tr speed (time ≤ 1.0×)", lambda r: r <= 1.0),
    "upper-cp": ("≤ 1.5× cp", lambda r: r <= 1.5),
    "checkpoint": ("< 5% cost", lambda r: r < 1.05),
    "mapnoop": ("≤ 1.0× ninja", lambda r: r <= 1.0),
}


def log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def q(path) -> str:
    return shlex.quote(str(path))


@dataclass
class Cmd:
    name: str  # shown in tables; pipe rows start with "pipe"
    command: str  # a shell command (hyperfine runs it with sh)
    prepare: str = "true"
    peer: bool = False  # a peer (compared against), not pipe


@dataclass
class Row:
    """One line of the summary table."""

    section: str
    case: str
    pipe: str = ""
    pipe_s: float | None = None
    peer: str = ""
    peer_s: float | None = None
    ratio: float | None = None
    target: str = ""
    met: str = ""
    note: str = ""


@dataclass
class Ctx:
    pipe: Path
    out: Path
    work: Path
    runs: int
    warmup: int
    smoke: bool
    tools: dict[str, str | None]  # tool → path, or None when missing
    rows: list[Row] = field(default_factory=list)
    details: list[str] = field(default_factory=list)  # markdown blocks per hyperfine run

    def have(self, tool: str) -> bool:
        return self.tools.get(tool) is not None

    def skip(self, section: str, case: str, reason: str) -> None:
        log(f"{section} {case}: skipped: {reason}")
        self.rows.append(Row(section, case, note=f"skipped: {reason}"))


# ------------------------------------------------------------------------------------- utilities


def sh(cmd: str, cwd: Path | None = None, check: bool = True, quiet: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run(
        cmd, shell=True, cwd=cwd, text=True,
        stdout=subprocess.PIPE if quiet else None, stderr=subprocess.PIPE if quiet else None,
    )
    if check and done.returncode != 0:
        raise RuntimeError(f"`{cmd}` in {cwd} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
    return done


def generate(ctx: Ctx, name: str, n: int, map_stage: bool) -> Path:
    """A fresh workload folder (regenerated from the seed every time the runner starts it)."""
    d = ctx.work / name
    shutil.rmtree(d, ignore_errors=True)
    args = [sys.executable, str(GEN), str(d), "--n", str(n), "--seed", "1"] + (["--map"] if map_stage else [])
    subprocess.run(args, check=True, stdout=subprocess.DEVNULL)
    return d


def timed_rss(cmd: str, cwd: Path) -> tuple[float, int]:
    """Runs `cmd` under /usr/bin/time: (wall seconds, peak RSS KiB) — RSS 0 without /usr/bin/time."""
    t = time.perf_counter()
    if os.path.exists("/usr/bin/time"):
        done = sh(f"/usr/bin/time -f 'RSS_KB=%M' {cmd}", cwd=cwd)
        rss = [int(l.split("=")[1]) for l in done.stderr.splitlines() if l.startswith("RSS_KB=")]
        return time.perf_counter() - t, rss[-1] if rss else 0
    sh(cmd, cwd=cwd)
    return time.perf_counter() - t, 0


PIPE_CLEAN = "rm -rf pipe-out pipe-all state cache locks"
NINJA_CLEAN = "rm -rf ninja-out ninja-all ninja-all.stamp ninja-all.stamp.rsp .ninja_log .ninja_deps"
MAKE_CLEAN = "rm -rf make-out make-all make-all.stamp"


def build_all(ctx: Ctx, d: Path, what: str) -> None:
    """Builds the workload once with every available tool (untimed except pipe's RSS, recorded)
    and checks that pipe's and the peers' outputs are the same bytes."""
    log(f"{what}: first build of {d.name} with every tool")
    wall, rss = timed_rss(f"{q(ctx.pipe)} build -q", d)
    (d / "first-build.json").write_text(json.dumps({"wallS": wall, "maxRssKb": rss}))
    if ctx.have("ninja"):
        sh("ninja -j2 --quiet", cwd=d)
    if ctx.have("make"):
        sh("make -j2 -s", cwd=d)
    check_same(ctx, d)


def check_same(ctx: Ctx, d: Path) -> None:
    """The first, a middle and the last output agree between pipe and the peers."""
    names = sorted(p.name for p in (d / "input").iterdir())
    pick = sorted({names[0], names[len(names) // 2], names[-1]})
    map_stage = not (d / "pipe-all").exists()
    for name in pick:
        want = (d / "input" / name).read_bytes().decode("utf-8")
        want = "".join(c.upper() if "a" <= c <= "z" else c for c in want).encode("utf-8")
        stage = "u" + name[1:7]
        paths = [d / "pipe-out" / name] if map_stage else [d / "pipe-out" / stage / name, d / "pipe-all" / stage / name]
        if ctx.have("ninja"):
            paths += [d / "ninja-out" / name] + ([] if map_stage else [d / "ninja-all" / name])
        if ctx.have("make"):
            paths += [d / "make-out" / name] + ([] if map_stage else [d / "make-all" / name])
        for p in paths:
            if p.read_bytes() != want:
                raise RuntimeError(f"workloads differ: {p} is not the ASCII upper-casing of input/{name}")


def hyperfine(ctx: Ctx, tag: str, cmds: list[Cmd], cwd: Path, warmup: int | None = None) -> dict[str, float] | None:
    """One hyperfine invocation over `cmds`; returns name → median seconds (None if it failed)."""
    export = ctx.out / "json" / f"{tag}.json"
    export.parent.mkdir(parents=True, exist_ok=True)
    warmup = ctx.warmup if warmup is None else warmup
    args = [
        "hyperfine", "--style", "basic", "--warmup", str(warmup), "--runs", str(ctx.runs),
        "--export-json", str(export), "--shell", "sh",
    ]
    for c in cmds:
        args += ["--prepare", c.prepare]
    for c in cmds:
        args += ["--command-name", c.name, c.command]
    log(f"hyperfine {tag}: " + ", ".join(c.name for c in cmds))
    done = subprocess.run(args, cwd=cwd, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    (ctx.out / "json" / f"{tag}.log").write_text(done.stdout)
    if done.returncode != 0:
        log(f"hyperfine {tag} failed:\n{done.stdout[-3000:]}")
        return None
    data = json.loads(export.read_text())
    medians = {}
    lines = [f"#### {tag}", "", f"in `{cwd.relative_to(ctx.work) if cwd.is_relative_to(ctx.work) else cwd}`, "
             f"{ctx.runs} runs after {warmup} warm-up", "",
             "| command | median | mean ± σ | min | max |", "| --- | ---: | ---: | ---: | ---: |"]
    for c, r in zip(cmds, data["results"]):
        med = statistics.median(r["times"])
        medians[c.name] = med
        lines.append(f"| `{c.name}` | {fmt_s(med)} | {fmt_s(r['mean'])} ± {fmt_s(r['stddev'] or 0)} | "
                     f"{fmt_s(r['min'])} | {fmt_s(r['max'])} |")
    lines.append("")
    lines.append("<details><summary>commands</summary>\n")
    for c in cmds:
        lines.append(f"- `{c.name}`: `{c.command}` (prepare: `{c.prepare}`)")
    lines.append("\n</details>\n")
    ctx.details.append("\n".join(lines))
    return medians


def fmt_s(s: float | None) -> str:
    if s is None:
        return "–"
    if s < 1:
        return f"{s * 1000:.1f} ms"
    return f"{s:.2f} s"


def compare(ctx: Ctx, section: str, case: str, medians: dict[str, float] | None, pipe: str,
            peers: list[str], target_key: str | None, note: str = "") -> None:
    """A summary row: pipe's median against the fastest of `peers` that were measured."""
    if medians is None:
        ctx.rows.append(Row(section, case, pipe=pipe, note="skipped: hyperfine failed (see json/*.log)"))
        return
    present = [p for p in peers if p in medians]
    if not present:
        ctx.rows.append(Row(section, case, pipe=pipe, pipe_s=medians.get(pipe), note="skipped: no peer available"))
        return
    best = min(present, key=lambda p: medians[p])
    if medians[best] <= 0:
        # A peer that finished below hyperfine's resolution (a tiny smoke workload): no ratio.
        ctx.rows.append(Row(section, case, pipe=pipe, pipe_s=medians.get(pipe), note=f"skipped: {best} took 0 s (below the timer's resolution)"))
        return
    ratio = medians[pipe] / medians[best]
    target, met = "", ""
    if target_key:
        target, ok = TARGETS[target_key]
        met = "yes" if ok(ratio) else "no"
    ctx.rows.append(Row(section, case, pipe, medians[pipe], best, medians[best], ratio, target, met, note))


def need_hyperfine(ctx: Ctx, section: str, case: str) -> bool:
    if ctx.have("hyperfine"):
        return True
    ctx.skip(section, case, "hyperfine not installed (apt-get install hyperfine)")
    return False


def stage_peers(ctx: Ctx, section: str, case: str) -> bool:
    if ctx.have("ninja") or ctx.have("make"):
        return True
    ctx.skip(section, case, "neither ninja nor make installed")
    return False


# -------------------------------------------------------------------------------------- sections


def section_full(ctx: Ctx, d: Path, n: int) -> None:
    case = f"N={n:,} stages + fan-in, -j2"
    if not (need_hyperfine(ctx, "full", case) and stage_peers(ctx, "full", case)):
        return
    cmds = [Cmd("pipe build -j2", f"{q(ctx.pipe)} build -q -j2", PIPE_CLEAN)]
    if ctx.have("ninja"):
        cmds.append(Cmd("ninja -j2", "ninja -j2 --quiet", NINJA_CLEAN, True))
    if ctx.have("make"):
        cmds.append(Cmd("make -j2", "make -j2 -s", MAKE_CLEAN, True))
    # No warm-up: every run starts from clean outputs anyway (the first build already ran).
    m = hyperfine(ctx, f"full-{n}", cmds, d, warmup=0)
    peer = ["ninja -j2"] if ctx.have("ninja") else ["make -j2"]
    per_stage = ""
    if m:
        per_stage = "per stage: " + ", ".join(f"{c.name.split()[0]} {m[c.name] / (n + 1) * 1000:.2f} ms" for c in cmds)
    compare(ctx, "full", case, m, "pipe build -j2", peer, "full", per_stage)


def section_noop(ctx: Ctx, d: Path, n: int) -> None:
    case = f"N={n:,} stages + fan-in"
    if not (need_hyperfine(ctx, "noop", case) and stage_peers(ctx, "noop", case)):
        return
    time.sleep(2.1)  # let the last build's outputs age past pipe's racy-timestamp window (2 s)
    cmds = [Cmd("pipe build", f"{q(ctx.pipe)} build -q"), Cmd("pipe build --dry-run", f"{q(ctx.pipe)} build --dry-run"),
            # The skip memo removed before each run: every stage decided the full way, as in the
            # first no-op after a build that ran them (with the stat cache warm, a lower bound).
            Cmd("pipe build (no skip memo)", f"{q(ctx.pipe)} build -q", "rm -f cache/skip-v1.json")]
    if ctx.have("ninja"):
        cmds += [Cmd("ninja", "ninja --quiet", peer=True), Cmd("ninja -n", "ninja -n --quiet", peer=True)]
    if ctx.have("make"):
        cmds += [Cmd("make -q", "make -q", peer=True), Cmd("make", "make -s", peer=True)]
    m = hyperfine(ctx, f"noop-{n}", cmds, d)
    compare(ctx, "noop", case, m, "pipe build", ["ninja", "make -q", "make"], "noop" if n >= 10000 else None)
    # What would rerun, and why (no target): against ninja's own dry run, else make -q's answer.
    compare(ctx, "noop", case + ", dry run", m, "pipe build --dry-run", ["ninja -n"] if ctx.have("ninja") else ["make -q"], None)
    compare(ctx, "noop", case + ", skip memo removed", m, "pipe build (no skip memo)", ["ninja", "make -q", "make"], None,
            "every stage decided the full way, as in the first no-op after a build that ran them")


ONE_INPUT = "input/f000007.txt"


def section_onetouch(ctx: Ctx, d: Path, n: int) -> None:
    case = f"N={n:,}: 1 input edited → 1 stage + fan-in"
    if not (need_hyperfine(ctx, "onetouch", case) and stage_peers(ctx, "onetouch", case)):
        return
    target = ONE_INPUT if n > 7 else "input/f000000.txt"
    # A new line every run (nanosecond clock): each tool sees a content change since its own last
    # build, and pipe cannot restore the stage from its output cache (never seen before).
    edit = f"echo \"edited $(date +%s%N)\" > {target}"
    cmds = [Cmd("pipe build", f"{q(ctx.pipe)} build -q", edit)]
    if ctx.have("ninja"):
        cmds.append(Cmd("ninja", "ninja --quiet", edit, True))
    if ctx.have("make"):
        cmds.append(Cmd("make", "make -s", edit, True))
    m = hyperfine(ctx, f"onetouch-{n}", cmds, d)
    compare(ctx, "onetouch", case, m, "pipe build", ["ninja"] if ctx.have("ninja") else ["make"], "onetouch",
            "" if ctx.have("ninja") else "ninja missing: compared with make")


def section_mapnoop(ctx: Ctx, n: int) -> None:
    case = f"map of {n:,} files, nothing changed"
    if not (need_hyperfine(ctx, "mapnoop", case) and stage_peers(ctx, "mapnoop", case)):
        return
    d = generate(ctx, f"map-{n}", n, True)
    build_all(ctx, d, "mapnoop")
    time.sleep(2.1)
    cmds = [Cmd("pipe build", f"{q(ctx.pipe)} build -q")]
    if ctx.have("ninja"):
        cmds.append(Cmd("ninja", "ninja --quiet", peer=True))
    if ctx.have("make"):
        cmds.append(Cmd("make -q", "make -q", peer=True))
    m = hyperfine(ctx, f"mapnoop-{n}", cmds, d)
    first = json.loads((d / "first-build.json").read_text())
    compare(ctx, "mapnoop", case, m, "pipe build", ["ninja"] if ctx.have("ninja") else ["make -q"], "mapnoop",
            f"first pipe build (untimed by hyperfine): {first['wallS']:.1f} s")
    memory_probe(ctx, d, f"map, {n:,} items")


MEMORY: list[tuple[str, float, int, int]] = []  # (workload, first-build s, its RSS KiB, no-op RSS KiB)


def memory_probe(ctx: Ctx, d: Path, label: str) -> None:
    """Peak RSS of the first build (recorded by build_all) and of a no-op build."""
    first = json.loads((d / "first-build.json").read_text())
    _, noop = timed_rss(f"{q(ctx.pipe)} build -q", d)
    MEMORY.append((label, first["wallS"], first["maxRssKb"], noop))


def make_text(path: Path, mib: int, kind: str) -> None:
    """Seeded text of `mib` MiB, ~60-byte lines: `ascii` (ASCII only) or `nonascii` (about 3 in 4
    characters outside ASCII: Greek, Cyrillic, German; 2-byte UTF-8)."""
    import random
    rng = random.Random(1234)
    if kind == "ascii":
        words = ["alpha", "beta", "gamma", "delta", "strasse", "cafe", "naive", "omega", "sigma", "kappa"]
    else:
        words = ["αλφα", "βήτα", "γάμμα", "δέλτα", "straße", "привет", "мир", "ωμέγα", "σίγμα", "καππα"]
    block = "".join(" ".join(rng.choice(words) for _ in range(8)) + "\n" for _ in range(20000)).encode()
    size = mib << 20
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        written = 0
        while written < size:
            f.write(block)
            written += len(block)


def section_hashing(ctx: Ctx, mib: int) -> None:
    case = f"{mib:,} MiB file, warm page cache, cold stat cache"
    if not need_hyperfine(ctx, "hashing", case):
        return
    d = ctx.work / "hashing"
    shutil.rmtree(d, ignore_errors=True)
    make_text(d / "input" / "big.txt", mib, "ascii")
    (d / "Pipefile.json").write_text(json.dumps({"version": 1, "stages": [{
        "name": "h", "processor": {"builtin": "copy", "version": "1"},
        "inputs": ["input/big.txt"], "outputDir": "out"}]}))
    # `--dry-run` writes nothing (no stat cache, no state): every run hashes the whole file.
    cmds = [Cmd("pipe build --dry-run", f"{q(ctx.pipe)} build --dry-run -q > /dev/null",
                "rm -rf cache state locks out")]
    ncpu = os.cpu_count() or 1
    if ctx.have("b3sum"):
        cmds.append(Cmd(f"b3sum --num-threads {ncpu}", f"{q(ctx.tools['b3sum'])} --num-threads {ncpu} input/big.txt",
                        peer=True))
        cmds.append(Cmd("b3sum --num-threads 1", f"{q(ctx.tools['b3sum'])} --num-threads 1 input/big.txt", peer=True))
    cmds.append(Cmd("sha256sum", "sha256sum input/big.txt", peer=True))
    cmds.append(Cmd("cat > /dev/null (floor)", "cat input/big.txt > /dev/null", peer=True))
    m = hyperfine(ctx, "hashing", cmds, d)
    if ctx.have("b3sum"):
        compare(ctx, "hashing", f"{case} vs b3sum", m, "pipe build --dry-run", [f"b3sum --num-threads {ncpu}"],
                "hashing-b3sum")
    else:
        ctx.rows.append(Row("hashing", f"{case} vs b3sum", note="skipped: b3sum not installed (cargo install b3sum)"))
    compare(ctx, "hashing", f"{case} vs sha256sum", m, "pipe build --dry-run", ["sha256sum"], "hashing-sha256")
    if m:
        ctx.rows.append(Row("hashing", f"{case}: floor", "pipe build --dry-run", m["pipe build --dry-run"],
                            "cat > /dev/null (floor)", m["cat > /dev/null (floor)"],
                            m["pipe build --dry-run"] / m["cat > /dev/null (floor)"],
                            note=f"pipe {mib / m['pipe build --dry-run']:.0f} MiB/s, cat {mib / m['cat > /dev/null (floor)']:.0f} MiB/s"))
    shutil.rmtree(d, ignore_errors=True)


def section_processing(ctx: Ctx, mib: int) -> None:
    for kind in ("ascii", "nonascii"):
        case = f"{mib:,} MiB {'ASCII-only' if kind == 'ascii' else 'non-ASCII-heavy'} text"
        if not need_hyperfine(ctx, "processing", case):
            continue
        d = ctx.work / f"proc-{kind}"
        shutil.rmtree(d, ignore_errors=True)
        data = d / "input" / "data.txt"
        make_text(data, mib, kind)
        (d / "Pipefile.json").write_text(json.dumps({"version": 1, "stages": [
            {"name": "copy", "processor": {"builtin": "copy", "version": "1"}, "inputs": ["input"], "outputDir": "work"},
            {"name": "upper", "processor": {"builtin": "upper", "version": "1"}, "inputs": ["work"],
             "outputDir": "output"}]}))

        def proc(mode: str, cadence: str | None, out: str) -> str:
            env = {
                "PIPELINE_INPUTS": json.dumps([str(data)]), "PIPELINE_INPUT_ROOT": str(data.parent),
                "PIPELINE_OUTPUT_DIR": str(d / out), "PIPELINE_PARAMS": json.dumps({"mode": mode}),
            }
            if cadence is not None:
                env["PIPELINE_CHECKPOINT"] = cadence
            return "env " + " ".join(f"{k}={q(v)}" for k, v in env.items()) + f" {q(ctx.pipe)} processor upper"

        fresh = lambda out: f"rm -rf {out} && mkdir -p {out}"  # noqa: E731
        cmds = [
            Cmd("cp (floor)", "cp input/data.txt o-cp/data.txt", fresh("o-cp"), True),
            Cmd("tr a-z A-Z", "tr a-z A-Z < input/data.txt > o-tr/data.txt", fresh("o-tr"), True),
            # cp leaves its output in the page cache; pipe's last checkpoint makes it durable.
            Cmd("dd conv=fdatasync (durable copy)", "dd if=input/data.txt of=o-dd/data.txt bs=4M conv=fdatasync status=none",
                fresh("o-dd"), True),
            Cmd("pipe processor upper (unicode)", proc("unicode", None, "o-pu"), fresh("o-pu")),
            Cmd("pipe processor upper (ascii)", proc("ascii", None, "o-pa"), fresh("o-pa")),
            Cmd("upper (unicode), no checkpoints", proc("unicode", "{}", "o-pn"), fresh("o-pn")),
            Cmd("upper (unicode), every 10000 lines", proc("unicode", '{"everyLines":10000}', "o-pl"), fresh("o-pl")),
            Cmd("pipe build (copy → upper)", f"{q(ctx.pipe)} build -q", "rm -rf work output state cache locks"),
            Cmd("cp + tr (shell demo)", "cp input/data.txt s-work/data.txt && tr a-z A-Z < s-work/data.txt > s-out/data.txt",
                "rm -rf s-work s-out && mkdir s-work s-out", True),
        ]
        m = hyperfine(ctx, f"processing-{kind}", cmds, d)
        mbs = ""
        if m:
            mbs = ", ".join(f"{k.split(' (')[0] if k.startswith('pipe processor') else k}: {mib / v:.0f} MiB/s"
                            for k, v in m.items() if k in ("cp (floor)", "tr a-z A-Z", "pipe processor upper (unicode)"))
        compare(ctx, "processing", f"{case}: upper (unicode) vs tr", m, "pipe processor upper (unicode)", ["tr a-z A-Z"],
                "upper-tr", mbs)
        compare(ctx, "processing", f"{case}: upper (unicode) vs cp", m, "pipe processor upper (unicode)", ["cp (floor)"],
                "upper-cp")
        compare(ctx, "processing", f"{case}: upper (unicode) vs a durable copy", m, "pipe processor upper (unicode)",
                ["dd conv=fdatasync (durable copy)"], None, "context: the copy fsynced, as pipe's output is")
        compare(ctx, "processing", f"{case}: upper (ascii) vs tr", m, "pipe processor upper (ascii)", ["tr a-z A-Z"],
                "upper-tr")
        compare(ctx, "processing", f"{case}: checkpoints (default 64 MiB/5 s) vs none", m,
                "pipe processor upper (unicode)", ["upper (unicode), no checkpoints"], "checkpoint")
        compare(ctx, "processing", f"{case}: checkpoints every 10,000 lines vs none", m,
                "upper (unicode), every 10000 lines", ["upper (unicode), no checkpoints"], "checkpoint")
        compare(ctx, "processing", f"{case}: full pipe build vs cp + tr", m, "pipe build (copy → upper)",
                ["cp + tr (shell demo)"], None, "pipe fsyncs its outputs and hashes them; the shell does neither")
        shutil.rmtree(d, ignore_errors=True)


def memory_by_input_size(ctx: Ctx, mib: int) -> None:
    """Peak RSS of a first `pipe build` of the demo pipeline (copy → upper, both streaming) over
    one ASCII input of mib/64, mib/8 and mib MiB, and each processor's own peak (`maxRssKb` of the
    run's metrics): constant with the input's size is the target for streaming stages."""
    sizes = sorted({max(1, mib // 64), max(1, mib // 8), mib})
    peaks = []
    for size in sizes:
        d = ctx.work / f"memory-{size}"
        shutil.rmtree(d, ignore_errors=True)
        make_text(d / "input" / "data.txt", size, "ascii")
        (d / "Pipefile.json").write_text(json.dumps({"version": 1, "stages": [
            {"name": "copy", "processor": {"builtin": "copy", "version": "1"}, "inputs": ["input"], "outputDir": "work"},
            {"name": "upper", "processor": {"builtin": "upper", "version": "1"}, "inputs": ["work"],
             "outputDir": "output"}]}))
        wall, rss = timed_rss(f"{q(ctx.pipe)} build -q --run-id m", d)
        stages = json.loads((d / "state" / "metrics_m.json").read_text())["stages"]
        peaks.append((size, rss))
        ctx.rows.append(Row("memory", f"demo (copy → upper) over {size:,} MiB", note=(
            f"peak RSS of pipe build {rss / 1024:.1f} MiB; processors (maxRssKb) copy "
            f"{stages['copy']['maxRssKb'] / 1024:.1f} MiB, upper {stages['upper']['maxRssKb'] / 1024:.1f} MiB "
            f"(build {wall:.1f} s, one sample)")))
        shutil.rmtree(d, ignore_errors=True)
    (small, small_rss), (big, big_rss) = peaks[0], peaks[-1]
    if big > small and small_rss:
        ctx.rows.append(Row("memory", f"demo: peak RSS at {big:,} vs {small:,} MiB of input",
                            ratio=big_rss / small_rss, target="constant (streaming stages)",
                            met="yes" if big_rss <= 1.5 * small_rss else "no",
                            note=f"{big_rss / 1024:.1f} vs {small_rss / 1024:.1f} MiB for {big / small:.0f}× the input"))


def section_memory(ctx: Ctx, mib: int) -> None:
    if not os.path.exists("/usr/bin/time"):
        ctx.skip("memory", "peak RSS", "/usr/bin/time not installed (apt-get install time)")
        return
    memory_by_input_size(ctx, mib)
    if not MEMORY:
        ctx.skip("memory", "peak RSS of a graph", "no workload was built in this run (run it with noop, full or mapnoop)")
        return
    for label, wall, first, noop in MEMORY:
        ctx.rows.append(Row("memory", label, note=f"peak RSS: first build {first / 1024:.1f} MiB, "
                                                   f"no-op build {noop / 1024:.1f} MiB (first build took "
                                                   f"{wall:.1f} s, one sample, -j default)"))


# ------------------------------------------------------------------------------------------ main


def filesystem_of(path: Path) -> str:
    """The type of the filesystem holding `path` (Linux: from /proc/self/mountinfo), and for ext4
    whether it has a journal (/proc/fs/jbd2 lists the devices with one): without one, every new
    inode is checked against those freed in about the last minute, which moves the one-touch and
    full-build rows of pipe and its peers alike."""
    try:
        best = None
        for line in Path("/proc/self/mountinfo").read_text().splitlines():
            left, _, right = line.partition(" - ")
            mount_point = left.split()[4].replace("\\040", " ")
            fstype, source = right.split()[:2]
            if path == Path(mount_point) or Path(mount_point) in path.parents:
                if best is None or len(mount_point) > len(best[0]):
                    best = (mount_point, fstype, source)
        if best is None:
            return "unknown"
        _, fstype, source = best
        if fstype != "ext4":
            return fstype
        device = os.path.basename(source)
        journals = os.listdir("/proc/fs/jbd2") if os.path.isdir("/proc/fs/jbd2") else []
        if any(j.startswith(device + "-") for j in journals):
            return "ext4 with a journal"
        return ("ext4 without a journal (one-touch and full-build rows depend on the inodes freed "
                "in the minutes before: see bench/README.md)")
    except (OSError, IndexError, ValueError):
        return "unknown"


def write_results(ctx: Ctx, args, started: float) -> Path:
    commit = sh("git rev-parse --short HEAD", cwd=HERE, check=False).stdout.strip() or "unknown"
    dirty = sh("git status --porcelain --untracked-files=no", cwd=HERE, check=False).stdout.strip()
    version = sh(f"{q(ctx.pipe)} --version", check=False).stdout.strip()
    lines = [
        "# pipe benchmark results" + (" (SMOKE MODE: tiny sizes, timings meaningless)" if ctx.smoke else ""),
        "",
        f"- date: {time.strftime('%Y-%m-%d %H:%M:%S %Z')}; wall time of the run {time.time() - started:.0f} s",
        f"- machine: {os.cpu_count()} CPUs, {os.uname().sysname} {os.uname().release}; load average now "
        f"{' '.join(f'{x:.2f}' for x in os.getloadavg())} (other work on the machine skews timings)",
        f"- commit: {commit}{' (+ uncommitted changes)' if dirty else ''}; binary `{ctx.pipe}` ({version})",
        f"- workloads in `{ctx.work}`: {filesystem_of(ctx.work)}",
        f"- hyperfine: {ctx.runs} runs after {ctx.warmup} warm-up per command; every number is a median",
        "- tools: " + ", ".join(f"{k} {'✓' if v else 'missing'}" for k, v in ctx.tools.items()),
        "- ratio = pipe median ÷ median of the fastest peer in the same hyperfine run (< 1: pipe faster)",
        "",
        "## Summary",
        "",
        "| section | case | pipe | median | best peer | median | ratio | target | met | note |",
        "| --- | --- | --- | ---: | --- | ---: | ---: | --- | --- | --- |",
    ]
    for r in ctx.rows:
        ratio = f"{r.ratio:.2f}×" if r.ratio is not None else "–"
        lines.append(f"| {r.section} | {r.case} | {f'`{r.pipe}`' if r.pipe else '–'} | {fmt_s(r.pipe_s)} | "
                     f"{f'`{r.peer}`' if r.peer else '–'} | {fmt_s(r.peer_s)} | {ratio} | {r.target or '–'} | "
                     f"{r.met or '–'} | {r.note} |")
    lines += ["", "## Every hyperfine run", ""] + ctx.details
    path = ctx.out / "results.md"
    path.write_text("\n".join(lines) + "\n")
    (ctx.out / "results.json").write_text(json.dumps([r.__dict__ for r in ctx.rows], indent=1))
    return path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pipe", type=Path, required=True)
    ap.add_argument("--smoke", action="store_true", help="tiny sizes, 1 run, no warm-up: checks the harness runs")
    ap.add_argument("--only", nargs="+", choices=SECTIONS, default=None)
    ap.add_argument("--n", nargs="+", type=int, default=None, help="stage counts (default 1000 10000; smoke 20)")
    ap.add_argument("--full-n", nargs="+", type=int, default=None,
                    help="stage counts of the full-build section (default: those of --n)")
    ap.add_argument("--map-n", nargs="+", type=int, default=None, help="map items (default 10000 100000; smoke 200)")
    ap.add_argument("--size-mb", type=int, default=None, help="hashing/processing input (default 1024; smoke 4)")
    ap.add_argument("--runs", type=int, default=None, help="hyperfine runs (default 5; smoke 1)")
    ap.add_argument("--out", type=Path, default=None, help="results folder (default target/bench[-smoke])")
    ap.add_argument("--work", type=Path, default=None, help="workload folder (default OUT/work)")
    ap.add_argument("--keep", action="store_true", help="keep the workload folders afterwards")
    args = ap.parse_args()

    repo = HERE.parent
    out = (args.out or repo / "target" / ("bench-smoke" if args.smoke else "bench")).resolve()
    work = (args.work or out / "work").resolve()
    shutil.rmtree(out / "json", ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    tools = {t: shutil.which(t) for t in ("hyperfine", "ninja", "make", "b3sum", "sha256sum")}
    if not tools["b3sum"] and (Path.home() / ".cargo" / "bin" / "b3sum").exists():
        tools["b3sum"] = str(Path.home() / ".cargo" / "bin" / "b3sum")
    ctx = Ctx(
        pipe=args.pipe.resolve(), out=out, work=work,
        runs=args.runs or (1 if args.smoke else 5), warmup=0 if args.smoke else 1, smoke=args.smoke, tools=tools,
    )
    for t, p in tools.items():
        if not p:
            log(f"{t} not found: its rows are skipped")
    sections = args.only or SECTIONS
    ns = args.n or ([20] if args.smoke else [1000, 10000])
    map_ns = args.map_n or ([200] if args.smoke else [10000, 100000])
    mib = args.size_mb or (4 if args.smoke else 1024)
    os.environ["NO_COLOR"] = "1"
    started = time.time()
    full_ns = args.full_n or ns

    def save() -> None:  # after every section: a long run that is stopped keeps what it measured
        write_results(ctx, args, started)

    stage_sections = [s for s in ("full", "noop", "onetouch") if s in sections]
    if stage_sections or "memory" in sections:
        for n in ns:
            d = generate(ctx, f"stages-{n}", n, False)
            build_all(ctx, d, f"N={n}")
            # `full` leaves every tool's outputs built by its last run, so noop and onetouch follow.
            if "full" in sections and n in full_ns:
                section_full(ctx, d, n)
                save()
            if "noop" in sections:
                section_noop(ctx, d, n)
                save()
            if "onetouch" in sections:
                section_onetouch(ctx, d, n)
                save()
            if "memory" in sections:
                memory_probe(ctx, d, f"{n:,} stages + fan-in")
            if not args.keep:
                shutil.rmtree(d, ignore_errors=True)
    if "hashing" in sections:
        section_hashing(ctx, mib)
        save()
    if "processing" in sections:
        section_processing(ctx, mib)
        save()
    if "mapnoop" in sections:
        for n in map_ns:
            section_mapnoop(ctx, n)
            save()
            if not args.keep:
                shutil.rmtree(ctx.work / f"map-{n}", ignore_errors=True)
    if "memory" in sections:
        section_memory(ctx, mib)
    path = write_results(ctx, args, started)
    print(path.read_text())
    log(f"results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
