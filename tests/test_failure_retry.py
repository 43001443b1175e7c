"""Failing processors: exit codes, state records, retries, and that earlier outputs survive.

Why these tests exist: a failed stage must be reported with the processor's own message, must not
damage the outputs and marker of its last success, must stop its downstream stages, and transient
failures (exit 75 or a listed code) must be retried exactly as the stage's policy says.
"""

from __future__ import annotations

import json
import os
import signal
import time

from blackbox import builtin_stage, files_only, pipeline, proc_stage, process_alive, snapshot_diff, wait_for

INPUTS = {"input/a.txt": "alpha\n", "input/sub/b.txt": "beta\n"}


def counter_lines(project, name: str = "runs.log") -> list[str]:
    path = project.path(name)
    return path.read_text().splitlines() if path.exists() else []


def two_stages(ext_params: dict, **ext_extra) -> dict:
    return pipeline(
        proc_stage("ext", ["input"], "mid", {"counter": "runs.log", **ext_params}, **ext_extra),
        builtin_stage("down", "copy", ["mid"], "out"),
    )


def test_a_failing_stage_keeps_its_previous_outputs_and_stops_downstream(make_project):
    project = make_project(two_stages({"upper": True}), files=INPUTS)
    project.ok("build", "--run-id", "good")
    assert project.read("out/sub/b.txt") == b"BETA\n"
    before = project.snapshot()

    project.write_pipefile(two_stages({"upper": True, "exit": 1, "message": "boom: disk on fire"}))
    result = project.run("build", "--run-id", "bad")

    assert result.returncode == 1, str(result)
    assert "boom: disk on fire" in result.stderr
    record = project.stage_record("ext")
    assert record["status"] == "failed", record
    assert "boom: disk on fire" in record["error"], record
    [attempt] = record["attempts"]
    assert (attempt["attempt"], attempt["exitCode"], attempt["classification"]) == (1, 1, "fatal"), attempt
    assert "boom: disk on fire" in attempt["stderrTail"]
    run = project.run_record("bad")
    assert run["status"] == "failed"
    assert project.statuses("bad") == {"ext": "failed", "down": "not_run"}
    assert project.metrics("bad")["totals"]["failed"] == 1

    after = project.snapshot()
    for folder in ["mid", "out", "input"]:  # outputs and markers of the last success, untouched
        assert files_only(after, folder) == files_only(before, folder), snapshot_diff(files_only(before, folder), files_only(after, folder))
    assert project.marker("mid", "ext")["runId"] == "good"

    # back to the working params: the old outputs are still current, nothing reruns
    project.write_pipefile(two_stages({"upper": True}))
    project.ok("build", "--run-id", "again")
    assert project.statuses("again") == {"ext": "skipped", "down": "skipped"}
    assert counter_lines(project) == ["ext 1", "ext 1"]


def test_exit_75_is_retried_until_it_succeeds(make_project):
    spec = two_stages({"failTimes": 2, "failCode": 75}, retry={"maxAttempts": 3, "baseDelayMs": 1, "maxDelayMs": 10})
    project = make_project(spec, files=INPUTS)
    result = project.run("build", "--run-id", "r")
    assert result.returncode == 0, str(result)

    assert counter_lines(project) == ["ext 1", "ext 2", "ext 3"]  # PIPELINE_ATTEMPT counts from 1
    record = project.stage_record("ext")
    assert record["status"] == "succeeded"
    assert [(a["attempt"], a["exitCode"], a["classification"]) for a in record["attempts"]] == [
        (1, 75, "retryable"),
        (2, 75, "retryable"),
        (3, 0, "ok"),
    ]
    assert all(0 <= a["delayBeforeMs"] <= 10 for a in record["attempts"]), record["attempts"]
    assert record["error"] is None
    assert {s["name"]: s["attempts"] for s in project.run_record("r")["stages"]} == {"ext": 3, "down": 1}
    assert project.metrics("r")["totals"]["retries"] == 2
    assert project.read("out/a.txt") == b"alpha\n"


def test_retries_stop_at_max_attempts(make_project):
    spec = two_stages({"failTimes": 99, "failCode": 75, "message": "still busy"}, retry={"maxAttempts": 2, "baseDelayMs": 1})
    project = make_project(spec, files=INPUTS)
    result = project.run("build", "--run-id", "r")
    assert result.returncode == 1, str(result)
    assert counter_lines(project) == ["ext 1", "ext 2"]
    record = project.stage_record("ext")
    assert [a["classification"] for a in record["attempts"]] == ["retryable", "retryable"]
    assert "still busy" in record["error"]
    assert project.statuses("r") == {"ext": "failed", "down": "not_run"}


def test_a_fatal_exit_is_not_retried(make_project):
    spec = two_stages({"exit": 1}, retry={"maxAttempts": 5, "baseDelayMs": 1})
    project = make_project(spec, files=INPUTS)
    result = project.run("build", "--run-id", "r")
    assert result.returncode == 1, str(result)
    assert counter_lines(project) == ["ext 1"]
    [attempt] = project.stage_record("ext")["attempts"]
    assert attempt["classification"] == "fatal" and attempt["exitCode"] == 1
    assert not project.exists("mid/a.txt") and not project.exists("mid/.ext.done")


