"""The workspace lock, kill -9, and Ctrl-C / SIGTERM of a running build.

Why these tests exist: two builds in one project must never interleave (the second fails at once
with exit 3 naming the holder); a build killed with -9 must take its processor with it and leave no
stale lock; an interrupted build must stop its processor, record `interrupted` and exit 130.

Every build here runs a processor that signals "started" with a file and then blocks until the test
creates a "release" file, so the test waits on files, never on a fixed sleep.
"""

from __future__ import annotations

import os
import signal
import time

import pytest

from blackbox import builtin_stage, pipeline, proc_stage, process_alive, wait_for, wait_for_file

INPUTS = {"input/a.txt": "alpha\n", "input/b.txt": "beta\n"}


def blocking_project(make_project):
    spec = pipeline(
        proc_stage("slow", ["input"], "mid", {"counter": "runs.log", "block": ["started", "release"], "pidFile": "proc.pid", "upper": True}),
        builtin_stage("down", "copy", ["mid"], "out"),
    )
    return make_project(spec, files=INPUTS)


def start_blocked_build(project, run_id: str):
    """Start `pipe build` and wait until its processor is running and blocked; return (pipe, processor pid)."""
    proc = project.start("build", "--run-id", run_id)
    wait_for_file(project.path("started"), proc=proc)
    wait_for_file(project.path("proc.pid"), proc=proc)
    processor = int(project.path("proc.pid").read_text())
    assert process_alive(processor)
    return proc, processor


def test_a_second_build_fails_at_once_naming_the_holder(make_project):
    project = blocking_project(make_project)
    first, _ = start_blocked_build(project, "first")

    started = time.monotonic()
    second = project.run("build", "--run-id", "second", timeout=15)
    elapsed = time.monotonic() - started

    assert second.returncode == 3, str(second)
    assert elapsed < 5, elapsed
    assert f"pid {first.pid}" in second.stderr, str(second)
    assert "first" in second.stderr, str(second)
    assert not project.exists("state/run_second.json")

    cleaned = project.run("clean", timeout=15)
    assert cleaned.returncode == 3, str(cleaned)
    assert project.run("build", "--dry-run").returncode == 0  # looking needs no lock
    assert project.run("status").returncode == 0

    project.write("release", "")
    result = project.finish(first)
    assert result.returncode == 0, str(result)
    assert project.statuses("first") == {"slow": "succeeded", "down": "succeeded"}
    assert project.read("out/a.txt") == b"ALPHA\n"


def test_a_build_stopped_by_an_invalid_pipefile_leaves_the_lock_free(make_project):
    # A build takes a built workspace's lock before it validates the Pipefile (to start its
    # skip memo's stats early); an invalid Pipefile must still leave nothing behind: no holder
    # file (the next build would take its owner for dead), no run, the lock free.
    project = make_project(pipeline(builtin_stage("up", "upper", ["input"], "out")), files=INPUTS)
    assert project.run("build", "--run-id", "one").returncode == 0
    assert project.exists("locks/pipeline.lock")
    good = project.read("Pipefile.json")
    project.write("Pipefile.json", good.replace(b'"upper"', b'"no-such-builtin"'))
    bad = project.run("build", "--run-id", "bad", "--wait-lock=0")
    assert bad.returncode == 2, str(bad)
    assert not project.exists("locks/pipeline.lock.json")
    assert not project.exists("state/run_bad.json")
    project.write("Pipefile.json", good)
    again = project.run("build", "--run-id", "two", "--wait-lock=0")
    assert again.returncode == 0, str(again)
    assert project.statuses("two") == {"up": "skipped"}
    assert not project.exists("locks/pipeline.lock.json")


def test_wait_lock_with_a_limit_gives_up_with_exit_3(make_project):
    project = blocking_project(make_project)
    first, _ = start_blocked_build(project, "first")
    started = time.monotonic()
    second = project.run("build", "--run-id", "second", "--wait-lock=1", timeout=15)
    elapsed = time.monotonic() - started
    assert second.returncode == 3, str(second)
    assert 0.9 <= elapsed < 8, elapsed
    assert f"pid {first.pid}" in second.stderr, str(second)
    project.write("release", "")
    assert project.finish(first).returncode == 0


def test_kill_9_takes_the_processor_along_and_leaves_no_stale_lock(make_project):
    project = blocking_project(make_project)
    first, processor = start_blocked_build(project, "first")

    os.kill(first.pid, signal.SIGKILL)
    first.wait(timeout=10)
    wait_for(lambda: not process_alive(processor), f"processor {processor} to die with pipe", timeout=10)

    project.write("release", "")
    started = time.monotonic()
    result = project.run("build", "--run-id", "after", timeout=30)
    assert result.returncode == 0, str(result)
    assert time.monotonic() - started < 10
    assert project.statuses("after") == {"slow": "succeeded", "down": "succeeded"}
    assert project.read("out/b.txt") == b"BETA\n"


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_an_interrupted_build_stops_its_processor_and_exits_130(make_project, sig):
    project = blocking_project(make_project)
    first, processor = start_blocked_build(project, "first")

    os.kill(first.pid, sig)
    result = project.finish(first, timeout=30)

    assert result.returncode == 130, str(result)
    assert not process_alive(processor)
    run = project.run_record("first")
    assert run["status"] == "interrupted", run
    assert run["finishedAt"] is not None
    statuses = project.statuses("first")
    assert statuses["slow"] == "interrupted" and statuses["down"] == "not_run", statuses
    assert project.stage_record("slow")["attempts"][-1]["classification"] == "interrupted"
    assert not project.exists("mid/.slow.done")

    project.write("release", "")
    project.ok("build", "--run-id", "next", timeout=30)
    assert project.statuses("next") == {"slow": "succeeded", "down": "succeeded"}
    assert project.read("out/a.txt") == b"ALPHA\n"
