"""Outputs are durable before a publish journal or marker names them, whoever wrote them.

A power cut cannot be staged in a test, so these tests watch the system calls instead: the real
`pipe` binary runs under `strace`, with a processor that never syncs what it writes (a shell
command, no SDK), and the trace must show the engine making each output's contents durable
(`fdatasync` of the staged file, or one `syncfs` when there are many) on the publishing thread
before that thread creates the publish journal. Skipped when strace is missing or may not trace.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from blackbox import base_env

STRACE = shutil.which("strace")


def traced_build(project, trace: Path):
    if STRACE is None:
        pytest.skip("strace is not installed")
    result = subprocess.run(
        [STRACE, "-f", "-y", "-qq", "-o", str(trace), "-e", "trace=openat,fdatasync,fsync,syncfs",
         str(project.binary), "build", "--run-id", "r1"],
        cwd=project.root, env=base_env(), capture_output=True, text=True, timeout=120,
    )
    if result.returncode != 0 and re.search(r"^strace: .*ptrace", result.stderr, re.M):
        pytest.skip(f"strace may not trace here: {result.stderr.strip()[:200]}")
    assert result.returncode == 0, result.stderr
    return trace.read_text().splitlines()


def publishing_thread_calls(lines: list[str], stage: str) -> tuple[str, list[str]]:
    """The calls of the thread that created `stage`'s publish journal, up to that creation."""
    journal = re.compile(rf'openat\(.*\.\.{stage}\.publishing\.tmp-\d+".*O_CREAT')
    for i, line in enumerate(lines):
        if journal.search(line):
            tid = line.split()[0]
            return tid, [l for l in lines[:i] if l.split()[0] == tid]
    raise AssertionError(f"no publish journal of `{stage}` was created:\n" + "\n".join(lines[-40:]))


def shell_stage(name: str, script: str) -> dict:
    return {
        "name": name,
        "processor": {"command": ["/bin/sh", "-c", script], "version": "1"},
        "inputs": ["input/a.txt"],
        "outputDir": "out",
    }


def test_an_output_its_processor_never_synced_is_fdatasynced_before_the_journal(make_project, tmp_path):
    project = make_project(
        spec={"version": 1, "stages": [shell_stage("sh", 'printf "unsynced\\n" > "$PIPELINE_OUTPUT_DIR/a.txt"')]},
        files={"input/a.txt": "a\n"},
    )
    lines = traced_build(project, tmp_path / "trace")
    assert project.read("out/a.txt") == b"unsynced\n"
    _, calls = publishing_thread_calls(lines, "sh")
    synced = [l for l in calls if re.search(r"fdatasync\(\d+</.*/out/\.pipe-staging/a\.txt>\) = 0", l)]
    assert synced, "the staged output was not synced before the journal:\n" + "\n".join(calls[-30:])


def test_many_outputs_are_made_durable_with_one_syncfs_before_the_journal(make_project, tmp_path):
    script = 'for i in 01 02 03 04 05 06 07 08 09 10 11 12; do printf "$i\\n" > "$PIPELINE_OUTPUT_DIR/f$i.txt"; done'
    project = make_project(
        spec={"version": 1, "stages": [shell_stage("many", script)]},
        files={"input/a.txt": "a\n"},
    )
    lines = traced_build(project, tmp_path / "trace")
    assert sorted(p.name for p in project.path("out").glob("f*.txt")) == [f"f{i:02d}.txt" for i in range(1, 13)]
    _, calls = publishing_thread_calls(lines, "many")
    assert [l for l in calls if re.search(r"syncfs\(\d+<.*/out/\.pipe-staging/.*>\) = 0", l)], (
        "the outputs' filesystem was not synced before the journal:\n" + "\n".join(calls[-30:])
    )