def test_listed_exit_codes_are_retryable(make_project):
    spec = two_stages({"failTimes": 1, "failCode": 3}, retry={"maxAttempts": 2, "baseDelayMs": 1, "retryableExitCodes": [3]})
    project = make_project(spec, files=INPUTS)
    project.ok("build", "--run-id", "r")
    assert [a["classification"] for a in project.stage_record("ext")["attempts"]] == ["retryable", "ok"]


def test_keep_going_runs_stages_not_downstream_of_the_failure(make_project):
    spec = pipeline(
        proc_stage("bad", ["input"], "mid", {"exit": 1}),
        builtin_stage("after_bad", "copy", ["mid"], "out"),
        builtin_stage("independent", "upper", ["input"], "other"),
    )
    project = make_project(spec, files=INPUTS)
    # One stage at a time, so `independent` has not started when `bad` fails: no new stage starts.
    result = project.run("build", "-j", "1", "--run-id", "stop")
    assert result.returncode == 1, str(result)
    assert project.statuses("stop") == {"bad": "failed", "after_bad": "not_run", "independent": "not_run"}
    assert not project.exists("other/a.txt")

    result = project.run("build", "-j", "1", "--keep-going", "--run-id", "keep")
    assert result.returncode == 1, str(result)
    assert project.statuses("keep") == {"bad": "failed", "after_bad": "not_run", "independent": "succeeded"}
    assert project.read("other/a.txt") == b"ALPHA\n"


def test_invalid_utf8_is_a_fatal_error_naming_file_and_offset(make_project):
    spec = pipeline(builtin_stage("up", "upper", ["input"], "out"))
    project = make_project(spec, files={"input/b.txt": b"ok\nbad \xff here\n"})
    result = project.run("build", "--run-id", "r")
    assert result.returncode == 1, str(result)
    record = project.stage_record("up")
    assert record["attempts"][0]["exitCode"] == 65 and record["attempts"][0]["classification"] == "fatal"
    assert "b.txt" in record["error"] and "byte offset 7" in record["error"], record["error"]
    assert not project.exists("out/b.txt") and not project.exists("out/.up.done")
    # ASCII mode accepts any bytes
    spec["stages"][0]["params"] = {"mode": "ascii"}
    project.write_pipefile(spec)
    project.ok("build", "--run-id", "ascii")
    assert project.read("out/b.txt") == b"OK\nBAD \xff HERE\n"


def test_a_processor_over_its_timeout_is_killed_and_classified(make_project):
    params = {"block": ["started", "release"], "pidFile": "proc.pid"}
    spec = two_stages(params, retry={"timeoutSec": 0.5})
    project = make_project(spec, files=INPUTS)
    started = time.monotonic()
    result = project.run("build", "--run-id", "r", timeout=30)
    assert result.returncode == 1, str(result)
    assert time.monotonic() - started < 15
    [attempt] = project.stage_record("ext")["attempts"]
    assert attempt["classification"] == "timeout", attempt
    assert attempt["durationMs"] >= 450, attempt
    assert not process_alive(int(project.path("proc.pid").read_text()))
    assert project.statuses("r") == {"ext": "failed", "down": "not_run"}


def test_what_a_processor_leaves_running_is_stopped(make_project):
    spec = two_stages({"spawnOrphan": "orphan.pid"})
    project = make_project(spec, files=INPUTS)
    project.ok("build", "--run-id", "r")
    orphan = int(project.path("orphan.pid").read_text())
    wait_for(lambda: not process_alive(orphan), f"the processor's leftover child {orphan} to be stopped", timeout=10)


def test_a_malformed_checkpoint_line_fails_the_attempt(make_project):
    spec = two_stages({"badCheckpoint": "this is not json"})
    project = make_project(spec, files=INPUTS)
    result = project.run("build", "--run-id", "r")
    assert result.returncode == 1, str(result)
    record = project.stage_record("ext")
    assert record["attempts"][0]["classification"] == "fatal", record
    assert "checkpoint" in record["error"], record["error"]
    assert not project.exists("mid/.ext.done")


def test_an_interrupt_during_the_retry_delay_stops_at_once(make_project):
    spec = two_stages(
        {"failTimes": 99, "failCode": 75},
        retry={"maxAttempts": 5, "baseDelayMs": 60000, "maxDelayMs": 60000, "jitter": "none"},
    )
    project = make_project(spec, files=INPUTS)
    build = project.start("build", "--run-id", "r")
    record = project.path("state/stage_ext.json")
    # the stage record is rewritten after each failed attempt: then pipe waits 60 s to retry
    wait_for(lambda: record.exists() and len(json.loads(record.read_text())["attempts"]) == 1, "the first failed attempt")
    started = time.monotonic()
    os.kill(build.pid, signal.SIGINT)
    result = project.finish(build, timeout=30)
    assert result.returncode == 130, str(result)
    assert time.monotonic() - started < 10
    assert counter_lines(project) == ["ext 1"]
    assert project.run_record("r")["status"] == "interrupted"
