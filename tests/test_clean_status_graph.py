"""Read-only commands (`build --dry-run`, `status`, `check`, `graph`) and `pipe clean`.

Why these tests exist: the contract promises that looking never writes (no state, no lock, no
cache, not even a folder), that `status --exit-code` can gate CI, that the JSON message format is
machine-readable, and that `clean` removes exactly what stages produced and nothing of the user's.
"""

from __future__ import annotations

import json
import os
import time

import pytest

from blackbox import files_only, snapshot_diff

READ_ONLY_COMMANDS = [
    ["build", "--dry-run"],
    ["build", "-n"],
    ["build", "-n", "upper"],
    ["build", "--dry-run", "--message-format", "json"],
    ["status"],
    ["status", "--exit-code"],
    ["status", "--message-format", "json"],
    ["check"],
    ["graph"],
    ["graph", "--format", "mermaid"],
    ["graph", "--format", "json"],
]


def make_dirty(project) -> None:
    """A built demo with an edited input, a deleted output and changed params: the planner hashes."""
    project.ok("build", "--run-id", "one")
    project.write("input/hello.txt", "changed\n")
    project.path("output/letters/note.txt").unlink()
    project.edit_pipefile(lambda s: project.stage_spec(s, "upper").__setitem__("params", {"mode": "ascii"}))


def crash_mid_publish(project) -> None:
    """A build killed (SIGKILL) between moving copy's outputs into place and writing its marker."""
    result = project.run("build", "--run-id", "killed", env={"PIPE_FAILPOINT": "publish.after-output-rename:1"})
    assert result.returncode == -9, str(result)
    assert not project.exists("work/.copy.done")


@pytest.mark.parametrize("state", ["fresh", "dirty", "mid-publish"])
@pytest.mark.parametrize("args", READ_ONLY_COMMANDS, ids=lambda a: " ".join(a))
def test_read_only_commands_write_nothing(demo, args, state):
    if state == "dirty":
        make_dirty(demo)
    elif state == "mid-publish":
        crash_mid_publish(demo)
    before = demo.snapshot()
    result = demo.run(*args)
    assert result.returncode in (0, 1), str(result)
    after = demo.snapshot()
    assert after == before, snapshot_diff(before, after)
    if state == "fresh":
        for folder in ["state", "locks", "cache", "work", "output"]:
            assert not demo.exists(folder), folder


def test_dry_run_plan_of_a_fresh_demo(demo):
    for flag in ["--dry-run", "-n"]:
        result = demo.ok("build", flag)
        lines = result.stdout.splitlines()
        assert len(lines) == 2, lines
        assert lines[0].startswith("copy: run (first run"), lines
        assert lines[1] == "upper: pending (upstream copy runs)", lines


def test_dry_run_json_is_one_object_per_line(demo):
    result = demo.ok("build", "--dry-run", "--message-format", "json")
    events = [json.loads(line) for line in result.stdout.splitlines()]
    assert [(e["stage"], e["decision"]) for e in events] == [("copy", "run"), ("upper", "pending")]
    assert events[0]["reasons"] == [{"kind": "firstRun"}]
    assert events[1]["upstream"] == "copy"

    demo.ok("build")
    demo.write("input/hello.txt", "new\n")
    events = [json.loads(line) for line in demo.ok("build", "-n", "--message-format", "json").stdout.splitlines()]
    [reason] = events[0]["reasons"]
    assert reason["kind"] == "inputChanged" and reason["path"] == "input/hello.txt", reason
    assert events[1]["decision"] == "pending"


def test_status_exit_code_says_whether_anything_would_run(demo):
    result = demo.run("status", "--exit-code")
    assert result.returncode == 1, str(result)
    assert "copy: run (first run" in result.stdout
    assert demo.run("status").returncode == 0  # without the flag, work to do is not an error

    demo.ok("build", "--run-id", "one")
    result = demo.run("status", "--exit-code")
    assert result.returncode == 0, str(result)
    lines = result.stdout.splitlines()
    assert lines[0].startswith("copy: skip") and lines[0].endswith("[last run: succeeded]"), lines

    demo.write("input/hello.txt", "changed\n")
    assert demo.run("status", "--exit-code").returncode == 1


