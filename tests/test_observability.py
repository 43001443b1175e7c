"""Observability: the run log and the JSON event stream, metrics (JSON and Prometheus text), the
console (plain lines off a terminal, live display on one), the VS Code problem matcher against
real `pipe check` output, and the generated CLI references (completions, man page).

See docs/events.md, docs/metrics.md, docs/cli.md and examples/vscode/.
"""

from __future__ import annotations

import json
import math
import os
import re
import select
import shutil
import subprocess
import time
from datetime import datetime

import pytest

from blackbox import REPO, Project, base_env, builtin_stage, pipeline, proc_stage

RFC3339 = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?(Z|[+-]\d\d:\d\d)$")


def read_log(project, run_id: str) -> list[dict]:
    text = project.read(f"state/logs/run_{run_id}.jsonl").decode("utf-8")
    assert text.endswith("\n"), "the log ends with a whole line"
    return [json.loads(line) for line in text.splitlines()]


def without_ts(events: list[dict]) -> list[dict]:
    return [{k: v for k, v in e.items() if k != "ts"} for e in events]


# ------------------------------------------------------------------------------ run log and stream


def test_the_run_log_and_the_json_stream_carry_the_same_events(demo):
    result = demo.ok("build", "--message-format", "json", "--run-id", "r1")
    streamed = [json.loads(line) for line in result.stdout.splitlines()]
    logged = read_log(demo, "r1")
    assert without_ts(logged) == without_ts(streamed)
    # Human messages stay on stderr.
    assert result.stderr.startswith("pipe: run r1: 2 stage(s)\n") and "(run r1)" in result.stderr.splitlines()[-1]
    for event in logged:
        assert RFC3339.match(event["ts"]), event
        assert event["runId"] == "r1", event
        assert isinstance(event["event"], str)
        if event["event"].startswith(("stage", "checkpoint", "attempt")):
            assert event["stage"] in {"copy", "upper"}, event
    names = [e["event"] for e in logged]
    assert names[0] == "runStarted" and names[-1] == "runFinished", names
    stamps = [datetime.fromisoformat(e["ts"].replace("Z", "+00:00")) for e in logged]
    assert stamps == sorted(stamps), "events are logged in order"
    finished = [e["stage"] for e in logged if e["event"] == "stageFinished"]
    assert sorted(finished) == ["copy", "upper"], "exactly one stageFinished per stage"
    planned = {e["stage"]: e for e in logged if e["event"] == "stagePlanned"}
    assert planned["copy"]["decision"] == "run" and planned["copy"]["reasons"] == [{"kind": "firstRun"}]
    assert any(e["event"] == "checkpoint" and e["lineOffset"] > 0 for e in logged)
    metrics = demo.metrics("r1")["stages"]
    for e in (e for e in logged if e["event"] == "stagePublished"):
        marker = demo.marker({"copy": "work", "upper": "output"}[e["stage"]], e["stage"])
        assert (e["fingerprint"], e["files"]) == (marker["fingerprint"], len(marker["outputs"]))
        assert e["bytes"] == metrics[e["stage"]]["outputBytes"] == sum(o["size"] for o in marker["outputs"])
    assert sorted(e["stage"] for e in logged if e["event"] == "stagePublished") == ["copy", "upper"]
    assert logged[-1]["totals"]["ran"] == 2


def test_every_run_gets_its_own_log_and_a_skip_says_why(demo):
    demo.ok("build", "--run-id", "first")
    demo.ok("build", "--run-id", "second")
    second = read_log(demo, "second")
    planned = [e for e in second if e["event"] == "stagePlanned"]
    assert [(e["stage"], e["decision"]) for e in planned] == [("copy", "skip"), ("upper", "skip")]
    assert [e["status"] for e in second if e["event"] == "stageFinished"] == ["skipped", "skipped"]
    assert read_log(demo, "first")[0]["runId"] == "first"


def test_retries_are_logged_with_their_delay(make_project):
    project = make_project(
        pipeline(proc_stage("flaky", ["input"], "out", {"failTimes": 1}), retry={"maxAttempts": 2, "baseDelayMs": 10, "maxDelayMs": 10}),
        files={"input/a.txt": "a\n"},
    )
    project.ok("build", "--run-id", "r")
    events = [e for e in read_log(project, "r") if e.get("stage") == "flaky"]
    kinds = [(e["event"], e.get("attempt")) for e in events if e["event"] in ("stageStarted", "attemptFailed")]
    assert kinds == [("stageStarted", 1), ("attemptFailed", 1), ("stageStarted", 2)]
    failed = next(e for e in events if e["event"] == "attemptFailed")
    assert failed["classification"] == "retryable" and isinstance(failed["retryInMs"], int)
    assert "transient trouble" in failed["message"]


