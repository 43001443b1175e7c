"""Helpers of the black-box suite: run the real `pipe` binary in a project folder and look at files.

Why this module exists: every black-box test needs the same few things -- a throw-away project,
a way to run `pipe` there that can never hang the suite, a byte-and-mtime snapshot of a whole tree
to prove "nothing was written", readers for the state JSON, and a small external processor whose
behaviour a test controls through `params`. They live here once; `conftest.py` exposes them as
fixtures. Nothing here touches the network or the repository's own data folders.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
PY_PROCESSORS = REPO / "processors" / "python"

DEFAULT_TIMEOUT = 60.0
"""Seconds any single `pipe` invocation may take before the test fails instead of hanging."""

WAIT_TIMEOUT = 20.0
"""Seconds to wait for a file a background process is expected to create."""


def pipe_binary() -> Path:
    """The binary under test: $PIPE_BIN, else <repo>/target/debug/pipe."""
    given = os.environ.get("PIPE_BIN")
    return Path(given).resolve() if given else REPO / "target" / "debug" / "pipe"


def base_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of every `pipe` run: the test's own, without fault injection, NO_COLOR=1."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PIPE_FAULT", "PIPE_FAILPOINT", "PIPELINE_"))}
    env["NO_COLOR"] = "1"
    env.pop("PIPE_BIN", None)
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    if extra:
        env.update(extra)
    return env


@dataclass
class Result:
    args: list[str]
    returncode: int
    stdout: str
    stderr: str

    @property
    def output(self) -> str:
        return self.stdout + self.stderr

    def __str__(self) -> str:  # shown by failing asserts
        return f"pipe {' '.join(self.args)} -> {self.returncode}\n--- stdout\n{self.stdout}\n--- stderr\n{self.stderr}"


# --------------------------------------------------------------------------------------- snapshots


def snapshot(root: Path) -> dict[str, tuple]:
    """Every path under `root` (relative): ("dir",) for folders, ("file", bytes, mtime_ns) for files,
    ("link", target) for symlinks."""
    result: dict[str, tuple] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        base = Path(dirpath)
        for name in dirnames + filenames:
            path = base / name
            rel = path.relative_to(root).as_posix()
            if path.is_symlink():
                result[rel] = ("link", os.readlink(path))
            elif path.is_dir():
                result[rel] = ("dir",)
            else:
                st = path.stat()
                result[rel] = ("file", path.read_bytes(), st.st_mtime_ns)
    return result


def snapshot_diff(before: dict[str, tuple], after: dict[str, tuple]) -> list[str]:
    """Human-readable differences between two snapshots (empty when identical)."""
    diffs = []
    for path in sorted(set(before) | set(after)):
        a, b = before.get(path), after.get(path)
        if a == b:
            continue
        if a is None:
            diffs.append(f"created {path}")
        elif b is None:
            diffs.append(f"removed {path}")
        elif a[0] != b[0]:
            diffs.append(f"{path}: {a[0]} -> {b[0]}")
        elif a[0] == "file" and a[1] != b[1]:
            diffs.append(f"{path}: content changed")
        elif a[0] == "file":
            diffs.append(f"{path}: mtime changed")
        else:
            diffs.append(f"{path}: changed")
    return diffs


def files_only(snap: dict[str, tuple], under: str = "") -> dict[str, tuple]:
    """The files of a snapshot below `under` (relative to it), without pipe's staging folders."""
    prefix = f"{under.rstrip('/')}/" if under else ""
    return {
        path[len(prefix):]: entry
        for path, entry in snap.items()
        if entry[0] == "file" and path.startswith(prefix) and ".pipe-staging" not in path.split("/")
    }


# ------------------------------------------------------------------------------------------ waiting


def wait_for(predicate, what: str, timeout: float = WAIT_TIMEOUT, interval: float = 0.02):
    """Poll `predicate()` until it returns a truthy value, or fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


def wait_for_file(path: Path, timeout: float = WAIT_TIMEOUT, proc: subprocess.Popen | None = None) -> Path:
    """Wait until `path` exists; fail early if `proc` (the process expected to create it) exits."""

    def ready():
        if path.exists():
            return True
        if proc is not None and proc.poll() is not None:
            out, err = proc.communicate()
            raise AssertionError(f"process exited with {proc.returncode} before {path} appeared\n{out}\n{err}")
        return False

    wait_for(ready, f"{path}", timeout)
    return path


def process_alive(pid: int) -> bool:
    """Whether `pid` is a live (not zombie) process."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    for line in status.splitlines():
        if line.startswith("State:"):
            return "Z" not in line.split()[1] and "X" not in line.split()[1]
    return True


