"""The engine's peak memory does not grow with the size of the inputs it fingerprints.

Measured with `/usr/bin/time -f %M` (GNU time forks the build, so its figure is the build's own
peak RSS, not one inherited from this test process). Skipped where GNU time is not installed.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from blackbox import base_env

GNU_TIME = Path("/usr/bin/time")
MIB = 1 << 20


def peak_rss_kib(project, *args: str) -> int:
    if not os.access(GNU_TIME, os.X_OK):
        pytest.skip("GNU time (/usr/bin/time) is not installed")
    result = subprocess.run(
        [str(GNU_TIME), "-f", "peak-rss-kib %M", str(project.binary), *args],
        cwd=project.root, env=base_env(), capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    line = [l for l in result.stderr.splitlines() if l.startswith("peak-rss-kib ")][-1]
    return int(line.split()[1])


def test_fingerprinting_a_big_input_keeps_peak_memory_bounded(make_project):
    # A 320 MiB input (sparse: it reads as zeros, quick to make). Mapped whole while it was
    # hashed, every page of it counted in the engine's resident memory: 320 MiB and more.
    project = make_project(
        spec={"version": 1, "stages": [
            {"name": "up", "processor": {"builtin": "upper", "version": "1"}, "inputs": ["input/big.bin"], "outputDir": "out"},
        ]},
    )
    big = project.path("input/big.bin")
    big.parent.mkdir(parents=True)
    with open(big, "wb") as f:
        f.truncate(320 * MIB)
    # --dry-run hashes the input in full every time (it writes no stat cache).
    peak = peak_rss_kib(project, "build", "--dry-run")
    assert peak < 96 * 1024, f"peak RSS {peak} KiB while fingerprinting a 320 MiB input"


def test_a_builtin_stage_reports_its_own_peak_memory_not_the_engines(make_project):
    # The engine maps the 48 MiB input 16 MiB at a time while fingerprinting it, so its own peak
    # is well above `upper`'s, which streams the input through a few 1 MiB buffers. Without the
    # spawn server (run_tests.sh runs this file again with PIPE_SPAWN_SERVER=off) a processor
    # starts as a vfork of the engine, and the kernel counts the engine's peak in its ru_maxrss;
    # either way the stage's `maxRssKb` must be the processor's, not that.
    line = b"the quick brown fox jumps over the lazy dog 0123456789 abcdefgh\n"
    project = make_project(
        spec={"version": 1, "stages": [
            {"name": "up", "processor": {"builtin": "upper", "version": "1"}, "inputs": ["input/big.txt"], "outputDir": "out"},
        ]},
        files={"input/big.txt": line * (48 * MIB // len(line))},
    )
    engine_peak = peak_rss_kib(project, "build", "--run-id", "r")
    assert engine_peak > 20 * 1024, f"the engine's peak ({engine_peak} KiB) is too low for this test to tell"
    stage_peak = project.metrics("r")["stages"]["up"]["maxRssKb"]
    assert 0 < stage_peak < engine_peak - 8 * 1024, f"maxRssKb {stage_peak} KiB (the engine's peak: {engine_peak} KiB)"
    assert project.read("out/big.txt")[: len(line)] == line.upper()
