"""Invalid Pipefiles: exit 2, an error located at `Pipefile.json:LINE:COL`, and nothing written.

Why these tests exist: a user with a broken pipeline must be told where the problem is, and a
broken pipeline must never create or change a file (no state/, locks/, cache/, outputs).
"""

from __future__ import annotations

import json
import os
import re

import pytest

from blackbox import line_of, snapshot_diff

FILES = {"input/a.txt": "hello\n", "x.py": "print('x')\n"}


def stage(name, out="out", inputs=None, **extra):
    s = {"name": name, "processor": {"builtin": "copy", "version": "1"}, "inputs": ["input"] if inputs is None else inputs, "outputDir": out}
    s.update(extra)
    return s


def spec_text(*stages, **top) -> str:
    doc = {"version": 1, **top, "stages": list(stages)}
    return json.dumps(doc, indent=2, ensure_ascii=False) + "\n"


# (id, Pipefile text, (needle, nth) locating the offending line, message fragment)
CASES = [
    ("invalid-json", '{\n  "version": 1,\n  "stages": [\n    {"name": "a",}\n  ]\n}\n', ('"a",}', 1), "trailing comma"),
    ("unknown-stage-field", spec_text(stage("a", bogus=1)), ('"bogus"', 1), "unknown field `bogus`"),
    ("unknown-top-field", spec_text(stage("a"), colour="red"), ('"colour"', 1), "unknown field `colour`"),
    ("wrong-type", spec_text(stage("a", inputs="input")), ('"inputs": "input"', 1), "invalid type"),
    ("empty-stage-name", spec_text(stage("")), ('"name": ""', 1), "a stage name must not be empty"),
    ("duplicate-stage-name", spec_text(stage("a"), stage("a", out="out2")), ('"name": "a"', 2), "duplicate stage name `a`"),
    ("slash-in-stage-name", spec_text(stage("a/b")), ('"name": "a/b"', 1), "cannot be used as a file name"),
    ("shared-output-dir", spec_text(stage("a"), stage("b", out="out")), ('"outputDir": "out"', 2), "both own the output folder `out`"),
    ("nested-output-dirs", spec_text(stage("a"), stage("b", out="out/sub")), ('"outputDir": "out/sub"', 1), "overlaps"),
    ("unknown-after", spec_text(stage("a", after=["ghost"])), ('"ghost"', 1), "unknown stage `ghost`"),
    ("missing-input", spec_text(stage("a", inputs=["nowhere"])), ('"nowhere"', 1), "input `nowhere` does not exist and no stage produces it"),
    (
        "missing-program-path",
        spec_text({"name": "a", "processor": {"command": ["bin/nothing.sh"], "version": "1"}, "inputs": ["input"], "outputDir": "out"}),
        ('"bin/nothing.sh"', 1),
        "processor program `bin/nothing.sh` does not exist",
    ),
    (
        "missing-processor-file",
        spec_text({"name": "a", "processor": {"command": ["python3", "x.py"], "version": "1", "files": ["lib/helper.py"]}, "inputs": ["input"], "outputDir": "out"}),
        ('"lib/helper.py"', 1),
        "processor file `lib/helper.py` does not exist",
    ),
    (
        "unknown-builtin",
        spec_text({"name": "a", "processor": {"builtin": "shout", "version": "1"}, "inputs": ["input"], "outputDir": "out"}),
        ('"shout"', 1),
        "unknown built-in processor `shout`",
    ),
    (
        "bad-builtin-param",
        spec_text({"name": "a", "processor": {"builtin": "upper", "version": "1"}, "params": {"mode": "shout"}, "inputs": ["input"], "outputDir": "out"}),
        ('"mode": "shout"', 1),
        "shout",
    ),
    ("cpu-quota-too-large", spec_text(stage("a"), settings={"quotas": {"cpus": (os.cpu_count() or 1) + 1}}), ('"cpus"', 1), "CPU quota"),
    ("max-attempts-zero", spec_text(stage("a", retry={"maxAttempts": 0})), ('"maxAttempts": 0', 1), "`maxAttempts` must be at least 1"),
    ("settings-max-attempts-zero", spec_text(stage("a"), settings={"retry": {"maxAttempts": 0}}), ('"maxAttempts": 0', 1), "`maxAttempts` must be at least 1"),
    ("stage-reads-its-own-output", spec_text(stage("a", inputs=["out"])), ('"name": "a"', 1), "reads its own output folder"),
    ("output-in-reserved-folder", spec_text(stage("a", out="state")), ('"outputDir": "state"', 1), "state/"),
    ("no-stages", spec_text(), ('"stages"', 1), "no stages"),
    ("input-leaves-project", spec_text(stage("a", inputs=["../x"])), ('"../x"', 1), "leaves the project"),
    ("empty-inputs", spec_text(stage("a", inputs=[])), ('"inputs": []', 1), "has no inputs"),
    ("output-is-project-root", spec_text(stage("a", out=".")), ('"outputDir": "."', 1), "project folder itself"),
    ("unsupported-version", spec_text(stage("a")).replace('"version": 1', '"version": 2', 1), ('"version": 2', 1), "unsupported Pipefile version 2"),
    (
        "builtin-and-command",
        spec_text({"name": "a", "processor": {"builtin": "copy", "command": ["x"], "version": "1"}, "inputs": ["input"], "outputDir": "out"}),
        ('"processor": {', 1),
        "not both",
    ),
    ("stage-needs-more-cpus-than-quota", spec_text(stage("a", resources={"cpus": 2}), settings={"quotas": {"cpus": 1}}), ('"cpus": 2', 1), "could never run"),
    ("param-for-copy", spec_text(stage("a", params={"mode": "ascii"})), ('"mode"', 1), "no param `mode`"),
    ("unknown-executor", spec_text(stage("a"), settings={"executor": "kubernetes"}), ('"kubernetes"', 1), "unknown variant `kubernetes`"),
    ("unknown-slurm-field", spec_text(stage("a"), settings={"slurm": {"partitions": "x"}}), ('"partitions"', 1), "unknown field `partitions`"),
    ("slurm-extra-arg-not-an-option", spec_text(stage("a"), settings={"slurm": {"extraArgs": ["--qos=a", "qos"]}}), ('"qos"', 1), "`qos` is not an sbatch option"),
    ("slurm-no-jobs-in-flight", spec_text(stage("a"), settings={"slurm": {"maxJobsInFlight": 0}}), ('"maxJobsInFlight": 0', 1), "`maxJobsInFlight` 0 would never submit a job"),
    ("slurm-poll-too-fast", spec_text(stage("a"), settings={"slurm": {"pollIntervalMs": 10}}), ('"pollIntervalMs": 10', 1), "poll interval 10 ms is too short"),
]