def stop(proc: subprocess.Popen) -> None:
    """Kill a background process (and its group) if it still runs; reap it."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            proc.kill()
        except ProcessLookupError:
            pass
    try:
        proc.communicate(timeout=10)
    except (subprocess.TimeoutExpired, ValueError):
        pass


# ------------------------------------------------------------------------------------------ project


class Project:
    """A throw-away pipe project folder and the binary to run in it."""

    def __init__(self, root: Path, binary: Path) -> None:
        self.root = root
        self.binary = binary
        self._background: list[subprocess.Popen] = []

    # files
    def path(self, rel: str) -> Path:
        return self.root / rel

    def write(self, rel: str, data: str | bytes) -> Path:
        path = self.root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(data, bytes):
            path.write_bytes(data)
        else:
            path.write_text(data, encoding="utf-8")
        return path

    def read(self, rel: str) -> bytes:
        return (self.root / rel).read_bytes()

    def exists(self, rel: str) -> bool:
        return (self.root / rel).exists()

    def write_pipefile(self, spec: dict[str, Any] | str, name: str = "Pipefile.json") -> Path:
        text = spec if isinstance(spec, str) else json.dumps(spec, indent=2, ensure_ascii=False) + "\n"
        return self.write(name, text)

    def pipefile(self, name: str = "Pipefile.json") -> dict[str, Any]:
        return json.loads(self.read(name))

    def edit_pipefile(self, change, name: str = "Pipefile.json") -> None:
        """Apply `change(spec_dict)` to the Pipefile in place."""
        spec = self.pipefile(name)
        change(spec)
        self.write_pipefile(spec, name)

    def stage_spec(self, spec: dict[str, Any], name: str) -> dict[str, Any]:
        return next(s for s in spec["stages"] if s["name"] == name)

    def snapshot(self) -> dict[str, tuple]:
        return snapshot(self.root)

    # state
    def json(self, rel: str) -> Any:
        return json.loads(self.read(rel))

    def run_record(self, run_id: str) -> dict[str, Any]:
        return self.json(f"state/run_{run_id}.json")

    def stage_record(self, stage: str) -> dict[str, Any]:
        return self.json(f"state/stage_{stage}.json")

    def metrics(self, run_id: str) -> dict[str, Any]:
        return self.json(f"state/metrics_{run_id}.json")

    def marker(self, output_dir: str, stage: str) -> dict[str, Any]:
        return self.json(f"{output_dir}/.{stage}.done")

    def run_ids(self) -> set[str]:
        state = self.root / "state"
        if not state.is_dir():
            return set()
        return {p.name[len("run_"):-len(".json")] for p in state.glob("run_*.json")}

    def statuses(self, run_id: str) -> dict[str, str]:
        """Stage name -> status in the run record of `run_id`."""
        return {s["name"]: s["status"] for s in self.run_record(run_id)["stages"]}

    # running
    def run(self, *args: str, env: dict[str, str] | None = None, timeout: float = DEFAULT_TIMEOUT, cwd: Path | None = None) -> Result:
        """Run `pipe ARGS` in the project folder and wait for it (failing after `timeout`)."""
        argv = [str(self.binary), *args]
        try:
            done = subprocess.run(
                argv,
                cwd=cwd or self.root,
                env=base_env(env),
                stdin=subprocess.DEVNULL,
                capture_output=True,
                timeout=timeout,
                check=False,
            )
        except subprocess.TimeoutExpired as err:
            raise AssertionError(f"pipe {' '.join(args)} did not finish within {timeout} s\n{err.stdout!r}\n{err.stderr!r}") from None
        return Result(list(args), done.returncode, done.stdout.decode("utf-8", "replace"), done.stderr.decode("utf-8", "replace"))

    def ok(self, *args: str, **kwargs) -> Result:
        """Run `pipe ARGS` and require exit 0."""
        result = self.run(*args, **kwargs)
        assert result.returncode == 0, str(result)
        return result

    def start(self, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen:
        """Start `pipe ARGS` in the background (own session, so signals reach only it); the fixture
        kills it at teardown if the test did not."""
        proc = subprocess.Popen(
            [str(self.binary), *args],
            cwd=self.root,
            env=base_env(env),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        self._background.append(proc)
        return proc

    def finish(self, proc: subprocess.Popen, timeout: float = DEFAULT_TIMEOUT) -> Result:
        """Wait for a background `pipe` and collect its output."""
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            stop(proc)
            raise AssertionError(f"background pipe did not finish within {timeout} s") from None
        return Result(list(map(str, proc.args[1:])), proc.returncode, out, err)

    def cleanup(self) -> None:
        for proc in self._background:
            stop(proc)


def copy_demo(dest: Path) -> None:
    """The repository's demo pipeline (Pipefile.json and input/) copied into `dest`."""
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copy2(REPO / "Pipefile.json", dest / "Pipefile.json")
    shutil.copytree(REPO / "input", dest / "input")


def line_of(text: str, needle: str, nth: int = 1) -> int:
    """1-based line number of the `nth` occurrence of `needle` in `text`."""
    pos = -1
    for _ in range(nth):
        pos = text.index(needle, pos + 1)
    return text.count("\n", 0, pos) + 1


# ------------------------------------------------------------------------------- external processor

