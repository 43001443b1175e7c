"""Resume after a crash (basic): a stage killed mid-way continues from its last durable checkpoint.

Why these tests exist: the contract's headline promise is that a job that dies at 95% does not
start over, and that the resumed output is byte-identical to an uninterrupted run. The processor
kills itself with SIGKILL after N lines (PIPE_FAULT, honoured by both SDKs; the engine passes its
environment through), which is as abrupt as a power cut for that process.
"""

from __future__ import annotations

import json
import os
import shutil
import signal

import pytest

from blackbox import PY_PROCESSORS, SLOW_UPPER, Project, pipeline, wait_for, wait_for_file

FILES_COUNT = 3
LINES_PER_FILE = 1000
CRASH_AFTER = 1500  # in the middle of the second input


def sample_inputs() -> dict[str, str]:
    files = {}
    for f in range(FILES_COUNT):
        lines = [f"{f}:{i:05d} straße café ﬁne ωmega naïve {'x' * (i % 37)}\n" for i in range(LINES_PER_FILE)]
        files[f"input/part{f}.txt"] = "".join(lines)
    return files


def builtin_upper() -> dict:
    return {"builtin": "upper", "version": "1"}


def python_upper() -> dict:
    return {"command": ["python3", "py/stage_upper.py"], "version": "1", "files": ["py/pipe_sdk.py"]}


PROCESSORS = {"builtin": builtin_upper, "python": python_upper}


def resumable_project(make_project, processor: str, name: str = "proj") -> Project:
    spec = pipeline(
        {
            "name": "up",
            "processor": PROCESSORS[processor](),
            "inputs": ["input"],
            "outputDir": "out",
            "checkpoint": {"everyLines": 100},
        }
    )
    project = make_project(spec, files=sample_inputs(), name=name, with_proc=False)
    if processor == "python":
        shutil.copytree(PY_PROCESSORS, project.path("py"), ignore=shutil.ignore_patterns("__pycache__"))
    return project


def output_tree(project: Project) -> dict[str, bytes]:
    root = project.path("out")
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file() and not p.name.startswith(".")}


def reference_outputs(make_project, processor: str) -> dict[str, bytes]:
    reference = resumable_project(make_project, processor, name=f"reference-{processor}")
    reference.ok("build")
    tree = output_tree(reference)
    assert tree == {rel.removeprefix("input/"): text.upper().encode() for rel, text in sample_inputs().items()}
    return tree


def crash(project: Project) -> dict:
    """Build with PIPE_FAULT; return the progress file the crash left."""
    result = project.run("build", "--run-id", "crashed", env={"PIPE_FAULT": f"crash-after-lines:{CRASH_AFTER}"})
    assert result.returncode == 1, str(result)
    record = project.stage_record("up")
    assert record["status"] == "failed"
    [attempt] = record["attempts"]
    assert attempt["classification"] == "signal" and attempt["signal"] == 9, attempt
    assert not project.exists("out/.up.done")
    progress = project.json("state/progress_up.json")
    assert progress["stage"] == "up" and progress["fingerprint"] == record["fingerprint"]
    assert progress["inputIndex"] == 1, progress
    assert 0 < progress["lineOffset"] <= CRASH_AFTER - LINES_PER_FILE, progress
    assert progress["byteOffset"] > 0 and progress["outputBytes"] > 0, progress
    return progress


@pytest.mark.parametrize("processor", ["builtin", "python"])
def test_a_crashed_stage_resumes_and_matches_a_clean_build(make_project, processor):
    expected = reference_outputs(make_project, processor)
    project = resumable_project(make_project, processor)
    progress = crash(project)
    line = progress["lineOffset"]

    dry = project.ok("build", "--dry-run").stdout
    assert f"up: resume from line {line}" in dry, dry
    assert f"resume from line {line}" in project.ok("status").stdout

    result = project.run("build", "--run-id", "resumed")
    assert result.returncode == 0, str(result)
    assert project.statuses("resumed") == {"up": "resumed"}
    record = project.stage_record("up")
    assert record["status"] == "resumed" and record["resumedFromLine"] == line, record
    assert project.metrics("resumed")["totals"]["resumed"] == 1
    assert not project.exists("state/progress_up.json")
    assert not project.exists("out/.pipe-staging")
    assert output_tree(project) == expected

    project.ok("build", "--run-id", "after")
    assert project.statuses("after") == {"up": "skipped"}


@pytest.mark.parametrize("processor", ["builtin", "python"])
def test_resume_does_not_redo_finished_work(make_project, processor):
    """Proof that the second attempt starts at the checkpoint: it is allowed fewer lines than a
    restart from zero would need, and still completes."""
    expected = reference_outputs(make_project, processor)
    project = resumable_project(make_project, processor)
    progress = crash(project)
    remaining = FILES_COUNT * LINES_PER_FILE - (progress["inputIndex"] * LINES_PER_FILE + progress["lineOffset"])
    budget = remaining + 50
    assert budget < FILES_COUNT * LINES_PER_FILE
    result = project.run("build", "--run-id", "resumed", env={"PIPE_FAULT": f"crash-after-lines:{budget}"})
    assert result.returncode == 0, str(result)
    assert project.statuses("resumed") == {"up": "resumed"}
    assert output_tree(project) == expected