def test_status_shows_the_newest_run_record_that_reads_whole(demo):
    demo.write("input/hello.txt", "hello\n")
    demo.ok("build", "--run-id", "one")
    # Newer by start time, but not run records: one is torn, one has the start but no stages.
    demo.write("state/run_torn.json", '{"version": 1, "runId": "torn", "startedAt": "2999-01-01T00:00:00Z"')
    demo.write("state/run_odd.json", '{"startedAt": "2998-01-01T00:00:00Z", "stages": 7}')
    lines = demo.ok("status").stdout.splitlines()
    assert lines[0].endswith("[last run: succeeded]"), lines

    demo.ok("build", "--run-id", "two")
    lines = demo.ok("status").stdout.splitlines()
    assert lines[0].endswith("[last run: skipped]"), lines

    # Records are read newest write first; times that say nothing (a copied workspace) or that
    # disagree with the start order still give the newest start.
    later = time.time() + 100
    for one_written in (later, later + 50):
        os.utime(demo.path("state/run_one.json"), (one_written, one_written))
        os.utime(demo.path("state/run_two.json"), (later, later))
        lines = demo.ok("status").stdout.splitlines()
        assert lines[0].endswith("[last run: skipped]"), (one_written, lines)


def test_graph_shows_the_data_edge(demo):
    dot = demo.ok("graph").stdout
    assert '"copy" -> "upper"' in dot
    graph = json.loads(demo.ok("graph", "--format", "json").stdout)
    assert graph["edges"] == [{"from": "copy", "kind": "data", "to": "upper"}]
    assert "-->" in demo.ok("graph", "--format", "mermaid").stdout


def test_check_accepts_the_demo(demo):
    result = demo.ok("check")
    assert "ok (2 stages)" in result.stderr


# ------------------------------------------------------------------------------------------ clean


def test_clean_removes_produced_files_and_keeps_the_users(demo):
    demo.ok("build", "--run-id", "one")
    produced = {f"work/{p}" for p in files_only(demo.snapshot(), "work")} | {f"output/{p}" for p in files_only(demo.snapshot(), "output")}
    assert "output/.upper.done" in produced and "work/letters/note.txt" in produced
    demo.write("output/mine.txt", "my notes\n")
    demo.write("output/letters/mine.txt", "more notes\n")
    inputs_before = files_only(demo.snapshot(), "input")

    result = demo.ok("clean")

    for path in produced:
        assert not demo.exists(path), path
    assert demo.read("output/mine.txt") == b"my notes\n"
    assert demo.read("output/letters/mine.txt") == b"more notes\n"
    assert not demo.exists("work")  # left empty: removed
    assert files_only(demo.snapshot(), "input") == inputs_before
    assert demo.exists("state/run_one.json")  # records stay without --state
    assert "removed output/.upper.done" in result.stderr

    demo.ok("build", "--run-id", "two")
    # clean keeps the output cache: the outputs come back without running a processor.
    assert demo.statuses("two") == {"copy": "restored", "upper": "restored"}
    assert demo.read("output/mine.txt") == b"my notes\n"


def test_clean_one_stage_leaves_the_others(demo):
    demo.ok("build", "--run-id", "one")
    work_before = files_only(demo.snapshot(), "work")
    demo.ok("clean", "upper")
    assert files_only(demo.snapshot(), "work") == work_before
    assert not demo.exists("output")  # only produced files were in it: removed with them
    demo.ok("build", "--run-id", "two")
    assert demo.statuses("two") == {"copy": "skipped", "upper": "restored"}


def test_clean_removes_staging_and_progress(demo):
    demo.ok("build", "--run-id", "one")
    demo.write("output/.pipe-staging/partial.txt", "half")
    demo.write("state/progress_upper.json", "{}")
    demo.ok("clean", "upper")
    assert not demo.exists("output/.pipe-staging")
    assert not demo.exists("state/progress_upper.json")


def test_clean_state_and_cache(demo):
    demo.ok("build", "--run-id", "one")
    assert demo.exists("cache") and demo.exists("state/metrics_one.json")
    demo.ok("clean")
    assert demo.exists("state/run_one.json") and demo.exists("cache")

    demo.ok("build", "--run-id", "two")
    demo.ok("clean", "--state")
    state = sorted(p.name for p in demo.path("state").iterdir()) if demo.exists("state") else []
    assert not [n for n in state if n.startswith(("run_", "metrics_", "stage_")) or n == "logs"], state
    assert demo.exists("cache")

    demo.ok("clean", "--cache")
    assert not demo.exists("cache")
    assert demo.exists("input/hello.txt")


def test_clean_never_follows_a_tampered_marker_out_of_its_folder(demo):
    demo.ok("build", "--run-id", "one")
    marker = demo.marker("output", "upper")
    marker["outputs"].append({"path": "../input/hello.txt", "size": 1, "blake3": "0" * 64})
    demo.write("output/.upper.done", json.dumps(marker))
    demo.ok("clean")
    assert demo.exists("input/hello.txt")


def test_clean_unknown_stage_is_a_usage_error(demo):
    demo.ok("build")
    before = demo.snapshot()
    result = demo.run("clean", "nosuch")
    assert result.returncode == 2, str(result)
    assert "nosuch" in result.stderr
    assert demo.snapshot() == before
