"""`pipe build` on real files: first build of the demo, no-op rebuilds, and what reruns after which change.

Why these tests exist: the contract's central promises are that outputs mirror inputs, that state
records what really happened, that an unchanged project runs no processor and touches no output,
and that exactly the stages whose ingredients changed rerun (with early cutoff downstream).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from datetime import datetime
import pytest

from blackbox import Project, builtin_stage, files_only, pipeline, proc_stage, snapshot_diff

HEX64 = re.compile(r"^[0-9a-f]{64}$")


def input_files(project) -> dict[str, bytes]:
    """input/ of a project: path relative to input/ -> bytes."""
    root = project.path("input")
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def tree_files(project, folder: str) -> dict[str, bytes]:
    """Regular files under `folder`, without pipe's markers and staging."""
    root = project.path(folder)
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and not p.name.endswith(".done") and ".pipe-staging" not in p.parts
    }


def unicode_upper(data: bytes) -> bytes:
    return data.decode("utf-8").upper().encode("utf-8")


def instant(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def assert_real_duration(record: dict, wall_ms: float) -> None:
    """durationMs is positive, fits the wall time the test measured, and matches the timestamps."""
    duration = record["durationMs"]
    assert isinstance(duration, int) and duration > 0, record
    assert duration <= wall_ms + 5, (duration, wall_ms)
    span = (instant(record["finishedAt"]) - instant(record["startedAt"])).total_seconds() * 1000
    assert abs(span - duration) <= 50 + 0.1 * duration, (span, duration)


# ----------------------------------------------------------------------------------- first build


def test_first_build_of_the_demo_mirrors_and_uppercases_every_input(demo):
    sources = input_files(demo)
    assert "letters/note.txt" in sources and "hello.txt" in sources  # the demo has a sub-folder

    started = time.monotonic()
    demo.ok("build", "--run-id", "first")
    wall_ms = (time.monotonic() - started) * 1000

    assert tree_files(demo, "work") == sources
    assert tree_files(demo, "output") == {rel: unicode_upper(data) for rel, data in sources.items()}
    hello = demo.read("output/hello.txt").decode("utf-8")
    assert "STRASSE" in hello and "ß" not in hello
    assert "THE QUICK BROWN FOX" in hello

    run = demo.run_record("first")
    assert run["runId"] == "first"
    assert run["status"] == "succeeded"
    assert [(s["name"], s["status"], s["attempts"]) for s in run["stages"]] == [("copy", "succeeded", 1), ("upper", "succeeded", 1)]
    assert_real_duration(run, wall_ms)
    for stage in run["stages"]:
        assert 0 < stage["durationMs"] <= run["durationMs"], stage

    for name, out_dir in [("copy", "work"), ("upper", "output")]:
        record = demo.stage_record(name)
        assert record["name"] == name and record["status"] == "succeeded", record
        assert record["lastRunId"] == "first"
        assert HEX64.match(record["fingerprint"]), record["fingerprint"]
        assert record["error"] is None
        assert_real_duration(record, wall_ms)
        [attempt] = record["attempts"]
        assert attempt["attempt"] == 1 and attempt["exitCode"] == 0 and attempt["classification"] == "ok"

        marker = demo.marker(out_dir, name)
        assert marker["stage"] == name and marker["runId"] == "first"
        assert marker["fingerprint"] == record["fingerprint"]
        listed = {o["path"]: o["size"] for o in marker["outputs"]}
        actual = tree_files(demo, out_dir)
        assert listed == {rel: len(data) for rel, data in actual.items()}
        for output in marker["outputs"]:
            assert HEX64.match(output["blake3"]), output

    metrics = demo.metrics("first")
    assert metrics["runId"] == "first"
    totals = metrics["totals"]
    assert (totals["stages"], totals["ran"], totals["skipped"], totals["failed"], totals["retries"]) == (2, 2, 0, 0, 0)
    assert totals["wallMs"] > 0
    input_bytes = sum(len(d) for d in sources.values())
    assert metrics["stages"]["copy"]["inputBytes"] == input_bytes
    assert metrics["stages"]["copy"]["outputBytes"] == input_bytes
    assert metrics["stages"]["upper"]["outputBytes"] == sum(len(d) for d in tree_files(demo, "output").values())
    assert metrics["stages"]["upper"]["lines"] == sum(d.count(b"\n") + (not d.endswith(b"\n")) for d in sources.values())


def test_marker_hashes_are_the_blake3_of_the_outputs(demo):
    blake3 = pytest.importorskip("blake3")
    demo.ok("build")
    for name, out_dir in [("copy", "work"), ("upper", "output")]:
        for output in demo.marker(out_dir, name)["outputs"]:
            assert output["blake3"] == blake3.blake3(demo.read(f"{out_dir}/{output['path']}")).hexdigest(), output


def test_generated_run_ids_name_the_state_files(demo):
    demo.ok("build")
    [run_id] = demo.run_ids()
    assert re.match(r"^\d{8}T\d{6}Z-[0-9a-f]{6}$", run_id), run_id
    assert demo.run_record(run_id)["status"] == "succeeded"
    assert demo.metrics(run_id)["runId"] == run_id


# ----------------------------------------------------------------------------------- no-op rebuild


def counter_lines(project, name: str = "runs.log") -> list[str]:
    path = project.path(name)
    return path.read_text().splitlines() if path.exists() else []


def test_second_build_runs_no_processor_and_touches_no_output(make_project):
    spec = pipeline(
        proc_stage("ext", ["input"], "mid", {"counter": "runs.log"}),
        builtin_stage("up", "upper", ["mid"], "out"),
    )
    project = make_project(spec, files={"input/a.txt": "alpha\n", "input/sub/b.txt": "beta\ngamma\n"})
    project.ok("build", "--run-id", "one")
    assert counter_lines(project) == ["ext 1"]
    assert project.read("out/sub/b.txt") == b"BETA\nGAMMA\n"
    before = project.snapshot()

    project.ok("build", "--run-id", "two")

    assert counter_lines(project) == ["ext 1"], "the external processor ran again"
    after = project.snapshot()
    for folder in ["input", "mid", "out"]:
        assert files_only(after, folder) == files_only(before, folder), snapshot_diff(files_only(before, folder), files_only(after, folder))
    assert project.statuses("two") == {"ext": "skipped", "up": "skipped"}
    assert project.run_record("two")["status"] == "succeeded"
    totals = project.metrics("two")["totals"]
    assert (totals["ran"], totals["skipped"], totals["failed"]) == (0, 2, 0)


def test_second_demo_build_skips_everything(demo):
    demo.ok("build", "--run-id", "one")
    before = demo.snapshot()
    result = demo.ok("build", "--run-id", "two")
    after = demo.snapshot()
    for folder in ["input", "work", "output"]:
        assert files_only(after, folder) == files_only(before, folder), snapshot_diff(files_only(before, folder), files_only(after, folder))
    assert demo.statuses("two") == {"copy": "skipped", "upper": "skipped"}
    assert demo.metrics("two")["totals"]["ran"] == 0
    assert "0 ran, 2 skipped" in result.stderr


# ----------------------------------------------------------------------------- what reruns when


def dry_run(project) -> dict[str, dict]:
    """The dry-run plan (JSON format): stage -> its stagePlanned event. The human plan is checked
    to say the same thing."""
    events = [json.loads(line) for line in project.ok("build", "--dry-run", "--message-format", "json").stdout.splitlines()]
    human = project.ok("build", "--dry-run").stdout.splitlines()
    assert human == [f"{e['stage']}: {e['summary']}" for e in events], (human, events)
    return {e["stage"]: e for e in events}


def kinds(event: dict) -> list[str]:
    """The reason kinds of a decision to do work (`run`, or `restore` from the output cache)."""
    assert event["decision"] in ("run", "restore"), event
    return [r["kind"] for r in event["reasons"]]


def assert_skip(event: dict) -> None:
    assert event["decision"] == "skip", event
    assert event["summary"].startswith("skip"), event


def assert_pending(event: dict, upstream: str) -> None:
    assert event["decision"] == "pending" and event["upstream"] == upstream, event
    assert event["summary"] == f"pending (upstream {upstream} runs)", event


def test_editing_an_input_reruns_both_stages_and_names_the_input(demo):
    demo.ok("build", "--run-id", "one")
    demo.write("input/hello.txt", "hello again\n")

    plan = dry_run(demo)
    assert kinds(plan["copy"]) == ["inputChanged"] and plan["copy"]["reasons"][0]["path"] == "input/hello.txt"
    assert plan["copy"]["summary"].startswith("run (input input/hello.txt changed"), plan
    assert_pending(plan["upper"], "copy")

    demo.ok("build", "--run-id", "two")
    assert demo.statuses("two") == {"copy": "succeeded", "upper": "succeeded"}
    reasons = {s["name"]: s["reason"] for s in demo.run_record("two")["stages"]}
    assert "input input/hello.txt changed" in reasons["copy"]
    assert "input work/hello.txt changed" in reasons["upper"]
    assert demo.read("output/hello.txt") == b"HELLO AGAIN\n"


def test_an_added_or_removed_input_reruns(demo):
    demo.ok("build", "--run-id", "one")
    demo.write("input/new.txt", "fresh\n")
    plan = dry_run(demo)
    assert kinds(plan["copy"]) == ["inputAdded"] and "input/new.txt added" in plan["copy"]["summary"], plan
    demo.ok("build", "--run-id", "two")
    assert demo.read("output/new.txt") == b"FRESH\n"

    demo.path("input/new.txt").unlink()
    plan = dry_run(demo)
    # Back to the inputs of run `one`: the output cache has that result, so it is restored.
    assert plan["copy"]["decision"] == "restore" and plan["copy"]["fromRun"] == "one", plan
    assert kinds(plan["copy"]) == ["inputRemoved"] and "input/new.txt removed" in plan["copy"]["summary"], plan
    demo.ok("build", "--run-id", "three")
    assert demo.statuses("three") == {"copy": "restored", "upper": "restored"}
    assert not demo.exists("output/new.txt") and not demo.exists("work/new.txt")


def test_changing_upper_params_reruns_only_upper(demo):
    demo.ok("build", "--run-id", "one")
    demo.edit_pipefile(lambda s: demo.stage_spec(s, "upper").__setitem__("params", {"mode": "ascii"}))

    plan = dry_run(demo)
    assert_skip(plan["copy"])
    assert kinds(plan["upper"]) == ["paramChanged"] and plan["upper"]["reasons"][0]["key"] == "mode"
    assert "param `mode` changed" in plan["upper"]["summary"], plan

    demo.ok("build", "--run-id", "two")
    assert demo.statuses("two") == {"copy": "skipped", "upper": "succeeded"}
    source = demo.read("input/hello.txt")
    assert demo.read("output/hello.txt") == source.upper()  # ASCII letters only
    assert "STRAßE".encode() in demo.read("output/hello.txt")


def test_bumping_copy_version_reruns_copy_and_early_cutoff_skips_upper(demo):
    demo.ok("build", "--run-id", "one")
    before = files_only(demo.snapshot(), "output")
    demo.edit_pipefile(lambda s: demo.stage_spec(s, "copy")["processor"].__setitem__("version", "2"))

    plan = dry_run(demo)
    assert kinds(plan["copy"]) == ["processorVersionChanged"], plan
    assert "processor version changed" in plan["copy"]["summary"], plan
    assert_pending(plan["upper"], "copy")

    demo.ok("build", "--run-id", "two")
    assert demo.statuses("two") == {"copy": "succeeded", "upper": "skipped"}
    after = files_only(demo.snapshot(), "output")
    assert after == before, snapshot_diff(before, after)


def test_deleting_an_output_reruns_its_stage(demo):
    demo.ok("build", "--run-id", "one")
    expected = demo.read("output/hello.txt")
    demo.path("output/hello.txt").unlink()

    plan = dry_run(demo)
    assert_skip(plan["copy"])
    assert kinds(plan["upper"]) == ["outputMissing"] and "output output/hello.txt missing" in plan["upper"]["summary"], plan
    assert plan["upper"]["decision"] == "restore", "the output cache still holds the deleted output"

    demo.ok("build", "--run-id", "two")
    assert demo.statuses("two") == {"copy": "skipped", "upper": "restored"}
    assert demo.read("output/hello.txt") == expected

    # Without the output cache, the stage really runs again.
    shutil.rmtree(demo.path("cache"))
    demo.path("output/hello.txt").unlink()
    assert dry_run(demo)["upper"]["decision"] == "run"
    demo.ok("build", "--run-id", "three")
    assert demo.statuses("three") == {"copy": "skipped", "upper": "succeeded"}
    assert demo.read("output/hello.txt") == expected


def test_editing_a_final_output_reruns_its_stage(demo):
    demo.ok("build", "--run-id", "one")
    expected = demo.read("output/letters/note.txt")
    demo.write("output/letters/note.txt", "vandalised\n")

    plan = dry_run(demo)
    assert_skip(plan["copy"])
    assert kinds(plan["upper"]) == ["outputModified"] and "output output/letters/note.txt modified" in plan["upper"]["summary"], plan

    demo.ok("build", "--run-id", "two")
    assert demo.statuses("two") == {"copy": "skipped", "upper": "succeeded"}
    assert demo.read("output/letters/note.txt") == expected


def test_editing_an_intermediate_output_reruns_its_stage_only(demo):
    demo.ok("build", "--run-id", "one")
    final = files_only(demo.snapshot(), "output")
    original = demo.read("work/hello.txt")
    demo.write("work/hello.txt", b"X" * len(original))  # same size: only the content tells

    plan = dry_run(demo)
    assert kinds(plan["copy"]) == ["outputModified"] and "output work/hello.txt modified" in plan["copy"]["summary"], plan
    assert_pending(plan["upper"], "copy")

    demo.ok("build", "--run-id", "two")
    assert demo.read("work/hello.txt") == original
    # copy restored the very bytes upper last read: upper is skipped (early cutoff)
    assert demo.statuses("two") == {"copy": "succeeded", "upper": "skipped"}
    assert files_only(demo.snapshot(), "output") == final


def test_touching_an_input_reruns_nothing(demo):
    demo.ok("build", "--run-id", "one")
    before = demo.snapshot()
    for path in [demo.path("input/hello.txt"), demo.path("input/letters/note.txt")]:
        st = path.stat()
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))

    plan = dry_run(demo)
    assert_skip(plan["copy"])
    assert_skip(plan["upper"])
    demo.ok("build", "--run-id", "two")
    assert demo.statuses("two") == {"copy": "skipped", "upper": "skipped"}
    after = demo.snapshot()
    for folder in ["work", "output"]:
        assert files_only(after, folder) == files_only(before, folder)


