"""Parallel stages under quotas: real processes, real intervals.

Each test processor records when it started and ended (CLOCK_MONOTONIC, shared by all processes)
and how many cores it may run on; the tests check the overlap the quotas allow and no more.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PIPE = os.environ.get("PIPE_BIN", str(REPO / "target" / "debug" / "pipe"))

WORKER = '''
import json, os, sys, time
params = json.loads(os.environ["PIPELINE_PARAMS"])
start = time.monotonic()
time.sleep(params["seconds"])  # the workload: a stage that takes this long
end = time.monotonic()
out = os.environ["PIPELINE_OUTPUT_DIR"]
with open(os.path.join(out, "interval.json"), "w") as f:
    json.dump({"start": start, "end": end, "cpus": os.environ["PIPELINE_CPUS"],
               "omp": os.environ.get("OMP_NUM_THREADS"), "affinity": sorted(os.sched_getaffinity(0))}, f)
'''


def project(tmp_path: Path, stages: list[dict], quotas: dict) -> Path:
    root = tmp_path / "p"
    (root / "input").mkdir(parents=True)
    (root / "input" / "x.txt").write_text("x\n")
    (root / "worker.py").write_text(WORKER)
    spec = {"version": 1, "settings": {"quotas": quotas}, "stages": stages}
    (root / "Pipefile.json").write_text(json.dumps(spec, indent=1))
    return root


def stage(name: str, seconds: float, **resources) -> dict:
    s = {
        "name": name,
        "processor": {"command": ["python3", "worker.py"], "version": "1"},
        "params": {"seconds": seconds},
        "inputs": ["input"],
        "outputDir": f"out_{name}",
    }
    if resources:
        s["resources"] = resources
    return s


def build(root: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "NO_COLOR": "1"}
    return subprocess.run([PIPE, "build", *args], cwd=root, env=env, capture_output=True, timeout=120)


def intervals(root: Path, names: list[str]) -> dict[str, dict]:
    return {n: json.loads((root / f"out_{n}" / "interval.json").read_text()) for n in names}


def max_overlap(spans: list[dict]) -> int:
    points = sorted([(s["start"], 1) for s in spans] + [(s["end"], -1) for s in spans], key=lambda p: (p[0], p[1]))
    depth = best = 0
    for _, delta in points:
        depth += delta
        best = max(best, depth)
    return best


def test_four_one_second_stages_run_two_at_a_time_under_a_two_cpu_quota(tmp_path):
    names = ["a", "b", "c", "d"]
    root = project(tmp_path, [stage(n, 1.0) for n in names], {"cpus": 2})
    result = build(root, "--run-id", "r")
    assert result.returncode == 0, result.stderr.decode()
    spans = intervals(root, names)
    assert max_overlap(list(spans.values())) == 2, spans
    wall = json.loads((root / "state" / "run_r.json").read_text())["durationMs"]
    # Two waves of 1 s: clearly less than the 4 s of running them one by one.
    assert 2000 <= wall < 3500, wall


def test_jobs_caps_concurrency_below_the_quota(tmp_path):
    names = ["a", "b", "c"]
    root = project(tmp_path, [stage(n, 0.3) for n in names], {"cpus": 2})
    assert build(root, "-j", "1").returncode == 0
    assert max_overlap(list(intervals(root, names).values())) == 1


def test_memory_and_io_quotas_bound_admission(tmp_path):
    stages = [stage("m1", 0.4, memoryMb=600), stage("m2", 0.4, memoryMb=600), stage("i1", 0.4, io=1), stage("i2", 0.4, io=1)]
    root = project(tmp_path, stages, {"cpus": 2, "memoryMb": 1000, "io": 1})
    assert build(root).returncode == 0
    spans = intervals(root, ["m1", "m2", "i1", "i2"])
    assert max_overlap([spans["m1"], spans["m2"]]) == 1, "two 600 MiB stages exceed a 1000 MiB quota"
    assert max_overlap([spans["i1"], spans["i2"]]) == 1, "two IO stages exceed one IO slot"


def test_each_processor_learns_and_is_pinned_to_its_cpu_quota(tmp_path):
    machine = len(os.sched_getaffinity(0))
    root = project(tmp_path, [stage("one", 0.01, cpus=1)], {"cpus": machine})
    assert build(root).returncode == 0
    seen = intervals(root, ["one"])["one"]
    assert seen["cpus"] == "1" and seen["omp"] == "1"
    if machine > 1:
        assert len(seen["affinity"]) == 1, seen


MEMORY_HOG = '''
import json, os, sys, time
params = json.loads(os.environ["PIPELINE_PARAMS"])
size = params["mb"] * 1024 * 1024
block = bytearray(size)
block[::4096] = b"x" * len(range(0, size, 4096))  # touch every page: resident, not just reserved
with open(os.path.join(os.environ["PIPELINE_OUTPUT_DIR"], "done.txt"), "w") as f:
    f.write("held %d MiB\\n" % params["mb"])
deadline = time.monotonic() + params["hold"]
while time.monotonic() < deadline:  # keep the memory while the watchdog samples
    time.sleep(0.05)
'''


def memory_project(tmp_path: Path, mb: int, hold: float) -> Path:
    root = tmp_path / f"mem{mb}"
    (root / "input").mkdir(parents=True)
    (root / "input" / "x.txt").write_text("x\n")
    (root / "hog.py").write_text(MEMORY_HOG)
    spec = {
        "version": 1,
        "stages": [{
            "name": "hog",
            "processor": {"command": ["python3", "hog.py"], "version": "1"},
            "params": {"mb": mb, "hold": hold},
            "inputs": ["input"],
            "outputDir": "out",
            "resources": {"memoryMb": 200},
            "retry": {"maxAttempts": 3, "baseDelayMs": 1, "retryableExitCodes": [75, -9, 137]},
        }],
    }
    (root / "Pipefile.json").write_text(json.dumps(spec))
    return root


def test_a_processor_over_its_memory_cap_is_killed_and_not_retried(tmp_path):
    root = memory_project(tmp_path, 700, hold=30)
    result = build(root, "--run-id", "r")
    assert result.returncode == 1, result.stderr.decode()
    record = json.loads((root / "state" / "stage_hog.json").read_text())
    assert [a["classification"] for a in record["attempts"]] == ["memory"]
    assert "memory cap of 200 MiB" in record["error"], record["error"]
    assert "200 MiB" in result.stderr.decode()
    metrics = json.loads((root / "state" / "metrics_r.json").read_text())
    assert metrics["stages"]["hog"]["maxRssKb"] > 200 * 1024


def test_a_processor_under_its_memory_cap_succeeds(tmp_path):
    root = memory_project(tmp_path, 100, hold=0.5)
    result = build(root, "--run-id", "r")
    assert result.returncode == 0, result.stderr.decode()
    metrics = json.loads((root / "state" / "metrics_r.json").read_text())
    assert 100 * 1024 <= metrics["stages"]["hog"]["maxRssKb"] < 200 * 1024


ESCAPER = '''
import os, subprocess, sys, time
out = os.environ["PIPELINE_OUTPUT_DIR"]
# A grandchild in the processor's process group that outlives the processor: no parent-death
# signal reaches it when pipe dies.
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
with open(os.environ["PIDFILE"] + ".tmp", "w") as f:
    f.write(str(child.pid))
os.rename(os.environ["PIDFILE"] + ".tmp", os.environ["PIDFILE"])
time.sleep(300)
'''


def wait_for(predicate, timeout=20.0):
    import time
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return False


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


def test_a_new_build_stops_what_a_killed_build_left_running(tmp_path):
    import signal
    root = tmp_path / "esc"
    (root / "input").mkdir(parents=True)
    (root / "input" / "x.txt").write_text("x\n")
    (root / "escaper.py").write_text(ESCAPER)
    sandbox = {"passEnv": ["PIDFILE"], "writablePaths": [str(tmp_path)]}
    spec = {"version": 1, "stages": [{"name": "esc", "processor": {"command": ["python3", "escaper.py"], "version": "1"}, "inputs": ["input"], "outputDir": "out", "sandbox": sandbox}]}
    (root / "Pipefile.json").write_text(json.dumps(spec))
    pidfile = tmp_path / "grandchild.pid"
    env = {**os.environ, "NO_COLOR": "1", "PIDFILE": str(pidfile)}
    first = subprocess.Popen([PIPE, "build"], cwd=root, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    grandchild = None
    try:
        assert wait_for(pidfile.exists), "the processor never started its grandchild"
        grandchild = int(pidfile.read_text())
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=10)
        assert alive(grandchild), "the grandchild should have survived pipe's death"
        # The next build takes the lock at once and stops the leftover before anything else.
        second = subprocess.run([PIPE, "build", "--dry-run"], cwd=root, env=env, capture_output=True, timeout=30)
        assert second.returncode == 0
        assert alive(grandchild), "a dry run takes no lock and kills nothing"
        third = subprocess.Popen([PIPE, "build"], cwd=root, env={**env, "PIDFILE": str(tmp_path / "again.pid")}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            assert wait_for(lambda: not alive(grandchild)), "the leftover grandchild still runs"
        finally:
            third.send_signal(signal.SIGKILL)
            third.wait(timeout=10)
    finally:
        first.kill()
        for pid_file in (pidfile, tmp_path / "again.pid"):
            if pid_file.exists():
                try:
                    os.kill(int(pid_file.read_text()), signal.SIGKILL)
                except ProcessLookupError:
                    pass


INSPECTOR = '''
import json, os, resource, stat
out = os.environ["PIPELINE_OUTPUT_DIR"]
fds = sorted(int(n) for n in os.listdir("/proc/self/fd"))
seen = {
    "addressSpace": list(resource.getrlimit(resource.RLIMIT_AS)),
    "stdin": os.read(0, 16).decode(),
    "stdinIsNull": os.path.realpath("/proc/self/fd/0") == "/dev/null",
    "fd3IsPipe": stat.S_ISFIFO(os.fstat(3).st_mode),
    "fds": fds,
    "affinity": sorted(os.sched_getaffinity(0)),
}
with open(os.path.join(out, "seen.json"), "w") as f:
    json.dump(seen, f)
'''


def test_the_processor_starts_with_its_limits_and_only_its_descriptors(tmp_path):
    """The helper, not a fork hook, sets these up: check what the processor actually gets."""
    root = project(tmp_path, [], {"cpus": len(os.sched_getaffinity(0))})
    (root / "inspect.py").write_text(INSPECTOR)
    spec = json.loads((root / "Pipefile.json").read_text())
    spec["stages"] = [{
        "name": "inspect",
        "processor": {"command": ["python3", "inspect.py"], "version": "1"},
        "inputs": ["input"],
        "outputDir": "out",
        "resources": {"cpus": 1, "virtualMemoryMb": 700},
    }]
    (root / "Pipefile.json").write_text(json.dumps(spec))
    result = build(root)
    assert result.returncode == 0, result.stderr.decode()
    seen = json.loads((root / "out" / "seen.json").read_text())
    assert seen["addressSpace"] == [700 << 20, 700 << 20]
    assert seen["stdin"] == "" and seen["stdinIsNull"], seen
    assert seen["fd3IsPipe"], "the progress pipe is fd 3"
    # stdio, the progress pipe and the descriptor listing /proc/self/fd itself: no report channel
    # (fd 4), nothing else of the engine's.
    assert len(seen["fds"]) == 5 and seen["fds"][:4] == [0, 1, 2, 3], seen["fds"]
    if len(os.sched_getaffinity(0)) > 1:
        assert len(seen["affinity"]) == 1, seen
