"""The command line: run ids, the seed's spellings, pipeline paths, JSON events, the schema.

Why these tests exist: a run id names one run forever (its state files must never be overwritten),
a user-given id becomes a file name (so it must not escape state/), the seed's spelling
`pipe --run-id ID` / `pipe --pipeline pipeline.json` must keep working, paths are relative to the
Pipefile (not to the current folder), and tools rely on the JSON event stream and the schema.
"""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest

from blackbox import DEFAULT_TIMEOUT, base_env, snapshot_diff


def test_a_used_run_id_is_refused_and_nothing_is_written(demo):
    demo.ok("build", "--run-id", "demo1")
    demo.write("input/hello.txt", "changed, so a build would run\n")
    before = demo.snapshot()
    result = demo.run("build", "--run-id", "demo1")
    assert result.returncode == 2, str(result)
    assert "demo1" in result.stderr and "already used" in result.stderr, str(result)
    after = demo.snapshot()
    assert after == before, snapshot_diff(before, after)
    assert demo.run_record("demo1")["status"] == "succeeded"


@pytest.mark.parametrize("run_id", ["../x", "a/b", ".hidden", "", "a b"])
def test_an_invalid_run_id_is_refused_before_anything_is_written(demo, run_id):
    before = demo.snapshot()
    result = demo.run("build", "--run-id", run_id)
    assert result.returncode == 2, str(result)
    assert "run id" in result.stderr, str(result)
    assert demo.snapshot() == before
    assert not demo.exists("x") and not demo.path("..").joinpath("x").exists()


def test_seed_spelling_without_subcommand_builds(demo):
    result = demo.run("--run-id", "demo1")
    assert result.returncode == 0, str(result)
    assert demo.run_record("demo1")["status"] == "succeeded"
    assert demo.read("output/hello.txt").startswith(b"THE QUICK BROWN FOX")
    assert demo.run("--run-id", "demo1").returncode == 2


def test_a_pipeline_named_pipeline_json(demo):
    shutil.move(demo.path("Pipefile.json"), demo.path("pipeline.json"))
    result = demo.run("--pipeline", "pipeline.json", "--run-id", "seed")
    assert result.returncode == 0, str(result)
    assert demo.statuses("seed") == {"copy": "succeeded", "upper": "succeeded"}
    # with only pipeline.json present it is the default
    result = demo.run("build", "--run-id", "again")
    assert result.returncode == 0, str(result)
    assert demo.statuses("again") == {"copy": "skipped", "upper": "skipped"}
    assert demo.run_record("again")["pipeline"].endswith("pipeline.json")


def test_paths_are_relative_to_the_pipefile_not_the_current_folder(demo, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    pipefile = str(demo.path("Pipefile.json"))
    result = demo.run("build", "-f", pipefile, "--run-id", "r", cwd=elsewhere)
    assert result.returncode == 0, str(result)
    assert list(elsewhere.iterdir()) == []
    assert demo.run_record("r")["status"] == "succeeded"
    assert demo.read("output/hello.txt").startswith(b"THE QUICK")


def test_build_json_events_are_one_object_per_line(demo):
    result = demo.ok("build", "--message-format", "json", "--run-id", "r")
    events = [json.loads(line) for line in result.stdout.splitlines()]
    names = [e["event"] for e in events]
    assert names[0] == "runStarted" and names[-1] == "runFinished", names
    finished = {e["stage"]: e["status"] for e in events if e["event"] == "stageFinished"}
    assert finished == {"copy": "succeeded", "upper": "succeeded"}
    assert events[-1]["runId"] == "r" and events[-1]["status"] == "succeeded"


def test_status_shows_the_last_runs_result(make_project):
    from blackbox import pipeline, proc_stage

    project = make_project(pipeline(proc_stage("ext", ["input"], "out", {"exit": 1})), files={"input/a.txt": "a\n"})
    assert project.run("build", "--run-id", "r").returncode == 1
    status = project.ok("status").stdout
    assert status.startswith("ext: run (") and status.rstrip().endswith("[last run: failed]"), status


def test_schema_is_json_and_knows_the_pipefile_fields(demo):
    schema = json.loads(demo.ok("schema").stdout)
    text = json.dumps(schema)
    for field in ["stages", "outputDir", "inputs", "processor", "retry", "maxAttempts", "checkpoint", "everyLines", "quotas"]:
        assert f'"{field}"' in text, field


@pytest.mark.parametrize("flag", ["-j", "--jobs"])
def test_jobs_flag_is_accepted(demo, flag):
    result = demo.run("build", flag, "2", "--run-id", "r")
    assert result.returncode == 0, str(result)
    assert demo.statuses("r") == {"copy": "succeeded", "upper": "succeeded"}


def test_lines_of_both_streams_keep_their_order_when_merged(make_project):
    """Per-stage lines are written in batches by a thread of their own: with stdout and stderr
    going to one pipe (`2>&1`), every stage's JSON event still comes right before its human line,
    and nothing is lost or reordered."""
    n = 300
    stages = [
        {
            "name": f"s{i:03}",
            "processor": {"builtin": "upper", "version": "1"},
            "inputs": [f"in/f{i:03}.txt"],
            "outputDir": f"out/s{i:03}",
        }
        for i in range(n)
    ]
    files = {f"in/f{i:03}.txt": f"line {i}\n" for i in range(n)}
    project = make_project({"version": 1, "stages": stages}, files=files)
    project.ok("build")
    merged = subprocess.run(
        [str(project.binary), "build", "--message-format", "json"],
        cwd=project.root,
        env=base_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=DEFAULT_TIMEOUT,
        check=True,
    ).stdout.splitlines()
    planned = [i for i, line in enumerate(merged) if '"event":"stagePlanned"' in line]
    assert len(planned) == n, merged[:5]
    for i in planned:
        stage = json.loads(merged[i])["stage"]
        assert merged[i + 1] == f"{stage}: skip (unchanged)", merged[i : i + 2]
    assert merged[-1].startswith("pipe: succeeded: 0 ran, 300 skipped"), merged[-3:]
    human = project.ok("build").stderr.splitlines()
    assert human[1:-2] == [f"s{i:03}: skip (unchanged)" for i in range(n)], human[:3]
