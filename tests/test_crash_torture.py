"""Torture: SIGKILL `pipe build` at 20 seeded-random instants, resume after each.

For a pipeline of built-in processors and for one of the Python reference processor: the final
outputs must be byte-identical to an uninterrupted build, and the lines handled across all attempts
(tallied by the SDKs at each checkpoint, `PIPE_LINE_TALLY`) must stay below twice the input: the
stages resumed, they did not start over.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PIPE = os.environ.get("PIPE_BIN", str(REPO / "target" / "debug" / "pipe"))
KILLS = 20
EVERY_LINES = 500

PIPELINES = {
    "builtin": [
        {"name": "copy", "processor": {"builtin": "copy", "version": "1"}, "inputs": ["input"], "outputDir": "work"},
        {"name": "upper", "processor": {"builtin": "upper", "version": "1"}, "inputs": ["work"], "outputDir": "output"},
    ],
    "python": [
        {
            "name": "pyupper",
            "processor": {"command": ["python3", "tools/python/stage_upper.py"], "version": "1", "files": ["tools/python/pipe_sdk.py"]},
            "inputs": ["input"],
            "outputDir": "output",
        },
    ],
}


def make_project(root: Path, kind: str) -> tuple[Path, int]:
    project = root / "project"
    shutil.copytree(REPO / "processors" / "python", project / "tools" / "python")
    rng = random.Random(99)
    words = ["alpha", "beta", "straße", "café", "gamma", "delta", "omega", "ﬁne"]
    total = 0
    # The Python processor is slower to start and to run: give it more lines so that kill instants
    # spread over its processing rather than its start-up.
    scale = 4 if kind == "python" else 1
    for i in range(4):
        path = project / "input" / f"part{i}.txt"
        path.parent.mkdir(parents=True, exist_ok=True)
        count = (30000 + 2000 * i) * scale
        total += count
        path.write_text("".join(f"{n:06d} " + " ".join(rng.choice(words) for _ in range(9)) + "\n" for n in range(count)), encoding="utf-8")
    spec = {"version": 1, "settings": {"checkpoint": {"everyLines": EVERY_LINES}}, "stages": PIPELINES[kind]}
    (project / "Pipefile.json").write_text(json.dumps(spec, indent=1))
    lines_per_build = total * len(PIPELINES[kind])
    return project, lines_per_build


def outputs(project: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(project)): p.read_bytes()
        for folder in ("work", "output")
        for p in sorted((project / folder).rglob("*"))
        if p.is_file() and not p.name.startswith(".")
    }


def env(**extra: str) -> dict:
    return {**{k: v for k, v in os.environ.items() if not k.startswith("PIPE_")}, "NO_COLOR": "1", **extra}


@pytest.mark.parametrize("kind", sorted(PIPELINES))
def test_sigkill_at_random_instants_resumes_to_identical_output(tmp_path, kind):
    reference, lines_per_build = make_project(tmp_path / "ref", kind)
    started = time.monotonic()
    done = subprocess.run([PIPE, "build"], cwd=reference, env=env(), capture_output=True, timeout=300)
    duration = time.monotonic() - started
    assert done.returncode == 0, done.stderr.decode()
    golden = outputs(reference)
    # How long until a processor handles its first line (start-up, hashing, state writes): kill
    # instants are drawn after it, spread over the processing.
    calibration, _ = make_project(tmp_path / "cal", kind)
    started = time.monotonic()
    subprocess.run([PIPE, "build"], cwd=calibration, env=env(PIPE_FAULT="crash-after-lines:1"), capture_output=True, timeout=300)
    startup = min(time.monotonic() - started, duration / 2)

    project, _ = make_project(tmp_path / "torture", kind)
    tally = tmp_path / "tally"
    rng = random.Random(20261129)
    kill_times = []
    rounds = 1  # a build that finishes before its kill instant starts a new round from scratch
    while len(kill_times) < KILLS:
        proc = subprocess.Popen([PIPE, "build"], cwd=project, env=env(PIPE_LINE_TALLY=str(tally)), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        delay = startup * rng.uniform(0.7, 1.0) + rng.uniform(0.0, 0.1) * (duration - startup)
        try:
            # The kill instant is the randomised variable under test, not a synchronisation.
            proc.wait(timeout=delay)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=30)
            kill_times.append(round(delay, 3))
        else:
            assert proc.returncode == 0
            assert outputs(project) == golden
            cleaned = subprocess.run([PIPE, "clean", "--cache"], cwd=project, env=env(), capture_output=True, timeout=60)
            assert cleaned.returncode == 0
            rounds += 1
            assert rounds <= 10, "builds keep finishing before their kill instants"
    final = subprocess.run([PIPE, "build"], cwd=project, env=env(PIPE_LINE_TALLY=str(tally)), capture_output=True, timeout=300)
    assert final.returncode == 0, final.stderr.decode()
    assert outputs(project) == golden

    progress_seen = [json.loads(p.read_text()) for p in (project / "state").glob("stage_*.json")]
    resumed_from = [s["resumedFromLine"] for s in progress_seen if s.get("resumedFromLine")]
    handled = sum(int(n) for n in tally.read_text().split())
    print(f"\n{kind}: reference build {duration:.2f} s, start-up {startup:.2f} s; {len(kill_times)} kills mid-build; "
          f"{rounds} round(s); last resume points {resumed_from}; lines handled {handled} for {lines_per_build} per round")
    assert len(kill_times) == KILLS
    assert resumed_from, "no stage resumed"
    # Every line was handled at least once per round (tallies lose at most one checkpoint interval
    # per kill) and far less than twice in all.
    work = lines_per_build * rounds
    assert work - EVERY_LINES * len(kill_times) <= handled < 2 * work, (handled, work)