def test_editing_the_processor_script_reruns_its_stage(make_project):
    spec = pipeline(proc_stage("ext", ["input"], "out", {"counter": "runs.log"}))
    project = make_project(spec, files={"input/a.txt": "a\n"})
    project.ok("build", "--run-id", "one")
    project.write("proc.py", project.read("proc.py").decode() + "\n# a harmless edit\n")
    plan = dry_run(project)
    assert kinds(plan["ext"]) == ["processorFileChanged"] and "processor file proc.py changed" in plan["ext"]["summary"], plan
    project.ok("build", "--run-id", "two")
    assert project.statuses("two") == {"ext": "succeeded"}
    assert counter_lines(project) == ["ext 1", "ext 1"]


def test_building_a_named_stage_builds_only_it_and_what_it_needs(demo):
    demo.ok("build", "copy", "--run-id", "one")
    assert demo.statuses("one") == {"copy": "succeeded"}
    assert demo.exists("work/hello.txt") and not demo.exists("output")
    demo.ok("build", "upper", "--run-id", "two")
    assert demo.statuses("two") == {"copy": "skipped", "upper": "succeeded"}
    result = demo.run("build", "nosuch")
    assert result.returncode == 2, str(result)
    assert "unknown stage `nosuch`" in result.stderr


def test_copying_the_project_elsewhere_reruns_nothing(demo, tmp_path):
    demo.ok("build", "--run-id", "one")
    copy = Project(tmp_path / "copied", demo.binary)
    shutil.copytree(demo.root, copy.root, symlinks=True)
    copy.ok("build", "--run-id", "two")
    assert copy.statuses("two") == {"copy": "skipped", "upper": "skipped"}