PROC_PY = r'''
"""A test processor driven by PIPELINE_PARAMS. Writes one line per attempt to `counter`."""
import json, os, sys, time

params = json.loads(os.environ.get("PIPELINE_PARAMS") or "{}")
stage = os.environ["PIPELINE_STAGE"]
attempt = os.environ["PIPELINE_ATTEMPT"]
counter = params.get("counter", "runs.log")
with open(counter, "a", encoding="utf-8") as f:
    f.write(f"{stage} {attempt}\n")
with open(counter, encoding="utf-8") as f:
    my_runs = sum(1 for line in f if line.split()[0] == stage)
if "dumpEnv" in params:
    env = {k: v for k, v in os.environ.items() if k.startswith(("PIPELINE_", "OMP_", "RAYON_", "BB_"))}
    env["cwd"] = os.getcwd()
    env["fd3"] = os.path.exists("/proc/self/fd/3")
    with open(params["dumpEnv"], "w", encoding="utf-8") as f:
        json.dump(env, f)
if "spawnOrphan" in params:
    import subprocess
    child = subprocess.Popen(["sleep", "120"], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    with open(params["spawnOrphan"], "w") as f:
        f.write(str(child.pid))
if "badCheckpoint" in params:
    os.write(int(os.environ["PIPELINE_PROGRESS_FD"]), params["badCheckpoint"].encode() + b"\n")
if "pidFile" in params:
    with open(params["pidFile"] + ".tmp", "w") as f:
        f.write(str(os.getpid()))
    os.replace(params["pidFile"] + ".tmp", params["pidFile"])
if "block" in params:
    started, release = params["block"]
    with open(started, "w") as f:
        f.write(str(os.getpid()))
    deadline = time.monotonic() + 120
    while not os.path.exists(release):
        if time.monotonic() > deadline:
            print("never released", file=sys.stderr)
            sys.exit(1)
        time.sleep(0.02)
if my_runs <= params.get("failTimes", 0):
    print(params.get("message", "transient trouble"), file=sys.stderr)
    sys.exit(params.get("failCode", 75))
if "exit" in params:
    print(params.get("message", "failing on purpose"), file=sys.stderr)
    sys.exit(params["exit"])
root = os.environ["PIPELINE_INPUT_ROOT"]
out = os.environ["PIPELINE_OUTPUT_DIR"]
if "PIPELINE_INPUTS_FILE" in os.environ:
    with open(os.environ["PIPELINE_INPUTS_FILE"], encoding="utf-8") as f:
        inputs = json.load(f)
else:
    inputs = json.loads(os.environ["PIPELINE_INPUTS"])
for path in inputs:
    dest = os.path.join(out, os.path.relpath(path, root))
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    with open(path, "rb") as src, open(dest, "wb") as dst:
        data = src.read()
        dst.write(data.upper() if params.get("upper") else data)
sys.exit(0)
'''


def proc_stage(name: str, inputs: list[str], output_dir: str, params: dict[str, Any] | None = None, version: str = "1", **extra) -> dict[str, Any]:
    """A stage running the test processor `proc.py` (which the project must contain).

    proc.py keeps its instrumentation (counter, pid and handshake files) in the project folder, so
    the stage lets the sandbox write there (`sandbox.writablePaths`); the offline tests use stages
    of their own."""
    stage: dict[str, Any] = {
        "name": name,
        "processor": {"command": ["python3", "proc.py"], "version": version},
        "inputs": inputs,
        "outputDir": output_dir,
        "sandbox": {"writablePaths": ["."]},
    }
    if params is not None:
        stage["params"] = params
    stage.update(extra)
    return stage


def builtin_stage(name: str, builtin: str, inputs: list[str], output_dir: str, **extra) -> dict[str, Any]:
    stage: dict[str, Any] = {"name": name, "processor": {"builtin": builtin, "version": "1"}, "inputs": inputs, "outputDir": output_dir}
    stage.update(extra)
    return stage


def pipeline(*stages: dict[str, Any], **settings) -> dict[str, Any]:
    spec: dict[str, Any] = {"version": 1, "stages": list(stages)}
    if settings:
        spec["settings"] = settings
    return spec


# A Python processor (next to a copy of the Python SDK in its folder) that upper-cases lines and,
# on the line BLOCK, creates `started` and waits for a `release` file: a test can act while an
# attempt is provably mid-stage.
SLOW_UPPER = '''
"""upper-cases lines; on the line BLOCK it signals `started` and waits for `release`."""
import os, sys, time
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import pipe_sdk

def upper(line: bytes) -> bytes:
    if line == b"BLOCK\\n" and not os.path.exists("release"):
        open("started", "w").close()
        deadline = time.monotonic() + 300
        while not os.path.exists("release") and time.monotonic() < deadline:
            time.sleep(0.02)
    return line.decode("utf-8").upper().encode("utf-8")

sys.exit(pipe_sdk.run_lines(upper))
'''
