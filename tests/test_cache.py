"""The content-addressed output cache: restore instead of rerun, verify before trusting, gc safely."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import blake3

REPO = Path(__file__).resolve().parent.parent
PIPE = os.environ.get("PIPE_BIN", str(REPO / "target" / "debug" / "pipe"))

COUNTING_UPPER = '''
import json, os
with open(os.environ["PIPE_TEST_COUNTER"], "a") as c:
    c.write(os.environ["PIPELINE_STAGE"] + "\\n")
root, out = os.environ["PIPELINE_INPUT_ROOT"], os.environ["PIPELINE_OUTPUT_DIR"]
for path in json.loads(os.environ["PIPELINE_INPUTS"]):
    dest = os.path.join(out, os.path.relpath(path, root))
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    with open(path, "rb") as src, open(dest, "wb") as dst:
        dst.write(src.read().upper())
'''


def make(tmp_path: Path) -> Path:
    root = tmp_path / "p"
    (root / "input" / "sub").mkdir(parents=True)
    (root / "input" / "a.txt").write_text("alpha\n")
    (root / "input" / "sub" / "b.txt").write_text("beta\n")
    (root / "upper.py").write_text(COUNTING_UPPER)
    stages = [
        {"name": "copy", "processor": {"builtin": "copy", "version": "1"}, "inputs": ["input"], "outputDir": "work"},
        {"name": "up", "processor": {"command": ["python3", "upper.py"], "version": "1"}, "inputs": ["work"], "outputDir": "output",
         "sandbox": {"passEnv": ["PIPE_TEST_COUNTER"], "writablePaths": [str(tmp_path)]}},
    ]
    (root / "Pipefile.json").write_text(json.dumps({"version": 1, "stages": stages}))
    return root


def pipe(root: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "NO_COLOR": "1", "PIPE_TEST_COUNTER": str(root.parent / "counter")}
    return subprocess.run([PIPE, *args], cwd=root, env=env, capture_output=True, text=True, timeout=60)


def runs_of_processor(root: Path) -> int:
    counter = root.parent / "counter"
    return len(counter.read_text().splitlines()) if counter.exists() else 0


def outputs(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted((root / "output").rglob("*")) if p.is_file() and not p.name.startswith(".")}


def statuses(root: Path, run_id: str) -> dict[str, str]:
    run = json.loads((root / "state" / f"run_{run_id}.json").read_text())
    return {s["name"]: s["status"] for s in run["stages"]}


def test_reverting_an_edit_restores_without_running_a_processor(tmp_path):
    root = make(tmp_path)
    assert pipe(root, "build", "--run-id", "r1").returncode == 0
    first = outputs(root)
    (root / "input" / "a.txt").write_text("edited\n")
    assert pipe(root, "build", "--run-id", "r2").returncode == 0
    assert outputs(root)["output/a.txt"] == b"EDITED\n"
    ran = runs_of_processor(root)
    (root / "input" / "a.txt").write_text("alpha\n")
    plan = pipe(root, "build", "--dry-run")
    assert "restore from cache (outputs of run r1" in plan.stdout, plan.stdout
    result = pipe(root, "build", "--run-id", "r3")
    assert result.returncode == 0, result.stderr
    assert runs_of_processor(root) == ran, "a processor ran although the cache had the outputs"
    assert statuses(root, "r3") == {"copy": "restored", "up": "restored"}
    assert outputs(root) == first
    metrics = json.loads((root / "state" / "metrics_r3.json").read_text())
    assert metrics["totals"]["restored"] == 2 and metrics["totals"]["ran"] == 0
    assert pipe(root, "build", "--run-id", "r4").returncode == 0
    assert statuses(root, "r4") == {"copy": "skipped", "up": "skipped"}


def test_clean_keeps_the_cache_and_clean_cache_does_not(tmp_path):
    root = make(tmp_path)
    assert pipe(root, "build").returncode == 0
    first = outputs(root)
    assert pipe(root, "clean").returncode == 0
    assert not (root / "output" / "a.txt").exists()
    assert pipe(root, "build", "--run-id", "after-clean").returncode == 0
    assert statuses(root, "after-clean") == {"copy": "restored", "up": "restored"}
    assert outputs(root) == first and runs_of_processor(root) == 1
    assert pipe(root, "clean", "--cache").returncode == 0
    assert not (root / "cache").exists()
    assert pipe(root, "build", "--run-id", "after-cache").returncode == 0
    assert statuses(root, "after-cache") == {"copy": "succeeded", "up": "succeeded"}
    assert runs_of_processor(root) == 2


def test_a_corrupt_object_is_detected_and_the_stage_reruns(tmp_path):
    root = make(tmp_path)
    assert pipe(root, "build").returncode == 0
    first = outputs(root)
    assert pipe(root, "clean", "up").returncode == 0
    object_path = root / "cache" / "objects-v1"
    digest = blake3.blake3(b"ALPHA\n").hexdigest()
    target = object_path / digest[:2] / digest[2:]
    assert target.exists()
    target.chmod(0o644)
    target.write_bytes(b"NOT ALPHA\n")  # bit rot, or someone editing the store
    result = pipe(root, "build", "--run-id", "r")
    assert result.returncode == 0, result.stderr
    assert "cannot restore `up` from the cache" in result.stderr and "corrupt" in result.stderr, result.stderr
    assert statuses(root, "r")["up"] == "succeeded"
    assert outputs(root) == first
    assert runs_of_processor(root) == 2


def test_gc_keeps_what_current_outputs_need_and_frees_the_rest(tmp_path):
    root = make(tmp_path)
    assert pipe(root, "build", "--run-id", "r1").returncode == 0
    (root / "input" / "a.txt").write_text("second version\n")
    assert pipe(root, "build", "--run-id", "r2").returncode == 0
    dry = pipe(root, "--message-format", "json", "gc", "--keep-runs", "1", "--dry-run")
    assert dry.returncode == 0
    would = json.loads(dry.stdout)
    assert would["dryRun"] and would["objectsRemoved"] >= 1 and would["bytesFreed"] > 0
    before = sorted(p for p in (root / "cache").rglob("*") if p.is_file())
    assert sorted(p for p in (root / "cache").rglob("*") if p.is_file()) == before, "a dry run removed something"
    done = json.loads(pipe(root, "--message-format", "json", "gc", "--keep-runs", "1").stdout)
    assert done["objectsRemoved"] == would["objectsRemoved"] and done["bytesFreed"] == would["bytesFreed"]
    # Nothing current was lost: a build skips, and clean + build restores every stage.
    assert pipe(root, "build", "--run-id", "r3").returncode == 0
    assert statuses(root, "r3") == {"copy": "skipped", "up": "skipped"}
    assert pipe(root, "clean").returncode == 0
    assert pipe(root, "build", "--run-id", "r4").returncode == 0
    assert statuses(root, "r4") == {"copy": "restored", "up": "restored"}
    # The first version's outputs were collected: reverting to it now runs again.
    (root / "input" / "a.txt").write_text("alpha\n")
    assert pipe(root, "build", "--run-id", "r5").returncode == 0
    assert statuses(root, "r5")["copy"] == "succeeded"


def test_gc_max_size_never_removes_current_outputs(tmp_path):
    root = make(tmp_path)
    assert pipe(root, "build").returncode == 0
    (root / "input" / "a.txt").write_text("another\n")
    assert pipe(root, "build").returncode == 0
    result = pipe(root, "gc", "--max-size", "0")
    assert result.returncode == 0 and "freed" in result.stderr
    assert pipe(root, "clean").returncode == 0
    assert pipe(root, "build", "--run-id", "r").returncode == 0
    assert statuses(root, "r") == {"copy": "restored", "up": "restored"}
    assert pipe(root, "gc", "--max-size", "lots").returncode == 2