# ------------------------------------------------------------------------------- inputs and env


def test_processor_sees_the_protocol_environment(make_project):
    sandbox = {"writablePaths": ["."], "passEnv": ["BB_PASSED_THROUGH"]}
    spec = pipeline(proc_stage("ext", ["input"], "out", {"counter": "runs.log", "dumpEnv": "env.json", "n": 7}, resources={"cpus": 1}, sandbox=sandbox))
    project = make_project(spec, files={"input/b.txt": "b\n", "input/a/z.txt": "z\n", "input/a.txt": "a\n"})
    project.ok("build", "--run-id", "envrun", env={"BB_PASSED_THROUGH": "yes", "BB_NOT_LISTED": "no"})
    env = project.json("env.json")
    root = str(project.root.resolve())
    assert env["PIPELINE_RUN_ID"] == "envrun"
    assert env["PIPELINE_STAGE"] == "ext"
    assert env["PIPELINE_ATTEMPT"] == "1"
    inputs = json.loads(env["PIPELINE_INPUTS"])
    assert inputs == sorted(inputs) and [os.path.relpath(p, root) for p in inputs] == ["input/a.txt", "input/a/z.txt", "input/b.txt"]
    assert all(os.path.isabs(p) for p in inputs)
    assert os.path.realpath(env["PIPELINE_INPUT_ROOT"]) == os.path.realpath(project.path("input"))
    staging = os.path.realpath(env["PIPELINE_OUTPUT_DIR"])
    assert staging.startswith(os.path.realpath(project.path("out")) + os.sep), staging  # same filesystem
    assert json.loads(env["PIPELINE_PARAMS"]) == {"counter": "runs.log", "dumpEnv": "env.json", "n": 7}
    assert env["PIPELINE_PROGRESS_FD"] == "3" and env["fd3"] is True
    assert "PIPELINE_RESUME" not in env
    assert env["PIPELINE_CPUS"] == env["OMP_NUM_THREADS"] == env["RAYON_NUM_THREADS"] == "1"
    assert env["BB_PASSED_THROUGH"] == "yes"  # listed in sandbox.passEnv
    assert "BB_NOT_LISTED" not in env  # the environment is an allowlist (docs/offline.md)
    assert os.path.realpath(env["cwd"]) == os.path.realpath(project.root)
    assert not os.path.exists(env["PIPELINE_OUTPUT_DIR"])  # published and removed
    assert project.read("out/a/z.txt") == b"z\n"


