"""Engine-side transient errors: a busy file while publishing is retried under the stage's policy.

The engine's failpoint `publish.after-output-rename` armed with `:ebusy` makes one publishing step
fail with EBUSY, the error a file held for a moment by another program gives.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PIPE = os.environ.get("PIPE_BIN", str(REPO / "target" / "debug" / "pipe"))


def project(root: Path, retry: dict | None) -> Path:
    (root / "input" / "d").mkdir(parents=True)
    (root / "input" / "a.txt").write_text("alpha\n")
    (root / "input" / "d" / "b.txt").write_text("beta\n")
    stage = {"name": "up", "processor": {"builtin": "upper", "version": "1"}, "inputs": ["input"], "outputDir": "out"}
    if retry:
        stage["retry"] = retry
    (root / "Pipefile.json").write_text(json.dumps({"version": 1, "stages": [stage]}))
    return root


def pipe(root: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    full = {**{k: v for k, v in os.environ.items() if not k.startswith("PIPE_FAILPOINT")}, "NO_COLOR": "1", **env}
    return subprocess.run([PIPE, *args], cwd=root, env=full, capture_output=True, text=True, timeout=60)


def test_a_busy_file_while_publishing_is_retried(tmp_path):
    root = project(tmp_path / "p", {"maxAttempts": 3, "baseDelayMs": 1})
    fired = tmp_path / "fired"
    result = pipe(root, "build", "--run-id", "r", PIPE_FAILPOINT="publish.after-output-rename:1:ebusy", PIPE_FAILPOINT_FIRED=str(fired))
    assert fired.read_text() == "publish.after-output-rename:1\n", "the injected error never happened"
    assert result.returncode == 0, result.stderr
    assert "hit a transient error" in result.stderr and "retrying" in result.stderr, result.stderr
    assert (root / "out" / "a.txt").read_text() == "ALPHA\n" and (root / "out" / "d" / "b.txt").read_text() == "BETA\n"
    assert pipe(root, "audit", "verify").returncode == 0
    assert pipe(root, "build", "--run-id", "again").returncode == 0
    run = json.loads((root / "state" / "run_again.json").read_text())
    assert [s["status"] for s in run["stages"]] == ["skipped"]


def test_without_retries_the_stage_fails_and_the_next_build_completes_the_publish(tmp_path):
    root = project(tmp_path / "p", None)
    result = pipe(root, "build", "--run-id", "r", PIPE_FAILPOINT="publish.after-output-rename:1:ebusy")
    assert result.returncode == 1
    assert "publishing outputs failed" in result.stderr, result.stderr
    assert not (root / "out" / ".up.done").exists(), "no marker for an incomplete publish"
    after = pipe(root, "build", "--run-id", "r2")
    assert after.returncode == 0, after.stderr
    assert "completed the interrupted publish of `up`" in after.stderr, after.stderr
    assert (root / "out" / "a.txt").read_text() == "ALPHA\n" and (root / "out" / "d" / "b.txt").read_text() == "BETA\n"
