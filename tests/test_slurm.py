"""The Slurm executor against a real Slurm (`scripts/slurm-single-node.sh start`, then
`eval "$(scripts/slurm-single-node.sh env)"`). Without one (no SLURM_CONF, or `sinfo` fails) every
test here is skipped, with the reason shown by `pytest -rs`.

The temp folders of these tests must be visible to slurmd under the same path: on the
single-node cluster any local path is.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
from pathlib import Path

import pytest

from blackbox import PY_PROCESSORS, SLOW_UPPER, Project, pipeline, wait_for, wait_for_file

SKIP_REASON = "no Slurm: run scripts/slurm-single-node.sh start"


def slurm_problem() -> str | None:
    if not os.environ.get("SLURM_CONF"):
        return "SLURM_CONF is not set"
    if shutil.which("sinfo") is None:
        return "sinfo is not installed"
    try:
        out = subprocess.run(["sinfo", "--noheader", "--format=%T"], capture_output=True, text=True, timeout=30)
    except subprocess.TimeoutExpired:
        return "sinfo timed out"
    if out.returncode != 0:
        return f"sinfo failed: {out.stderr.strip()}"
    if not any(s.strip().rstrip("*") in ("idle", "mixed", "allocated") for s in out.stdout.split()):
        return f"no node is up (sinfo: {out.stdout.strip()!r})"
    return None


@pytest.fixture(scope="module")
def slurm() -> None:
    problem = slurm_problem()
    if problem:
        pytest.skip(f"{SKIP_REASON} ({problem})")


SLURM_SETTINGS = {"pollIntervalMs": 200}


def on_slurm(spec: dict, **slurm) -> dict:
    spec = json.loads(json.dumps(spec))
    settings = spec.setdefault("settings", {})
    settings["executor"] = "slurm"
    settings["slurm"] = {**SLURM_SETTINGS, **slurm}
    return spec


def tree(root: Path) -> dict[str, bytes]:
    """Every published file (markers aside) by relative path."""
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and not p.name.endswith(".done")
    }


def jobs_of_run(project: Project, run_id: str) -> list[Path]:
    """The job folders the run wrote (one per Slurm job it submitted)."""
    return sorted(project.path(f"state/logs/{run_id}/slurm").glob("job-*"))


def statuses_of_run(project: Project, run_id: str) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(project.path(f"state/logs/{run_id}/slurm").glob("unit-*/status.json"))]


def queue_comments() -> list[str]:
    """Comments of every job Slurm still knows (finished ones stay MinJobAge seconds)."""
    out = subprocess.run(["squeue", "--noheader", "--states=all", "--format=%k"], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    return out.stdout.split("\n")


def job_state(job: str) -> str:
    out = subprocess.run(["squeue", "--noheader", "--states=all", "--format=%T", f"--jobs={job}"], capture_output=True, text=True, timeout=30)
    return out.stdout.strip() or "GONE"


def assert_no_job_submitted(project: Project, run_id: str) -> None:
    assert not project.exists(f"state/logs/{run_id}/slurm/job-1"), "a job was written"
    assert not any(c.strip() == f"pipe run {run_id}" for c in queue_comments()), "Slurm knows a job of the run"


def test_the_demo_builds_on_slurm_byte_identical_to_a_local_build(slurm, make_project):
    local = make_project(demo=True, with_proc=False, name="local")
    local.ok("build", "--run-id", "local")
    remote = make_project(demo=True, with_proc=False, name="slurm")
    remote.ok("build", "--executor", "slurm", "--run-id", "first", timeout=300)

    assert remote.statuses("first") == {"copy": "succeeded", "upper": "succeeded"}
    assert tree(remote.path("output")) == tree(local.path("output"))
    assert tree(remote.path("work")) == tree(local.path("work"))
    # each stage ran as a job of its own, on the node, under the same sandbox layers
    assert len(jobs_of_run(remote, "first")) == 2
    ends = statuses_of_run(remote, "first")
    assert len(ends) == 2 and all(e["jobId"] and e["exitCode"] == 0 for e in ends), ends
    assert len({e["jobId"] for e in ends}) == 2
    local_layers = local.stage_record("upper")["attempts"][0]["sandbox"]
    assert remote.stage_record("upper")["attempts"][0]["sandbox"] == local_layers
    assert "Slurm job" in remote.read(remote.stage_record("upper")["attempts"][0]["log"]).decode()

    again = remote.ok("build", "--executor", "slurm", "--run-id", "second", timeout=300)
    assert remote.statuses("second") == {"copy": "skipped", "upper": "skipped"}, again
    assert_no_job_submitted(remote, "second")


def map_pipefile(items: int) -> tuple[dict, dict[str, str]]:
    files = {f"input/{'sub/' if i % 10 == 0 else ''}part{i:04d}.txt": f"item {i} straße café\n" * (1 + i % 5) for i in range(items)}
    spec = pipeline(
        {"name": "up", "foreach": "file", "processor": {"builtin": "upper", "version": "1"}, "inputs": ["input"], "outputDir": "out", "resources": {"cpus": 2}},
        {"name": "all", "processor": {"builtin": "copy", "version": "1"}, "inputs": ["out"], "outputDir": "final"},
        quotas={"cpus": 2},
    )
    return spec, files


def test_a_200_item_map_stage_builds_on_slurm_in_batched_jobs(slurm, make_project):
    spec, files = map_pipefile(200)
    local = make_project(spec, files=files, with_proc=False, name="local")
    local.ok("build", "--run-id", "local", timeout=300)
    remote = make_project(on_slurm(spec), files=files, with_proc=False, name="slurm")
    remote.ok("build", "--run-id", "first", timeout=600)

    assert remote.statuses("first") == {"up": "succeeded", "all": "succeeded"}
    assert tree(remote.path("out")) == tree(local.path("out"))
    assert tree(remote.path("final")) == tree(local.path("final"))
    assert len(tree(remote.path("out"))) == 200
    assert remote.marker("out", "up")["items"] == local.marker("out", "up")["items"]
    # 200 items + the `all` stage; the items went in batches (default: spread over 8 jobs)
    jobs = jobs_of_run(remote, "first")
    assert 2 <= len(jobs) <= 10, [j.name for j in jobs]
    ends = statuses_of_run(remote, "first")
    assert len(ends) == 201 and all(e["exitCode"] == 0 for e in ends)
    assert len({e["jobId"] for e in ends}) == len(jobs)

    remote.ok("build", "--run-id", "second", timeout=300)
    assert remote.statuses("second") == {"up": "skipped", "all": "skipped"}
    assert_no_job_submitted(remote, "second")




def blocking_project(make_project) -> tuple[Project, dict[str, str]]:
    files = {f"input/part{f}.txt": "".join(f"{f}:{i:05d} straße café\n" for i in range(1000)) for f in range(3)}
    lines = files["input/part1.txt"].splitlines(keepends=True)
    lines[500] = "BLOCK\n"
    files["input/part1.txt"] = "".join(lines)
    spec = pipeline(
        {
            "name": "up",
            "processor": {"command": ["python3", "py/slow_upper.py"], "version": "1", "files": ["py/pipe_sdk.py"]},
            "inputs": ["input"],
            "outputDir": "out",
            "checkpoint": {"everyLines": 100},
            "sandbox": {"writablePaths": ["."]},
        }
    )
    project = make_project(on_slurm(spec), files=files, with_proc=False)
    shutil.copytree(PY_PROCESSORS, project.path("py"), ignore=shutil.ignore_patterns("__pycache__"))
    project.write("py/slow_upper.py", SLOW_UPPER)
    return project, files


def job_of_attempt(project: Project, run_id: str, stage: str, attempt: int = 1) -> str:
    log = project.path(f"state/logs/{run_id}/{stage}.attempt{attempt}.log")
    wait_for(lambda: log.exists() and "Slurm job" in log.read_text(), "the attempt's job id")
    return re.search(r"Slurm job (\d+)", log.read_text()).group(1)


@pytest.mark.parametrize("how", ["scancel", "ctrl-c"])
def test_a_job_killed_mid_stage_resumes_from_its_checkpoint(slurm, make_project, how):
    project, files = blocking_project(make_project)
    build = project.start("build", "--run-id", "stopped")
    job = job_of_attempt(project, "stopped", "up")
    wait_for_file(project.path("started"), proc=build, timeout=120)
    progress = project.path("state/progress_up.json")
    wait_for(lambda: progress.exists() and json.loads(progress.read_text())["lineOffset"] == 500, "the checkpoint before BLOCK", timeout=60)

    if how == "scancel":
        subprocess.run(["scancel", job], check=True, timeout=30)
        result = project.finish(build, timeout=120)
        assert result.returncode == 1, str(result)
        attempt = project.stage_record("up")["attempts"][0]
        assert attempt["classification"] == "signal", attempt
        assert "CANCELLED" in project.stage_record("up")["error"]
    else:
        os.kill(build.pid, signal.SIGINT)
        result = project.finish(build, timeout=120)
        assert result.returncode == 130, str(result)
        assert project.run_record("stopped")["status"] == "interrupted"
    assert job_state(job) not in ("PENDING", "RUNNING", "COMPLETING"), "the job still runs"

    cp = project.json("state/progress_up.json")
    assert (cp["inputIndex"], cp["lineOffset"]) == (1, 500), cp
    assert not project.exists("out/.up.done")
    assert "up: resume from line 500" in project.ok("build", "--dry-run").stdout

    project.write("release", "")
    project.ok("build", "--run-id", "resumed", timeout=300)
    assert project.statuses("resumed") == {"up": "resumed"}
    assert project.stage_record("up")["resumedFromLine"] == 500
    expected = {rel.removeprefix("input/"): text.upper().encode() for rel, text in files.items()}
    assert tree(project.path("out")) == expected


HOG = '''
import os, sys, time
chunks = []
for _ in range(100):  # up to 2 GiB, 20 MiB at a time, every page touched
    chunks.append(b"x" * (20 << 20))
    time.sleep(0.05)
out = os.environ["PIPELINE_OUTPUT_DIR"]
open(os.path.join(out, "survived.txt"), "w").write("no cap applied\\n")
'''


@pytest.mark.parametrize("enforcer", ["watchdog", "slurm"])
def test_a_memory_cap_violation_is_classified_memory(slurm, make_project, enforcer):
    stage = {"name": "hog", "processor": {"command": ["python3", "hog.py"], "version": "1"}, "inputs": ["hog.py"], "outputDir": "out"}
    slurm_opts = {}
    if enforcer == "watchdog":
        # the engine's watchdog, run by the job wrapper on the node
        stage["resources"] = {"memoryMb": 100}
    else:
        # no engine cap: only Slurm's (jobacct_gather/linux + OverMemoryKill) can stop it
        slurm_opts = {"extraArgs": ["--mem=100"]}
    project = make_project(on_slurm(pipeline(stage), **slurm_opts), files={"hog.py": HOG}, with_proc=False)
    result = project.run("build", "--run-id", "hog", timeout=300)
    assert result.returncode == 1, str(result)
    record = project.stage_record("hog")
    assert [a["classification"] for a in record["attempts"]] == ["memory"], record
    if enforcer == "slurm":
        assert "Slurm" in record["error"] and "memory" in record["error"], record["error"]
    assert not project.exists("out/survived.txt")


RENDEZVOUS = '''
import json, os, sys, time
me = os.environ["PIPELINE_STAGE"]
other = json.loads(os.environ["PIPELINE_PARAMS"])["other"]
open(me + ".started", "w").close()
deadline = time.monotonic() + 120
while not os.path.exists(other + ".started"):
    if time.monotonic() > deadline:
        print("the other stage never started: the two did not run at once", file=sys.stderr)
        sys.exit(1)
    time.sleep(0.05)
with open(os.path.join(os.environ["PIPELINE_OUTPUT_DIR"], me + ".txt"), "w") as f:
    f.write(me + "\\n")
'''


def test_two_one_cpu_stages_run_at_once_on_the_two_cpu_node(slurm, make_project):
    def stage(name: str, other: str) -> dict:
        return {
            "name": name,
            "processor": {"command": ["python3", "meet.py"], "version": "1"},
            "params": {"other": other},
            "inputs": ["meet.py"],
            "outputDir": f"out-{name}",
            "resources": {"cpus": 1},
            "sandbox": {"writablePaths": ["."]},
        }

    spec = on_slurm(pipeline(stage("a", "b"), stage("b", "a"), quotas={"cpus": 2}))
    project = make_project(spec, files={"meet.py": RENDEZVOUS}, with_proc=False)
    project.ok("build", "--run-id", "both", timeout=300)
    assert project.statuses("both") == {"a": "succeeded", "b": "succeeded"}
    ends = statuses_of_run(project, "both")
    assert len({e["jobId"] for e in ends}) == 2, ends
    assert project.read("out-a/a.txt") == b"a\n"


def test_jobs_left_running_by_a_killed_build_are_cancelled_by_the_next(slurm, make_project):
    project, files = blocking_project(make_project)
    build = project.start("build", "--run-id", "killed")
    job = job_of_attempt(project, "killed", "up")
    wait_for_file(project.path("started"), proc=build, timeout=120)
    progress = project.path("state/progress_up.json")
    wait_for(lambda: progress.exists() and json.loads(progress.read_text())["lineOffset"] == 500, "the checkpoint before BLOCK", timeout=60)
    os.kill(build.pid, signal.SIGKILL)
    project.finish(build, timeout=60)
    # the engine is gone, its job is not: nobody else would stop it
    assert job_state(job) == "RUNNING"
    assert json.loads(project.read("state/slurm_jobs.json")) == {job: "killed"}

    project.path("started").unlink()
    again = project.start("build", "--run-id", "next")
    wait_for_file(project.path("started"), proc=again, timeout=120)
    # the old job was cancelled before the new attempt started
    assert job_state(job) not in ("PENDING", "RUNNING", "COMPLETING")
    project.write("release", "")
    result = project.finish(again, timeout=300)
    assert result.returncode == 0, str(result)
    assert f"cancelled Slurm job {job} left running by run killed" in result.stderr
    assert project.statuses("next") == {"up": "resumed"}
    expected = {rel.removeprefix("input/"): text.upper().encode() for rel, text in files.items()}
    assert tree(project.path("out")) == expected
    assert not project.exists("state/slurm_jobs.json")


def wrapper_pid(project: Project) -> int:
    """The pid of the job wrapper (`pipe __slurm-job .../job.json`) running this project's job."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if len(argv) >= 3 and argv[1] == b"__slurm-job" and argv[2].startswith(str(project.root).encode()):
            return int(entry.name)
    raise AssertionError("no job wrapper of this project is running")