def test_a_content_change_that_keeps_size_and_mtime_is_seen(demo):
    """Content, not stat: an edit that restores the old mtime (as `rsync -t` or `tar` would) reruns."""

    def sneaky_edit(rel: str, old: bytes, new: bytes) -> None:
        path = demo.path(rel)
        st = path.stat()
        data = path.read_bytes()
        assert old in data and len(old) == len(new)
        path.write_bytes(data.replace(old, new))  # same size, same inode, different bytes
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
        assert path.stat().st_size == st.st_size and path.stat().st_mtime_ns == st.st_mtime_ns

    demo.ok("build", "--run-id", "one")
    sneaky_edit("output/letters/note.txt", b"DEAR", b"DEER")
    plan = dry_run(demo)
    assert_skip(plan["copy"])
    assert kinds(plan["upper"]) == ["outputModified"], plan
    demo.ok("build", "--run-id", "two")
    assert demo.statuses("two") == {"copy": "skipped", "upper": "succeeded"}
    assert demo.read("output/letters/note.txt") == unicode_upper(demo.read("input/letters/note.txt"))

    sneaky_edit("input/hello.txt", b"quick", b"slick")
    plan = dry_run(demo)
    assert kinds(plan["copy"]) == ["inputChanged"], plan
    demo.ok("build", "--run-id", "three")
    assert demo.statuses("three") == {"copy": "succeeded", "upper": "succeeded"}
    assert b"SLICK" in demo.read("output/hello.txt")