@pytest.mark.parametrize("command", [["build"], ["check"], ["build", "--dry-run"]], ids=" ".join)
@pytest.mark.parametrize("text,locate,message", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_invalid_pipefile_is_located_and_writes_nothing(make_project, text, locate, message, command):
    project = make_project(text, files=FILES)
    before = project.snapshot()
    result = project.run(*command)
    assert result.returncode == 2, str(result)
    line = line_of(text, *locate)
    assert re.search(rf"(^|\s)Pipefile\.json:{line}:\d+: error: .*{re.escape(message)}", result.stderr), str(result)
    after = project.snapshot()
    assert after == before, snapshot_diff(before, after)


def test_a_cycle_is_reported_with_its_whole_path(make_project):
    text = spec_text(
        stage("first", out="o0"),
        stage("b", inputs=["od"], out="ob"),
        stage("c", inputs=["ob"], out="oc"),
        stage("d", inputs=["oc"], out="od"),
    )
    project = make_project(text, files=FILES)
    before = project.snapshot()
    result = project.run("build")
    assert result.returncode == 2, str(result)
    found = re.search(r"Pipefile\.json:(\d+):\d+: error: dependency cycle: (\w+) → (\w+) → (\w+) → (\w+)", result.stderr)
    assert found, str(result)
    path = list(found.groups()[1:])
    assert path[0] == path[-1] and " ".join(path) in {"b c d b", "c d b c", "d b c d"}, path
    assert int(found.group(1)) == line_of(text, f'"name": "{path[0]}"'), str(result)
    assert project.snapshot() == before


def test_every_error_is_reported_not_only_the_first(make_project):
    text = spec_text(stage("a", after=["ghost"]), stage("a", out="out2"))
    project = make_project(text, files=FILES)
    result = project.run("check")
    assert result.returncode == 2, str(result)
    ghost, duplicate = line_of(text, '"ghost"'), line_of(text, '"name": "a"', 2)
    assert f"Pipefile.json:{ghost}:" in result.stderr
    assert f"Pipefile.json:{duplicate}:" in result.stderr


def test_a_bare_program_argument_is_not_checked_but_fails_at_run_time(make_project):
    # `missing.py` has no slash: pipe cannot know it names a file, so validation accepts it and
    # the processor's own failure is reported instead.
    text = spec_text({"name": "a", "processor": {"command": ["python3", "missing.py"], "version": "1"}, "inputs": ["input"], "outputDir": "out"})
    project = make_project(text, files=FILES)
    assert project.run("check").returncode == 0
    result = project.run("build", "--run-id", "r")
    assert result.returncode == 1, str(result)
    assert "missing.py" in project.stage_record("a")["error"]


def test_an_absolute_program_path_that_exists_is_accepted(make_project):
    text = spec_text({"name": "a", "processor": {"command": ["/usr/bin/env", "python3", "proc.py"], "version": "1"}, "inputs": ["input"], "outputDir": "out", "sandbox": {"writablePaths": ["."]}})
    project = make_project(text, files=FILES)
    project.ok("check")
    project.ok("build")
    assert project.read("out/a.txt") == b"hello\n"


# ------------------------------------------------------------------------------- pipeline file


def test_pipeline_flag_long_and_short(make_project):
    text = spec_text(stage("a"))
    project = make_project(None, files={**FILES, "other.json": text})
    for flag in ["--pipeline", "-f"]:
        result = project.run("build", "--dry-run", flag, "other.json")
        assert result.returncode == 0, str(result)
        assert result.stdout.startswith("a: run (first run")
    broken = '{"version": 1, "stages": [}\n'
    project.write("broken.json", broken)
    for flag in ["--pipeline", "-f"]:
        result = project.run("check", flag, "broken.json")
        assert result.returncode == 2, str(result)
        assert "broken.json:1:" in result.stderr


@pytest.mark.parametrize("flags", [["-f", "other.json"], ["--pipeline", "other.json"], ["-q"], ["--message-format", "json"]], ids=" ".join)
def test_global_flags_before_the_subcommand(make_project, flags):
    project = make_project(spec_text(stage("a")), files={**FILES, "other.json": spec_text(stage("a"))})
    result = project.run(*flags, "build", "--dry-run")
    assert result.returncode == 0, str(result)
    assert "a" in result.stdout


def test_a_missing_pipefile_is_a_clear_error(make_project):
    project = make_project(None, files=FILES)
    before = project.snapshot()
    for args in [["build"], ["-f", "nope.json", "build"], ["status"], ["clean"]]:
        result = project.run(*args)
        assert result.returncode == 2, str(result)
        name = "nope.json" if "nope.json" in args else "Pipefile.json"
        assert f"cannot read the Pipefile `{name}`" in result.stderr, str(result)
    assert project.snapshot() == before