def test_changed_inputs_after_a_crash_restart_from_zero(make_project):
    project = resumable_project(make_project, "builtin")
    crash(project)
    project.write("input/part0.txt", "changed\n")
    dry = project.ok("build", "--dry-run").stdout
    assert "up: run (" in dry and "resume" not in dry, dry
    project.ok("build", "--run-id", "fresh")
    assert project.statuses("fresh") == {"up": "succeeded"}
    assert project.stage_record("up")["resumedFromLine"] is None
    assert project.read("out/part0.txt") == b"CHANGED\n"
    assert project.read("out/part1.txt") == sample_inputs()["input/part1.txt"].upper().encode()


def test_clean_after_a_crash_forgets_the_progress(make_project):
    project = resumable_project(make_project, "builtin")
    crash(project)
    assert project.exists("out/.pipe-staging")
    project.ok("clean")
    assert not project.exists("state/progress_up.json") and not project.exists("out/.pipe-staging")
    assert "resume" not in project.ok("build", "--dry-run").stdout
    project.ok("build", "--run-id", "fresh")
    assert project.statuses("fresh") == {"up": "succeeded"}




@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGKILL], ids=["SIGINT", "SIGTERM", "SIGKILL"])
def test_a_build_stopped_mid_stage_resumes_from_its_checkpoint(make_project, sig):
    files = sample_inputs()
    lines = files["input/part1.txt"].splitlines(keepends=True)
    lines[500] = "BLOCK\n"  # the second input blocks at its line 500
    files["input/part1.txt"] = "".join(lines)
    spec = pipeline(
        {
            "name": "up",
            "processor": {"command": ["python3", "py/slow_upper.py"], "version": "1", "files": ["py/pipe_sdk.py"]},
            "inputs": ["input"],
            "outputDir": "out",
            "checkpoint": {"everyLines": 100},
            "sandbox": {"writablePaths": ["."]},  # the started/release handshake files
        }
    )
    project = make_project(spec, files=files, with_proc=False)
    shutil.copytree(PY_PROCESSORS, project.path("py"), ignore=shutil.ignore_patterns("__pycache__"))
    project.write("py/slow_upper.py", SLOW_UPPER)

    build = project.start("build", "--run-id", "stopped")
    wait_for_file(project.path("started"), proc=build)
    # the checkpoint at line 500 of input 1 was sent before the processor blocked; wait until persisted
    progress_file = project.path("state/progress_up.json")
    wait_for(lambda: progress_file.exists() and json.loads(progress_file.read_text())["lineOffset"] == 500, "the checkpoint before BLOCK")
    os.kill(build.pid, sig)
    result = project.finish(build, timeout=30)
    if sig == signal.SIGKILL:
        assert result.returncode == -signal.SIGKILL
    else:
        assert result.returncode == 130, str(result)
        assert project.run_record("stopped")["status"] == "interrupted"

    progress = project.json("state/progress_up.json")
    assert (progress["inputIndex"], progress["lineOffset"]) == (1, 500), progress
    assert not project.exists("out/.up.done")
    assert "up: resume from line 500" in project.ok("build", "--dry-run").stdout

    project.write("release", "")
    project.ok("build", "--run-id", "resumed", timeout=30)
    assert project.statuses("resumed") == {"up": "resumed"}
    assert project.stage_record("up")["resumedFromLine"] == 500
    assert output_tree(project) == {rel.removeprefix("input/"): text.upper().encode() for rel, text in files.items()}
    assert not project.exists("state/progress_up.json")


def test_an_unreadable_progress_file_restarts_from_zero(make_project):
    project = resumable_project(make_project, "builtin")
    crash(project)
    project.write("state/progress_up.json", "{torn")
    dry = project.run("build", "--dry-run")
    assert dry.returncode == 0, str(dry)
    assert "up: run (" in dry.stdout
    result = project.ok("build", "--run-id", "fresh")
    assert "progress" in result.stderr  # a warning says why it restarts
    assert project.statuses("fresh") == {"up": "succeeded"}
    assert output_tree(project) == {rel.removeprefix("input/"): text.upper().encode() for rel, text in sample_inputs().items()}


FLAKY_UPPER = '''
"""upper-cases lines; attempt 1 fails with exit 75 on the line FAIL. Records PIPELINE_RESUME per attempt."""
import os, sys
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import pipe_sdk

attempt = os.environ["PIPELINE_ATTEMPT"]
with open(f"resume-{attempt}.json", "w") as f:
    f.write(os.environ.get("PIPELINE_RESUME", "none"))

def upper(line: bytes) -> bytes:
    if line == b"FAIL\\n" and attempt == "1":
        raise pipe_sdk.TransientError("flaky disk")
    return line.decode("utf-8").upper().encode("utf-8")

sys.exit(pipe_sdk.run_lines(upper))
'''


