"""Map stages (`"foreach": "file"`): one processor run per input file, each decided on its own."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PIPE = os.environ.get("PIPE_BIN", str(REPO / "target" / "debug" / "pipe"))
ITEMS = 1000


def project(root: Path, count: int = ITEMS, processor: dict | None = None) -> Path:
    (root / "input" / "sub").mkdir(parents=True)
    for i in range(count):
        folder = "sub/" if i % 10 == 0 else ""
        (root / "input" / f"{folder}part{i:04d}.txt").write_text(f"item {i} straße\n")
    stages = [
        {
            "name": "up",
            "foreach": "file",
            "processor": processor or {"builtin": "upper", "version": "1"},
            "inputs": ["input"],
            "outputDir": "out",
            "resources": {"cpus": 2},
        },
        {"name": "all", "processor": {"builtin": "copy", "version": "1"}, "inputs": ["out"], "outputDir": "final"},
    ]
    (root / "Pipefile.json").write_text(json.dumps({"version": 1, "settings": {"quotas": {"cpus": 2}}, "stages": stages}))
    return root


def pipe(root: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([PIPE, *args], cwd=root, capture_output=True, text=True, timeout=300, env={**os.environ, "NO_COLOR": "1"})


def stage(root: Path, run_id: str, name: str) -> dict:
    run = json.loads((root / "state" / f"run_{run_id}.json").read_text())
    return next(s for s in run["stages"] if s["name"] == name)


def plan(root: Path) -> dict[str, dict]:
    out = pipe(root, "--message-format", "json", "build", "--dry-run").stdout
    return {e["stage"]: e for e in map(json.loads, out.splitlines())}


def outputs(root: Path) -> set[str]:
    return {str(p.relative_to(root / "out")) for p in (root / "out").rglob("*") if p.is_file() and not p.name.startswith(".")}


def test_editing_deleting_and_adding_one_file_of_a_thousand_touches_only_that_item(tmp_path):
    root = project(tmp_path / "p")
    first = pipe(root, "build", "--run-id", "r1")
    assert first.returncode == 0, first.stderr
    assert stage(root, "r1", "up")["attempts"] == ITEMS, "one processor run per input file"
    assert len(outputs(root)) == ITEMS
    assert (root / "out" / "sub" / "part0010.txt").read_text() == "ITEM 10 STRASSE\n"

    assert pipe(root, "build", "--run-id", "noop").returncode == 0
    assert stage(root, "noop", "up")["status"] == "skipped"

    (root / "input" / "part0042.txt").write_text("edited\n")
    decided = plan(root)["up"]
    assert decided["decision"] == "map" and decided["runCount"] == 1 and decided["keepCount"] == ITEMS - 1, decided
    assert decided["summary"].startswith(f"map: 1 of {ITEMS} items would run: input/part0042.txt changed"), decided
    assert pipe(root, "build", "--run-id", "edit").returncode == 0
    assert stage(root, "edit", "up")["attempts"] == 1
    assert (root / "out" / "part0042.txt").read_text() == "EDITED\n"
    assert (root / "final" / "part0042.txt").read_text() == "EDITED\n"

    (root / "input" / "part0007.txt").unlink()
    assert pipe(root, "build", "--run-id", "delete").returncode == 0
    assert stage(root, "delete", "up")["attempts"] == 0, "a deletion runs no processor"
    assert not (root / "out" / "part0007.txt").exists() and not (root / "final" / "part0007.txt").exists()
    assert len(outputs(root)) == ITEMS - 1

    (root / "input" / "part5000.txt").write_text("new one\n")
    assert pipe(root, "build", "--run-id", "add").returncode == 0
    assert stage(root, "add", "up")["attempts"] == 1
    assert (root / "out" / "part5000.txt").read_text() == "NEW ONE\n"

    # Undo the edit: that item comes back from the cache, no processor runs.
    (root / "input" / "part0042.txt").write_text("item 42 straße\n")
    assert plan(root)["up"]["restoreCount"] == 1
    assert pipe(root, "build", "--run-id", "undo").returncode == 0
    assert stage(root, "undo", "up")["attempts"] == 0
    assert (root / "out" / "part0042.txt").read_text() == "ITEM 42 STRASSE\n"


FLAKY_ITEM = '''
import json, os, sys
inputs = json.loads(os.environ["PIPELINE_INPUTS"])
root, out = os.environ["PIPELINE_INPUT_ROOT"], os.environ["PIPELINE_OUTPUT_DIR"]
for path in inputs:
    text = open(path).read()
    if "poison" in text:
        print("cannot handle " + os.path.basename(path), file=sys.stderr)
        sys.exit(3)
    dest = os.path.join(out, os.path.relpath(path, root))
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    open(dest, "w").write(text.upper())
'''


def test_a_failing_item_fails_the_stage_and_the_others_are_kept_for_the_next_build(tmp_path):
    root = project(tmp_path / "p", count=12, processor={"command": ["python3", "item.py"], "version": "1"})
    (root / "item.py").write_text(FLAKY_ITEM)
    (root / "input" / "part0005.txt").write_text("poison\n")
    failed = pipe(root, "build", "--run-id", "r1")
    assert failed.returncode == 1
    assert "part0005.txt" in failed.stderr and "cannot handle part0005.txt" in failed.stderr, failed.stderr
    assert stage(root, "r1", "up")["status"] == "failed" and stage(root, "r1", "all")["status"] == "not_run"
    assert not (root / "out" / ".up.done").exists()
    (root / "input" / "part0005.txt").write_text("cured\n")
    decided = plan(root)["up"]
    assert decided["runCount"] == 1 and decided["restoreCount"] == 11, decided
    assert pipe(root, "build", "--run-id", "r2").returncode == 0
    assert stage(root, "r2", "up")["attempts"] == 1
    assert len(outputs(root)) == 12 and (root / "out" / "part0005.txt").read_text() == "CURED\n"
