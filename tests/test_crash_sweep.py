"""Crash consistency, systematically: SIGKILL at every durability step, then resume.

Every engine and SDK durability step has a named failpoint (`PIPE_FAILPOINT=NAME:K` kills the
process with SIGKILL the K-th time it reaches NAME). For each failpoint and each K until it no longer
fires: a fresh project, a build that dies there, a build without faults, and then the outputs must
equal an uninterrupted build's byte for byte, with no temporary file or staging folder left and the
lock free. Processors inherit the engine's environment, so SDK failpoints fire inside them.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PIPE = os.environ.get("PIPE_BIN", str(REPO / "target" / "debug" / "pipe"))

ENGINE_POINTS = [
    "publish.after-journal",
    "publish.after-progress-removed",
    "atomic.after-tmp-write",
    "atomic.after-tmp-fsync",
    "atomic.after-rename",
    "atomic.after-dir-fsync",
    "publish.after-old-marker-removed",
    "publish.after-output-rename",
    "publish.after-folder-rename",  # a staged folder new to the output folder, moved whole
    "publish.after-outputs-synced",
    "publish.after-staging-removed",
    "publish.after-marker",
    "audit.after-append",
    "audit.after-first-head-copy",
]
SDK_POINTS = [
    "sdk.after-output-write",
    "sdk.after-output-flush",  # Python SDK only (the Rust SDK writes unbuffered)
    "sdk.after-output-fsync",
    "sdk.after-dir-fsync",
    "sdk.after-checkpoint-sent",
]
MAX_K = 60  # per failpoint: bounds the sweep's run time; the count of distinct points is asserted


def pipefile() -> dict:
    python = ["python3", "../processors/python/stage_upper.py"]
    return {
        "version": 1,
        "settings": {"checkpoint": {"everyLines": 40}},
        "stages": [
            {"name": "copy", "processor": {"builtin": "copy", "version": "1"}, "inputs": ["input"], "outputDir": "work"},
            {"name": "upper", "processor": {"builtin": "upper", "version": "1"}, "inputs": ["work"], "outputDir": "output"},
            {
                "name": "pyupper",
                "processor": {"command": python, "version": "1", "files": ["../processors/python/pipe_sdk.py"]},
                "inputs": ["work/b"],
                "outputDir": "pyout",
            },
        ],
    }


def make_template(root: Path) -> Path:
    """A project whose builds go through every durability step several times."""
    shutil.copytree(REPO / "processors" / "python", root / "processors" / "python")
    project = root / "project"
    (project / "input" / "b").mkdir(parents=True)
    for name, count in [("a.txt", 90), ("b/c.txt", 130), ("b/d.txt", 55)]:
        lines = "".join(f"{name} line {i} straße\n" for i in range(count))
        (project / "input" / name).write_text(lines, encoding="utf-8")
    (project / "Pipefile.json").write_text(json.dumps(pipefile(), indent=1))
    return project


def pipe(project: Path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    full = {k: v for k, v in os.environ.items() if not k.startswith("PIPE_FAILPOINT")}
    full.update(NO_COLOR="1", **(env or {}))
    return subprocess.run([PIPE, *args], cwd=project, env=full, capture_output=True, timeout=120)


def outputs(project: Path) -> dict[str, bytes]:
    found = {}
    for folder in ("work", "output", "pyout"):
        for path in sorted((project / folder).rglob("*")):
            if path.is_file() and not path.name.endswith(".done"):
                found[str(path.relative_to(project))] = path.read_bytes()
    return found


def leftovers(project: Path) -> list[str]:
    """Temporary files and staging folders a finished build must not leave behind."""
    bad = []
    for path in project.rglob("*"):
        if ".tmp-" in path.name or path.name == ".pipe-staging":
            bad.append(str(path.relative_to(project)))
    return bad


def lock_is_free(project: Path) -> bool:
    with open(project / "locks" / "pipeline.lock", "rb") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        fcntl.flock(f, fcntl.LOCK_UN)
        return True


@pytest.fixture(scope="module")
def template(tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep")
    project = make_template(root / "template")
    shutil.copytree(root / "template", root / "golden")
    done = pipe(root / "golden" / "project", "build")
    assert done.returncode == 0, done.stderr.decode()
    return project, outputs(root / "golden" / "project")


def crash_and_resume(template_project: Path, workdir: Path, name: str, k: int, golden: dict, prepare=None) -> bool:
    """One kill point. Returns False when the failpoint did not fire at hit K (the sweep is done)."""
    shutil.copytree(template_project.parent, workdir)
    project = workdir / "project"
    if prepare:
        prepare(project)
    fired = workdir / "fired.log"
    crashed = pipe(project, "build", env={"PIPE_FAILPOINT": f"{name}:{k}", "PIPE_FAILPOINT_FIRED": str(fired)})
    if not fired.exists():
        assert crashed.returncode == 0, crashed.stderr.decode()
        return False
    assert crashed.returncode != 0, f"{name}:{k} fired but the build succeeded"
    resumed = pipe(project, "build")
    assert resumed.returncode == 0, f"{name}:{k}: resume failed\n{resumed.stderr.decode()}"
    assert outputs(project) == golden, f"{name}:{k}: outputs differ from the uninterrupted build"
    assert leftovers(project) == [], f"{name}:{k}: left behind {leftovers(project)}"
    assert lock_is_free(project), f"{name}:{k}: lock still held"
    again = pipe(project, "--message-format", "json", "build")
    statuses = [json.loads(l)["status"] for l in again.stdout.decode().splitlines() if '"stageFinished"' in l]
    assert statuses == ["skipped"] * 3, f"{name}:{k}: a third build still had work: {statuses}"
    verified = pipe(project, "audit", "verify")
    assert verified.returncode == 0, f"{name}:{k}: audit chain broken\n{verified.stderr.decode()}"
    return True


def test_every_durability_step_survives_sigkill(template, tmp_path):
    project, golden = template
    points = []
    for name in ENGINE_POINTS + SDK_POINTS:
        for k in range(1, MAX_K + 1):
            if not crash_and_resume(project, tmp_path / f"{name}-{k}", name, k, golden):
                break
            points.append(f"{name}:{k}")
    fired = {p.rsplit(":", 1)[0] for p in points}
    # Every failpoint but the one that needs an earlier marker fires in a first build.
    assert fired >= set(ENGINE_POINTS + SDK_POINTS) - {"publish.after-old-marker-removed"}, fired
    print(f"\n{len(points)} distinct kill points survived")  # shown with -s; the note reports it
    assert len(points) >= 100, len(points)


def test_rebuild_after_an_edit_survives_sigkill(template, tmp_path):
    """A second build replaces existing outputs: crash while the old marker is gone and while
    outputs are being replaced."""
    project, _ = template
    base = tmp_path / "base"
    shutil.copytree(project.parent, base)
    assert pipe(base / "project", "build").returncode == 0
    edit = lambda p: (p / "input" / "b" / "c.txt").write_text("edited\nstraße\n", encoding="utf-8")
    expected_dir = tmp_path / "expected"
    shutil.copytree(base, expected_dir)
    edit(expected_dir / "project")
    assert pipe(expected_dir / "project", "build").returncode == 0
    golden = outputs(expected_dir / "project")
    count = 0
    for name in ["publish.after-old-marker-removed", "publish.after-output-rename", "publish.after-marker", "atomic.after-rename"]:
        for k in range(1, MAX_K + 1):
            if not crash_and_resume(base / "project", tmp_path / f"re-{name}-{k}", name, k, golden, prepare=edit):
                break
            count += 1
    assert count >= 10, count