BLOCK_PY = """import os, sys, time
deadline = time.monotonic() + 60
while not os.path.exists("release") and time.monotonic() < deadline:
    time.sleep(0.02)
sys.exit(0 if os.path.exists("release") else 1)
"""


def read_events_until(proc, predicate, timeout=20.0) -> list[dict]:
    """JSON event lines from a background `pipe --message-format json` until one satisfies
    `predicate` (without sleeping as synchronisation: select on the pipe)."""
    fd = proc.stdout.fileno()
    buffer, events = b"", []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 0.1)
        if not ready:
            assert proc.poll() is None, f"pipe exited with {proc.returncode} before the event: {events}"
            continue
        chunk = os.read(fd, 65536)
        assert chunk, f"pipe closed stdout before the event: {events}"
        buffer += chunk
        *lines, buffer = buffer.split(b"\n")
        for line in lines:
            events.append(json.loads(line))
            if predicate(events[-1]):
                return events
    raise AssertionError(f"no such event within {timeout} s: {events}")


def test_a_warning_before_the_run_starts_is_logged_with_the_run_id(make_project, pipe_bin):
    spec = pipeline({"name": "hold", "processor": {"command": ["python3", "block.py"], "version": "1"}, "inputs": ["input"], "outputDir": "out"})
    project = make_project(spec, files={"block.py": BLOCK_PY, "input/a.txt": "a\n"})

    def start(*args):
        return subprocess.Popen([str(pipe_bin), *args], cwd=project.root, env=base_env(), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, start_new_session=True)

    first = start("--message-format", "json", "build", "--run-id", "first")
    second = None
    try:
        read_events_until(first, lambda e: e["event"] == "stageStarted")
        second = start("--message-format", "json", "build", "--run-id", "second", "--wait-lock=30")
        streamed = read_events_until(second, lambda e: e["event"] == "warning")
        assert streamed[0]["runId"] == "second" and "waiting for the workspace lock" in streamed[0]["message"]
        project.write("release", "")
        assert first.wait(timeout=30) == 0 and second.wait(timeout=30) == 0
    finally:
        for proc in (first, second):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()
            if proc is not None:
                proc.stdout.close()
    logged = read_log(project, "second")
    assert [e["event"] for e in logged[:2]] == ["warning", "runStarted"], logged
    assert logged[0]["runId"] == "second" and logged[0]["message"] == streamed[0]["message"]


def test_a_refused_build_writes_no_log(demo):
    demo.ok("build", "--run-id", "r")
    before = demo.read("state/logs/run_r.jsonl")
    result = demo.run("build", "--run-id", "r")
    assert result.returncode == 2
    assert demo.read("state/logs/run_r.jsonl") == before, "a reused id must not touch that run's log"


def test_clean_state_removes_logs_and_metrics(demo):
    demo.ok("build", "--run-id", "r")
    assert demo.exists("state/metrics_r.prom")
    demo.ok("clean", "--state")
    assert not demo.exists("state/logs") and not demo.exists("state/metrics_r.prom") and not demo.exists("state/metrics_r.json")


# ------------------------------------------------------------------------------------------ metrics

SLEEP_PY = "import os, sys, time\ntime.sleep(1.0)\nsys.exit(0)\n"
BURN_PY = "import sys, time\nstart = time.process_time()\nwhile time.process_time() - start < 0.3:\n    pass\nsys.exit(0)\n"


@pytest.fixture(scope="module")
def measured(tmp_path_factory, pipe_bin):
    """One build (shared by the metrics tests) of three parallel stages: one sleeps 1 s, one burns
    0.3 s of CPU, one copies."""
    files = {
        "sleep.py": SLEEP_PY,
        "burn.py": BURN_PY,
        "input/a.txt": "one\ntwo\nthree\n",
        "input/sub/b.txt": "x" * 5000 + "\n",
        "other/c.txt": "c\n",
    }
    spec = pipeline(
        {"name": "sleepy", "processor": {"command": ["python3", "sleep.py"], "version": "1"}, "inputs": ["other"], "outputDir": "s"},
        {"name": "burn", "processor": {"command": ["python3", "burn.py"], "version": "1"}, "inputs": ["other"], "outputDir": "b"},
        builtin_stage("copy", "copy", ["input"], "out"),
        quotas={"cpus": 2},
    )
    project = Project(tmp_path_factory.mktemp("measured"), pipe_bin)
    for rel, data in files.items():
        project.write(rel, data)
    project.write_pipefile(spec)
    project.ok("build", "--run-id", "m")
    return project