def test_globs_and_several_folders_mirror_relative_to_their_common_root(make_project):
    spec = pipeline(
        builtin_stage("txt", "upper", ["data/**/*.txt"], "out_glob"),
        builtin_stage("two", "copy", ["data/a", "data/b"], "out_two"),
        builtin_stage("one", "copy", ["data/a/x.txt"], "out_one"),
    )
    files = {"data/a/x.txt": "x\n", "data/a/y.csv": "y\n", "data/b/deep/z.txt": "z\n", "data/c.txt": "c\n"}
    project = make_project(spec, files=files)
    project.ok("build")
    assert tree_files(project, "out_glob") == {"a/x.txt": b"X\n", "b/deep/z.txt": b"Z\n", "c.txt": b"C\n"}
    assert tree_files(project, "out_two") == {"a/x.txt": b"x\n", "a/y.csv": b"y\n", "b/deep/z.txt": b"z\n"}
    assert tree_files(project, "out_one") == {"x.txt": b"x\n"}


def test_a_long_input_list_reaches_every_processor(make_project):
    """More than 64 KiB of input paths: the engine hands the list over in a file."""
    folder = "a-rather-long-folder-name-" * 6
    files = {f"input/{folder}/file_{i:05d}.txt": f"line {i}\n" for i in range(320)}
    spec = pipeline(
        builtin_stage("native", "upper", ["input"], "out_native"),
        proc_stage("ext", ["input"], "out_ext", {"counter": "runs.log", "upper": True}),
    )
    project = make_project(spec, files=files)
    assert len(json.dumps([str(project.path(p)) for p in files])) > 64 * 1024
    project.ok("build")
    expected = {rel.removeprefix("input/"): data.upper().encode() for rel, data in files.items()}
    assert tree_files(project, "out_native") == expected
    assert tree_files(project, "out_ext") == expected