def test_a_retry_continues_from_the_last_checkpoint(make_project):
    files = sample_inputs()
    lines = files["input/part1.txt"].splitlines(keepends=True)
    lines[300] = "FAIL\n"
    files["input/part1.txt"] = "".join(lines)
    spec = pipeline(
        {
            "name": "up",
            "processor": {"command": ["python3", "py/flaky_upper.py"], "version": "1", "files": ["py/pipe_sdk.py"]},
            "inputs": ["input"],
            "outputDir": "out",
            "checkpoint": {"everyLines": 100},
            "sandbox": {"writablePaths": ["."]},  # the resume-N.json records
            "retry": {"maxAttempts": 2, "baseDelayMs": 1},
        }
    )
    project = make_project(spec, files=files, with_proc=False)
    shutil.copytree(PY_PROCESSORS, project.path("py"), ignore=shutil.ignore_patterns("__pycache__"))
    project.write("py/flaky_upper.py", FLAKY_UPPER)

    project.ok("build", "--run-id", "r")
    record = project.stage_record("up")
    assert [(a["exitCode"], a["classification"]) for a in record["attempts"]] == [(75, "retryable"), (0, "ok")]
    assert project.read("resume-1.json") == b"none"
    resume = json.loads(project.read("resume-2.json"))
    assert (resume["inputIndex"], resume["lineOffset"]) == (1, 300), resume
    assert output_tree(project) == {rel.removeprefix("input/"): text.upper().encode() for rel, text in files.items()}
    assert not project.exists("state/progress_up.json")


RAW_FLAKY = '''
"""No SDK: attempt 1 writes the output of input 0, fsyncs it, reports the checkpoint at the end of
input 0, leaves a partial output of input 1 (as a crash would) and exits 75 at once; attempt 2
resumes from PIPELINE_RESUME."""
import json, os, sys
attempt = os.environ["PIPELINE_ATTEMPT"]
resume = os.environ.get("PIPELINE_RESUME")
with open(f"resume-{attempt}.json", "w") as f:
    f.write(resume or "none")
inputs = json.loads(os.environ["PIPELINE_INPUTS"])
out_dir = os.environ["PIPELINE_OUTPUT_DIR"]

def output(i):
    return os.path.join(out_dir, os.path.basename(inputs[i]))

def convert(i, start=0):
    data = open(inputs[i], "rb").read()
    with open(output(i), "r+b" if start else "wb") as f:
        f.truncate(start)
        f.seek(start)
        f.write(data[start:].upper())
        f.flush()
        os.fsync(f.fileno())
    d = os.open(out_dir, os.O_RDONLY)
    os.fsync(d)
    os.close(d)
    return data

if resume is None:
    data = convert(0)
    checkpoint = {"inputIndex": 0, "lineOffset": data.count(b"\\n"), "byteOffset": len(data), "outputBytes": len(data)}
    os.write(int(os.environ["PIPELINE_PROGRESS_FD"]), json.dumps(checkpoint).encode() + b"\\n")
    with open(output(1), "wb") as f:
        f.write(b"PARTIAL, NOT COVERED BY A CHECKPOINT")
    sys.exit(75)
cp = json.loads(resume)
convert(cp["inputIndex"], cp["outputBytes"])
for i in range(cp["inputIndex"] + 1, len(inputs)):
    convert(i)
sys.exit(0)
'''


def test_a_checkpoint_held_at_the_end_of_an_input_is_where_a_failed_attempts_retry_resumes(make_project):
    """The engine holds a checkpoint at the end of an input instead of persisting it at once (the
    next one, or the attempt's success, usually makes it void); an attempt that fails right after
    reporting one must still leave it for the retry."""
    spec = pipeline(
        {
            "name": "up",
            "processor": {"command": ["python3", "raw_flaky.py"], "version": "1"},
            "inputs": ["input"],
            "outputDir": "out",
            "sandbox": {"writablePaths": ["."]},  # the resume-N.json records
            "retry": {"maxAttempts": 2, "baseDelayMs": 1},
        }
    )
    files = {"input/a.txt": "one\ntwo\n", "input/b.txt": "three\n", "raw_flaky.py": RAW_FLAKY}
    project = make_project(spec, files=files, with_proc=False)
    project.ok("build", "--run-id", "r")
    record = project.stage_record("up")
    assert [(a["exitCode"], a["classification"]) for a in record["attempts"]] == [(75, "retryable"), (0, "ok")]
    assert project.read("resume-1.json") == b"none"
    assert json.loads(project.read("resume-2.json")) == {"inputIndex": 0, "lineOffset": 2, "byteOffset": 8, "outputBytes": 8}
    assert (project.read("out/a.txt"), project.read("out/b.txt")) == (b"ONE\nTWO\n", b"THREE\n")
    assert not project.exists("state/progress_up.json")
    events = [json.loads(line) for line in project.read("state/logs/run_r.jsonl").decode().splitlines()]
    assert [(e["inputIndex"], e["lineOffset"]) for e in events if e["event"] == "checkpoint"] == [(0, 2)]