def test_metrics_are_real_measurements(measured):
    metrics = measured.metrics("m")
    stages = metrics["stages"]
    assert set(stages) == {"sleepy", "burn", "copy"}
    assert stages["sleepy"]["wallMs"] >= 1000
    assert stages["burn"]["cpuUserMs"] > 0
    assert stages["burn"]["cpuUserMs"] + stages["burn"]["cpuSysMs"] >= 250
    inputs = [measured.path("input/a.txt"), measured.path("input/sub/b.txt")]
    outputs = [measured.path("out/a.txt"), measured.path("out/sub/b.txt")]
    assert stages["copy"]["inputBytes"] == sum(p.stat().st_size for p in inputs)
    assert stages["copy"]["outputBytes"] == sum(p.stat().st_size for p in outputs)
    assert stages["copy"]["lines"] == 4
    for name, s in stages.items():
        assert s["attempts"] == 1, name
        assert s["maxRssKb"] > 0, name
    totals = metrics["totals"]
    assert totals["ran"] == 3 and totals["stages"] == 3
    assert totals["wallMs"] >= stages["sleepy"]["wallMs"]


def parse_prometheus(text: str) -> dict:
    """A strict parser of the text exposition format 0.0.4 for what pipe writes: every family has
    HELP then TYPE before its samples, samples of a family are contiguous, names and label names
    follow the charset, label values use only the allowed escapes, values are floats, no series
    repeats. Returns {family: {"help", "type", "samples": {(name, labels): value}}}."""
    name_re = r"[a-zA-Z_:][a-zA-Z0-9_:]*"
    label_re = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\\n]|\\[\\"n])*)"')
    families: dict[str, dict] = {}
    current = None
    seen_series = set()
    assert text.endswith("\n"), "the file ends with a newline"
    for number, line in enumerate(text.split("\n")[:-1], 1):
        where = f"line {number}: {line!r}"
        assert line, f"empty {where}"
        if line.startswith("#"):
            m = re.fullmatch(rf"# (HELP|TYPE) ({name_re}) (.*)", line)
            assert m, where
            kind, name, rest = m.groups()
            if kind == "HELP":
                assert name not in families, f"family {name} appears twice ({where})"
                assert re.fullmatch(r"(?:[^\\\n]|\\[\\n])*", rest), where
                families[name] = {"help": rest, "type": None, "samples": {}}
                current = name
            else:
                assert current == name and families[name]["type"] is None, f"TYPE without HELP, {where}"
                assert rest in {"counter", "gauge", "histogram", "summary", "untyped"}, where
                families[name]["type"] = rest
            continue
        m = re.fullmatch(rf"({name_re})(?:\{{(.*)\}})? (\S+)", line)
        assert m, where
        name, labels_text, value = m.groups()
        assert name == current and families[name]["type"], f"sample outside its family, {where}"
        labels = []
        if labels_text:
            pos = 0
            while pos < len(labels_text):
                lm = label_re.match(labels_text, pos)
                assert lm, f"bad label at {pos}, {where}"
                labels.append((lm.group(1), lm.group(2)))
                pos = lm.end()
                if pos < len(labels_text):
                    assert labels_text[pos] == ",", where
                    pos += 1
        assert len({k for k, _ in labels}) == len(labels), f"repeated label, {where}"
        parsed = float(value)
        assert not math.isnan(parsed), where
        series = (name, tuple(sorted(labels)))
        assert series not in seen_series, f"repeated series, {where}"
        seen_series.add(series)
        families[name]["samples"][(name, tuple(sorted(labels)))] = parsed
    return families


def test_the_prom_file_parses_and_matches_the_json(measured):
    families = parse_prometheus(measured.read("state/metrics_m.prom").decode("utf-8"))
    metrics = measured.metrics("m")
    for family in families.values():
        assert family["type"] == "gauge" and family["help"] and family["samples"]

    def value(name, **labels):
        key = (name, tuple(sorted({"run_id": "m", **labels}.items())))
        return families[name]["samples"][key]

    assert value("pipe_run_wall_seconds") == pytest.approx(metrics["totals"]["wallMs"] / 1000)
    assert value("pipe_run_stages_by_status", status="ran") == 3
    for stage, s in metrics["stages"].items():
        assert value("pipe_stage_wall_seconds", stage=stage) == pytest.approx(s["wallMs"] / 1000)
        assert value("pipe_stage_cpu_user_seconds", stage=stage) == pytest.approx(s["cpuUserMs"] / 1000)
        assert value("pipe_stage_cpu_system_seconds", stage=stage) == pytest.approx(s["cpuSysMs"] / 1000)
        assert value("pipe_stage_max_rss_bytes", stage=stage) == s["maxRssKb"] * 1024
        assert value("pipe_stage_input_bytes", stage=stage) == s["inputBytes"]
        assert value("pipe_stage_output_bytes", stage=stage) == s["outputBytes"]
        assert value("pipe_stage_lines", stage=stage) == s["lines"]
        assert value("pipe_stage_attempts", stage=stage) == s["attempts"]
    assert value("pipe_stage_wall_seconds", stage="sleepy") >= 1.0


def test_the_strict_parser_rejects_what_the_format_forbids():
    good = '# HELP a_b x\n# TYPE a_b gauge\na_b{run_id="r",stage="s\\"q"} 1.5\n'
    assert parse_prometheus(good)["a_b"]["samples"]
    for bad in [
        'a_b{run_id="r"} 1\n',  # no HELP/TYPE
        '# HELP a-b x\n# TYPE a-b gauge\na-b 1\n',  # bad name
        '# HELP a x\n# TYPE a gauge\na{run_id="r\\t"} 1\n',  # bad escape
        '# HELP a x\n# TYPE a gauge\na{run_id="r"} 1\na{run_id="r"} 2\n',  # repeated series
        '# HELP a x\n# TYPE a gauge\na{run_id="r"} one\n',  # not a number
        '# HELP a x\n# TYPE a gauge\na 1',  # no final newline
    ]:
        with pytest.raises((AssertionError, ValueError)):
            parse_prometheus(bad)


# ------------------------------------------------------------------------------------------ console


def test_off_a_terminal_the_console_is_plain_lines(demo):
    result = demo.ok("build", "--run-id", "r")
    assert "\x1b" not in result.stderr and "\r" not in result.stderr
    lines = result.stderr.splitlines()
    assert lines[0] == "pipe: run r: 2 stage(s)"
    assert re.fullmatch(r"pipe: succeeded: 2 ran, 0 skipped, 0 resumed, 0 failed in \d+ ms \(run r\)", lines[-1]), lines[-1]
    assert result.stdout == ""


SLOW_PY = """import sys, time
sys.path.insert(0, SDK_DIR)
import pipe_sdk
def slow(line):
    time.sleep(0.01)
    return line.upper()
sys.exit(pipe_sdk.run_lines(slow))
"""


def run_on_a_terminal(project, *args, columns=100, rows=30, timeout=30.0, no_color=True):
    """Run `pipe ARGS` with stderr on a pseudo-terminal; returns (exit code, raw bytes written)."""
    master, slave = os.openpty()
    os.set_blocking(master, False)
    env = base_env({"TERM": "xterm"})
    if not no_color:
        env.pop("NO_COLOR")
    import fcntl
    import struct
    import termios

    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", rows, columns, 0, 0))
    proc = subprocess.Popen([str(project.binary), *args], cwd=project.root, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=slave, start_new_session=True)
    os.close(slave)
    out = bytearray()
    deadline = time.monotonic() + timeout
    try:
        while True:
            if time.monotonic() > deadline:
                raise AssertionError(f"pipe on a terminal did not finish within {timeout} s: {bytes(out)!r}")
            ready, _, _ = select.select([master], [], [], 0.1)
            if ready:
                try:
                    chunk = os.read(master, 65536)
                except OSError:  # EIO: every writer of the terminal is gone
                    break
                if not chunk:
                    break
                out += chunk
            elif proc.poll() is not None:
                break  # exited and nothing left to read
        code = proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(master)
    return code, bytes(out)


@pytest.fixture
def slow_project(make_project):
    files = {"slow.py": SLOW_PY.replace("SDK_DIR", repr(str(REPO / "processors" / "python"))), "input/a.txt": "".join(f"line {i}\n" for i in range(80))}
    spec = pipeline(
        {"name": "slow", "processor": {"command": ["python3", "slow.py"], "version": "1"}, "inputs": ["input"], "outputDir": "out"},
        checkpoint={"everyLines": 10},
    )
    return make_project(spec, files=files)


def test_on_a_terminal_a_live_display_shows_progress_then_clears(slow_project):
    import pyte  # pinned in requirements-dev.txt
    code, raw = run_on_a_terminal(slow_project, "build", "--run-id", "r")
    assert code == 0, raw
    text = raw.decode("utf-8", "replace")
    # While it ran: stages done / total, the running stage with lines and bytes from checkpoints.
    assert "0/1 stages done" in text, text
    assert re.search(r"slow\s+\d+s\s+\d+ lines · [\d.]+ (B|KiB) read", text), text
    # At the end the display is gone: the screen holds the event lines and the summary only.
    screen = pyte.Screen(100, 30)
    stream = pyte.ByteStream(screen)
    stream.feed(raw)  # the terminal already turned each "\n" into "\r\n"
    lines = [line.rstrip() for line in screen.display if line.strip()]
    assert lines[0] == "pipe: run r: 1 stage(s)", lines
    assert lines[1] == "slow: run (first run: no marker)", lines
    assert re.fullmatch(r"slow: succeeded in \d+ ms", lines[2]), lines
    assert re.fullmatch(r"audit head: \d+:[0-9a-f]{64}", lines[3]), lines
    assert re.fullmatch(r"pipe: succeeded: 1 ran, 0 skipped, 0 resumed, 0 failed in \d+ ms \(run r\)", lines[4]), lines
    assert len(lines) == 5, lines


@pytest.mark.parametrize("flags, drawn", [([], True), (["-q"], False), (["--message-format", "json"], False)], ids=["default", "-q", "json"])
def test_quiet_and_json_never_draw_the_display(demo, flags, drawn):
    code, raw = run_on_a_terminal(demo, *flags, "build", "--run-id", "r")
    assert code == 0, raw
    assert (b"stages done" in raw) == drawn, raw
    if not drawn:
        assert b"\x1b[" not in raw, raw


RED_ERROR = b"\x1b[1;31merror\x1b[0m"


@pytest.mark.parametrize("flags, coloured", [(["--color", "always"], True), (["--color", "never"], False), ([], False)], ids=["always", "never", "auto"])
def test_colour_off_a_terminal_follows_the_flag(make_project, flags, coloured):
    project = make_project(pipeline(proc_stage("bad", ["input"], "out", {"exit": 1})), files={"input/a.txt": "a\n"})
    result = project.run(*flags, "build")
    assert result.returncode == 1 and "stage `bad` failed" in result.stderr
    assert (RED_ERROR.decode() in result.stderr) == coloured, result.stderr


@pytest.mark.parametrize("no_color, flags, coloured", [(False, [], True), (True, [], False), (False, ["--color", "never"], False)], ids=["auto", "NO_COLOR", "never"])
def test_colour_on_a_terminal_honours_no_color(make_project, no_color, flags, coloured):
    project = make_project(pipeline(proc_stage("bad", ["input"], "out", {"exit": 1})), files={"input/a.txt": "a\n"})
    code, raw = run_on_a_terminal(project, *flags, "build", no_color=no_color)
    assert code == 1 and b"stage `bad` failed" in raw, raw
    assert (RED_ERROR in raw) == coloured, raw


# ------------------------------------------------------------------------------- editor integration


def matcher_regex(task_label: str) -> re.Pattern:
    """The problem matcher's regexp from examples/vscode/tasks.json, compiled with Python's `re`.
    VS Code runs it as a JavaScript RegExp; the pattern uses only syntax both engines read the same
    way (anchors, groups, lazy `+?`, `\\d`), which is checked here, so it compiles unchanged."""
    tasks = json.loads((REPO / "examples" / "vscode" / "tasks.json").read_text())
    task = next(t for t in tasks["tasks"] if t["label"] == task_label)
    pattern = task["problemMatcher"]["pattern"]
    assert (pattern["file"], pattern["line"], pattern["column"], pattern["severity"], pattern["message"]) == (1, 2, 3, 4, 5)
    source = pattern["regexp"]
    assert not re.search(r"\(\?P?<|\(\?[aiLmsux]|\\[AZz]", source), "Python-only syntax in a JS regexp"
    return re.compile(source)


def diagnostics(stderr: str, regex: re.Pattern) -> list[tuple[str, int, int, str, str]]:
    found = []
    for line in stderr.splitlines():  # VS Code matches line by line
        m = regex.search(line)
        if m:
            found.append((m.group(1), int(m.group(2)), int(m.group(3)), m.group(4), m.group(5)))
    return found


def location_of(text: str, needle: str) -> tuple[int, int]:
    """1-based line and column (in characters) of the first `needle` in `text`."""
    offset = text.index(needle)
    line = text.count("\n", 0, offset) + 1
    column = offset - (text.rfind("\n", 0, offset) + 1) + 1
    return line, column


@pytest.mark.parametrize("label", ["pipe: check", "pipe: build"])
def test_the_problem_matcher_turns_pipefile_errors_into_diagnostics(make_project, label):
    regex = matcher_regex(label)
    text = (
        '{"version": 1, "stages": [\n'
        '  {"name": "a", "processor": {"builtin": "copy", "version": "1"}, "inputs": ["missing"], "outputDir": "out"},\n'
        '  {"name": "b", "processor": {"builtin": "copy", "version": "1"}, "inputs": ["input"], "outputDir": "out2", "after": ["nope"]}\n'
        "]}\n"
    )
    project = make_project(text, files={"input/x.txt": "x\n"}, with_proc=False)
    result = project.run("check" if label == "pipe: check" else "build")
    assert result.returncode == 2
    found = diagnostics(result.stderr, regex)
    assert [(f, line, col, sev) for f, line, col, sev, _ in found] == [
        ("Pipefile.json", *location_of(text, '"missing"'), "error"),
        ("Pipefile.json", *location_of(text, '"nope"'), "error"),
    ], result.stderr
    assert found[0][4] == "input `missing` does not exist and no stage produces it"
    assert found[1][4] == "`after` names unknown stage `nope`"
    assert (project.root / found[0][0]).is_file(), "the file is relative to the task's cwd"


def test_the_problem_matcher_reads_unknown_fields(make_project):
    regex = matcher_regex("pipe: check")
    text = '{"version": 1, "stages": [\n  {"name": "a", "processor": {"builtin": "copy", "version": "1"}, "inputs": ["input"], "outputDir": "out", "ouputs": 1}\n]}\n'
    project = make_project(text, files={"input/x.txt": "x\n"}, with_proc=False)
    found = diagnostics(project.run("check").stderr, regex)
    assert [(f, line, col) for f, line, col, _, _ in found] == [("Pipefile.json", *location_of(text, '"ouputs"'))]
    assert found[0][4].startswith("unknown field `ouputs`, expected one of")


def test_the_problem_matcher_reads_invalid_json_and_cycles(make_project):
    regex = matcher_regex("pipe: check")
    broken = make_project('{"version": 1, "stages": [ }', name="broken", with_proc=False)
    found = diagnostics(broken.run("check").stderr, regex)
    assert [(f, line, col, sev) for f, line, col, sev, _ in found] == [("Pipefile.json", 1, 27, "error")]
    cycle = (
        '{"version": 1, "stages": [\n'
        '  {"name": "a", "processor": {"builtin": "copy", "version": "1"}, "inputs": ["input", "out_b"], "outputDir": "out_a"},\n'
        '  {"name": "b", "processor": {"builtin": "copy", "version": "1"}, "inputs": ["out_a"], "outputDir": "out_b"}\n'
        "]}\n"
    )
    project = make_project(cycle, files={"input/x.txt": "x\n"}, name="cycle", with_proc=False)
    found = diagnostics(project.run("check").stderr, regex)
    assert len(found) == 1 and found[0][4].startswith("dependency cycle: a → b → a"), found
    assert found[0][1:3] == location_of(cycle, '"a"')


def test_a_valid_pipefile_and_a_build_failure_give_no_diagnostics(make_project):
    regex = matcher_regex("pipe: build")
    project = make_project(pipeline(proc_stage("bad", ["input"], "out", {"exit": 1})), files={"input/a.txt": "a\n"})
    assert diagnostics(project.ok("check").stderr, regex) == []
    result = project.run("build")
    assert result.returncode == 1 and diagnostics(result.stderr, regex) == []


def test_the_editor_settings_point_at_the_committed_schema():
    settings = json.loads((REPO / "examples" / "vscode" / "settings.json").read_text())
    (mapping,) = settings["json.schemas"]
    assert "Pipefile.json" in mapping["fileMatch"]
    assert (REPO / mapping["url"]).is_file()
    assert json.loads((REPO / "Pipefile.json").read_text())["$schema"] == mapping["url"]


# ------------------------------------------------------------------------------- CLI references


def test_completions_for_each_shell(demo):
    for shell in ["bash", "zsh", "fish", "powershell"]:
        script = demo.ok("completions", shell).stdout
        assert "build" in script and "message-format" in script, shell
    bash = shutil.which("bash")
    if bash:
        script = demo.ok("completions", "bash").stdout
        done = subprocess.run([bash, "-c", script + "\ncomplete -p pipe"], capture_output=True, text=True, timeout=20, env=base_env())
        assert done.returncode == 0 and "pipe" in done.stdout, done.stderr
    assert demo.run("completions", "tcsh").returncode == 2


def test_man_pages(demo):
    page = demo.ok("man").stdout
    assert re.search(r"^\.TH pipe 1", page, re.M), page[:200]
    for section in ["NAME", "SYNOPSIS", "OPTIONS", "SUBCOMMANDS", '"EXIT STATUS"']:
        assert f".SH {section}" in page, section
    build = demo.ok("man", "build").stdout
    assert re.search(r"^\.TH pipe-build 1", build, re.M) and "wait\\-lock" in build
    assert demo.run("man", "nope").returncode == 2
    man = shutil.which("man")
    if man:
        shown = subprocess.run([man, "-l", "-"], input=page, capture_output=True, text=True, timeout=20, env=base_env({"MANWIDTH": "80"}))
        assert shown.returncode == 0 and "EXIT STATUS" in shown.stdout, shown.stderr


def test_version_names_the_fingerprint_schema(demo):
    assert re.fullmatch(r"pipe \d+\.\d+\.\d+ \(fingerprint schema \d+\)\n", demo.ok("--version").stdout)


def test_lines_count_every_input_even_when_checkpoints_arrive_in_bursts(make_project):
    """Many one-line inputs: the built-in reports a final checkpoint per input faster than the
    engine persists them, and the engine coalesces waiting checkpoints. The line count (summed over
    each input's last checkpoint) must still count every input."""
    files = {f"input/f{i:03d}.txt": f"line {i}\n" for i in range(300)}
    files["input/two.txt"] = "a\nb"  # a last line without a newline counts too
    spec = {
        "version": 1,
        "stages": [{"name": "up", "processor": {"builtin": "upper", "version": "1"}, "inputs": ["input"], "outputDir": "out"}],
    }
    project = make_project(spec, files=files)
    project.ok("build", "--run-id", "burst")
    assert project.metrics("burst")["stages"]["up"]["lines"] == 302


def test_a_copy_of_many_small_files_makes_one_sync(make_project, tmp_path):
    """The Rust SDK sends each small input's final checkpoint with the next one the cadence asks
    for: copying 50 small files at the default cadence makes one sync, after which all 50
    checkpoints are reported. `sdk.after-output-fsync:2` would kill the processor at a second
    sync; it never fires. The same failpoint at `:1` does (the count is real)."""
    files = {f"input/d{i:02d}/f.txt": f"line {i}\n" for i in range(50)}
    spec = {
        "version": 1,
        "stages": [{"name": "cp", "processor": {"builtin": "copy", "version": "1"}, "inputs": ["input"], "outputDir": "out"}],
    }
    fired = tmp_path / "fired.txt"
    project = make_project(spec, files=files)
    project.ok("build", "--run-id", "once", env={"PIPE_FAILPOINT": "sdk.after-output-fsync:2", "PIPE_FAILPOINT_FIRED": str(fired)})
    assert not fired.exists(), fired.read_text()
    for i in range(50):
        assert (project.root / f"out/d{i:02d}/f.txt").read_text() == f"line {i}\n"
    assert project.metrics("once")["stages"]["cp"]["lines"] == 50, "every input's checkpoint was still reported"

    other = make_project(spec, files=files, name="other")
    failed = other.run("build", env={"PIPE_FAILPOINT": "sdk.after-output-fsync:1", "PIPE_FAILPOINT_FIRED": str(fired)})
    assert failed.returncode != 0
    assert fired.read_text().splitlines() == ["sdk.after-output-fsync:1"]
