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


STAGES = 120


def make_parallel_project(root: Path) -> Path:
    """`STAGES` independent ASCII `upper` stages and a fan-in `copy` of all their output folders."""
    rng = random.Random(7)
    words = ["alpha", "beta", "gamma", "café", "straße"]
    for i in range(STAGES):
        path = root / "input" / f"f{i:03d}.txt"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(" ".join(rng.choice(words) for _ in range(6)) + "\n" for _ in range(20)), encoding="utf-8")
    upper = {"builtin": "upper", "version": "1"}
    stages = [
        {"name": f"u{i:03d}", "processor": upper, "params": {"mode": "ascii"}, "inputs": [f"input/f{i:03d}.txt"], "outputDir": f"out/u{i:03d}"}
        for i in range(STAGES)
    ]
    stages.append({"name": "fanin", "processor": {"builtin": "copy", "version": "1"}, "inputs": [f"out/u{i:03d}" for i in range(STAGES)], "outputDir": "all"})
    (root / "Pipefile.json").write_text(json.dumps({"version": 1, "stages": stages}, indent=1))
    return root


def expected_outputs(root: Path) -> dict[str, bytes]:
    """What an uninterrupted build publishes: each input upper-cased (a-z only), in its stage's
    folder and again in the fan-in's."""
    table = bytes.maketrans(b"abcdefghijklmnopqrstuvwxyz", b"ABCDEFGHIJKLMNOPQRSTUVWXYZ")
    expected = {}
    for i in range(STAGES):
        data = (root / "input" / f"f{i:03d}.txt").read_bytes().translate(table)
        expected[f"out/u{i:03d}/f{i:03d}.txt"] = data
        expected[f"all/u{i:03d}/f{i:03d}.txt"] = data
    return expected


def published(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes()
        for folder in ("out", "all")
        for p in sorted((root / folder).rglob("*"))
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts)
    }


def test_sigkill_during_a_parallel_build_of_many_stages_keeps_the_audit_chain_and_the_outputs(tmp_path):
    """Stages publish in the background while the next ones run, and audit batches are written
    by a writer thread: a SIGKILL at any instant of a `-j2` build must leave a log that verifies,
    and the next build must publish exactly the uninterrupted outputs."""
    reference = make_parallel_project(tmp_path / "ref")
    started = time.monotonic()
    done = subprocess.run([PIPE, "build", "-q", "-j2"], cwd=reference, env=env(), capture_output=True, timeout=300)
    duration = time.monotonic() - started
    assert done.returncode == 0, done.stderr.decode()
    assert published(reference) == expected_outputs(reference)

    project = make_parallel_project(tmp_path / "torture")
    rng = random.Random(20261130)
    kills = builds = 0
    while kills < 6:
        builds += 1
        assert builds <= 30, "builds keep finishing before their kill instants"
        proc = subprocess.Popen([PIPE, "build", "-q", "-j2"], cwd=project, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            # The kill instant is the randomised variable under test, not a synchronisation.
            proc.wait(timeout=duration * rng.uniform(0.1, 0.9))
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=30)
            kills += 1
        else:
            assert proc.returncode == 0
            assert published(project) == expected_outputs(project)
            # Start the next round from scratch (outputs and cache gone), so it has work to kill.
            cleaned = subprocess.run([PIPE, "clean", "--cache"], cwd=project, env=env(), capture_output=True, timeout=60)
            assert cleaned.returncode == 0, cleaned.stderr.decode()
        verified = subprocess.run([PIPE, "audit", "verify"], cwd=project, env=env(), capture_output=True, timeout=60)
        assert verified.returncode == 0, (builds, verified.stdout.decode(), verified.stderr.decode())
        if builds % 3 == 0:
            for i in rng.sample(range(STAGES), 3):
                with open(project / "input" / f"f{i:03d}.txt", "a", encoding="utf-8") as f:
                    f.write(f"edited before build {builds + 1}\n")
    final = subprocess.run([PIPE, "build", "-j2"], cwd=project, env=env(), capture_output=True, timeout=300)
    assert final.returncode == 0, final.stderr.decode()
    assert published(project) == expected_outputs(project)
    assert subprocess.run([PIPE, "audit", "verify"], cwd=project, env=env(), capture_output=True, timeout=60).returncode == 0
    again = subprocess.run([PIPE, "build"], cwd=project, env=env(), capture_output=True, timeout=300, text=True)
    assert again.returncode == 0
    assert f"0 ran, {STAGES + 1} skipped" in again.stdout + again.stderr, again.stdout + again.stderr