def test_a_job_that_dies_without_a_status_file_is_retried_from_its_checkpoint(slurm, make_project):
    """A node failure, as the engine sees one: the job's process dies and no status file appears.
    Slurm reports the job FAILED; the attempt is retryable and the retry resumes."""
    project, files = blocking_project(make_project)
    project.edit_pipefile(lambda spec: spec["stages"][0].update(retry={"maxAttempts": 2, "baseDelayMs": 10}))
    tally = project.path("tally.txt")
    build = project.start("build", "--run-id", "lost", env={"PIPE_LINE_TALLY": str(tally)})
    job = job_of_attempt(project, "lost", "up")
    wait_for_file(project.path("started"), proc=build, timeout=120)
    progress = project.path("state/progress_up.json")
    wait_for(lambda: progress.exists() and json.loads(progress.read_text())["lineOffset"] == 500, "the checkpoint before BLOCK", timeout=60)
    os.kill(wrapper_pid(project), signal.SIGKILL)  # the processor dies with it (parent-death signal)
    wait_for(lambda: job_state(job) not in ("PENDING", "RUNNING", "COMPLETING"), "the job's end", timeout=60)
    project.write("release", "")
    result = project.finish(build, timeout=300)
    assert result.returncode == 0, str(result)
    record = project.stage_record("up")
    assert [a["classification"] for a in record["attempts"]] == ["retryable", "ok"], record
    logs = project.read(record["attempts"][0]["log"]).decode()
    assert "Slurm job" in logs
    expected = {rel.removeprefix("input/"): text.upper().encode() for rel, text in files.items()}
    assert tree(project.path("out")) == expected
    failed = [json.loads(line) for line in project.read("state/logs/run_lost.jsonl").decode().splitlines() if "attemptFailed" in line]
    assert len(failed) == 1 and "ended FAILED" in failed[0]["message"] and "without a status file" in failed[0]["message"], failed
    # the retry resumed from the checkpoint: no line was handled twice
    assert sum(int(n) for n in tally.read_text().split()) == 3000