def test_no_temporary_files_are_left_behind(demo):
    demo.ok("build")
    demo.write("input/hello.txt", "again\n")
    demo.ok("build")
    leftovers = [p for p in demo.snapshot() if ".tmp" in p or ".pipe-staging" in p]
    assert leftovers == []


def test_non_ascii_file_names_are_mirrored(make_project):
    spec = pipeline(builtin_stage("up", "upper", ["input"], "out"))
    project = make_project(spec, files={"input/naïve dir/straße name.txt": "straße\n", "input/日本/ファイル.txt": "ｆｕｌｌ\n"})
    project.ok("build")
    assert tree_files(project, "out") == {"naïve dir/straße name.txt": "STRASSE\n".encode(), "日本/ファイル.txt": "ＦＵＬＬ\n".encode()}


def test_a_non_utf8_file_name_fails_the_stage_cleanly(make_project):
    spec = pipeline(builtin_stage("cp", "copy", ["input"], "out"))
    project = make_project(spec, files={"input/good.txt": "good\n"})
    (project.path("input") / os.fsdecode(b"bad\xffname.txt")).write_bytes(b"bad\n")
    result = project.run("build", "--run-id", "r")
    # whatever the engine decides (refuse or copy), the run must end with a finished record
    run = project.run_record("r")
    assert run["status"] in ("failed", "succeeded"), run
    assert run["finishedAt"] is not None
    assert project.stage_record("cp")["status"] != "running"
    if result.returncode != 0:
        assert "bad" in result.stderr and "name.txt" in result.stderr, str(result)


def test_a_file_in_place_of_an_output_folder_is_a_clear_error(demo):
    demo.write("work", "a user's file named like copy's output folder\n")
    result = demo.run("build", "--run-id", "r")
    assert result.returncode != 0, str(result)
    assert demo.read("work") == b"a user's file named like copy's output folder\n"
    assert re.search(r"\bwork\b", result.stderr), str(result)
