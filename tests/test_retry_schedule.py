"""Retry delays follow the documented schedule, reproducibly for a run id (docs/pipefile.md)."""

from __future__ import annotations

import json
import os
import struct
import subprocess
from pathlib import Path

import blake3

REPO = Path(__file__).resolve().parent.parent
PIPE = os.environ.get("PIPE_BIN", str(REPO / "target" / "debug" / "pipe"))

FLAKY = '''
import json, os, sys
params = json.loads(os.environ["PIPELINE_PARAMS"])
if int(os.environ["PIPELINE_ATTEMPT"]) <= params["failTimes"]:
    print("busy, try again", file=sys.stderr)
    sys.exit(75)
'''

POLICY = {"maxAttempts": 4, "baseDelayMs": 40, "maxDelayMs": 100, "multiplier": 2.0, "jitter": "full"}


def documented_delay(run_id: str, stage: str, attempt: int, policy: dict) -> int:
    """The schedule as docs/pipefile.md states it: min(max, base * multiplier^(k-1)) before attempt
    k+1, then full jitter with a unit fraction from blake3("pipe retry jitter v1\\0" + run id +
    "\\0" + stage + attempt as little-endian u32): the first 8 bytes as a little-endian u64,
    shifted right by 11, divided by 2^53."""
    capped = min(policy["maxDelayMs"], policy["baseDelayMs"] * policy["multiplier"] ** (attempt - 2))
    digest = blake3.blake3(b"pipe retry jitter v1\0" + run_id.encode() + b"\0" + stage.encode() + struct.pack("<I", attempt)).digest()
    unit = (struct.unpack("<Q", digest[:8])[0] >> 11) / float(1 << 53)
    return int(int(capped) * unit)


def project(root: Path) -> Path:
    (root / "input").mkdir(parents=True)
    (root / "input" / "a.txt").write_text("a\n")
    (root / "flaky.py").write_text(FLAKY)
    stage = {
        "name": "flaky",
        "processor": {"command": ["python3", "flaky.py"], "version": "1"},
        "params": {"failTimes": 3},
        "inputs": ["input"],
        "outputDir": "out",
        "retry": POLICY,
    }
    (root / "Pipefile.json").write_text(json.dumps({"version": 1, "stages": [stage]}))
    return root


def delays(root: Path, run_id: str) -> list[int]:
    result = subprocess.run([PIPE, "build", "--run-id", run_id], cwd=root, capture_output=True, timeout=60, env={**os.environ, "NO_COLOR": "1"})
    assert result.returncode == 0, result.stderr.decode()
    record = json.loads((root / "state" / "stage_flaky.json").read_text())
    assert [a["classification"] for a in record["attempts"]] == ["retryable"] * 3 + ["ok"]
    return [a["delayBeforeMs"] for a in record["attempts"]]


def test_recorded_delays_follow_the_documented_schedule_and_repeat_for_a_run_id(tmp_path):
    first = delays(project(tmp_path / "one"), "nightly-42")
    expected = [0] + [documented_delay("nightly-42", "flaky", k, POLICY) for k in (2, 3, 4)]
    assert first == expected
    assert all(d <= POLICY["maxDelayMs"] for d in first)
    # The same pipeline elsewhere, with the same run id: the same delays.
    assert delays(project(tmp_path / "two"), "nightly-42") == first
    # Another run id draws other jitter.
    assert delays(project(tmp_path / "three"), "nightly-43") != first
