"""Tests of the stdlib-only Python processor SDK (processors/python) against docs/protocol.md.

Why these tests exist: external processors written with pipe_sdk must keep the exactly-once resume
promise of the protocol on their own, without the engine. So the SDK and the reference processors
(stage_copy.py, stage_upper.py) are exercised directly, no `pipe` binary involved: in-process for
exact assertions and coverage, and as subprocesses with a real progress pipe and real SIGKILLs.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

sys.dont_write_bytecode = True  # keep __pycache__ out of processors/python
PY_DIR = Path(__file__).resolve().parent.parent / "processors" / "python"
sys.path.insert(0, str(PY_DIR))

import pipe_sdk  # noqa: E402
import stage_copy  # noqa: E402
import stage_upper  # noqa: E402

COPY = PY_DIR / "stage_copy.py"
UPPER = PY_DIR / "stage_upper.py"
CHECKPOINT_KEYS = {"inputIndex", "lineOffset", "byteOffset", "outputBytes"}
STAGE = "teststage"


def same(data: bytes) -> bytes:
    return data


def upper_unicode(data: bytes) -> bytes:
    return data.decode("utf-8").upper().encode("utf-8")


EXPECT = {"copy": same, "unicode": upper_unicode, "ascii": bytes.upper}


# ----------------------------------------------------------------------------------------- helpers


class ProgressPipe:
    """A real os.pipe() for PIPELINE_PROGRESS_FD, drained by a thread so the writer never blocks."""

    def __init__(self) -> None:
        self.read_fd, self.write_fd = os.pipe()
        self.data: list[bytes] = []
        self.closed = False
        self.thread = threading.Thread(target=self._drain, daemon=True)
        self.thread.start()

    def _drain(self) -> None:
        while chunk := os.read(self.read_fd, 65536):
            self.data.append(chunk)
        os.close(self.read_fd)

    def close(self) -> list[dict[str, int]]:
        """Close our write end, wait for every writer to finish, and parse what arrived."""
        if not self.closed:
            self.closed = True
            os.close(self.write_fd)
            self.thread.join()
        return parse_checkpoints(b"".join(self.data))


@pytest.fixture
def progress():
    pipes: list[ProgressPipe] = []

    def make() -> ProgressPipe:
        pipes.append(ProgressPipe())
        return pipes[-1]

    yield make
    for pipe in pipes:
        pipe.close()


def parse_checkpoints(raw: bytes) -> list[dict[str, int]]:
    """Every line must be one complete JSON checkpoint with exactly the protocol's four fields."""
    assert raw == b"" or raw.endswith(b"\n"), raw
    checkpoints = []
    for line in raw.split(b"\n")[:-1]:
        checkpoint = json.loads(line)
        assert set(checkpoint) == CHECKPOINT_KEYS, line
        assert all(type(value) is int and value >= 0 for value in checkpoint.values()), line
        checkpoints.append(checkpoint)
    return checkpoints


def write_tree(root: Path, files: dict[str, bytes]) -> list[str]:
    """Create `files` under root; return their absolute paths, sorted like the engine sends them."""
    for name, data in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return sorted(str(root / name) for name in files)


def make_env(root: Path, out: Path, inputs: list[str], **extra: str) -> dict[str, str]:
    env = {
        "PIPELINE_RUN_ID": "run-1",
        "PIPELINE_STAGE": STAGE,
        "PIPELINE_ATTEMPT": "1",
        "PIPELINE_INPUTS": json.dumps(inputs),
        "PIPELINE_INPUT_ROOT": str(root),
        "PIPELINE_OUTPUT_DIR": str(out),
        "PIPELINE_PARAMS": "{}",
    }
    env.update(extra)
    return env


def run_script(script: Path, env: dict[str, str], pipe: ProgressPipe) -> tuple[int, str, list[dict[str, int]]]:
    """Run a processor script as a child with `pipe` as its progress fd."""
    child_env = {"PATH": os.environ.get("PATH", ""), "PYTHONDONTWRITEBYTECODE": "1", **env}
    child_env["PIPELINE_PROGRESS_FD"] = str(pipe.write_fd)
    proc = subprocess.Popen(
        [sys.executable, str(script)],
        env=child_env,
        pass_fds=(pipe.write_fd,),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    _, stderr = proc.communicate(timeout=60)
    return proc.returncode, stderr.decode(), pipe.close()


def count_lines(data: bytes) -> int:
    return data.count(b"\n") + (1 if data and not data.endswith(b"\n") else 0)


def assert_consistent(checkpoints: list[dict[str, int]], inputs: list[str], expect: Callable[[bytes], bytes]) -> None:
    """Each checkpoint describes a real line boundary of its input and the exact output length up
    to it, and checkpoints only move forward."""
    previous = (-1, -1, -1, -1)
    for checkpoint in checkpoints:
        data = Path(inputs[checkpoint["inputIndex"]]).read_bytes()
        prefix = data[: checkpoint["byteOffset"]]
        assert checkpoint["byteOffset"] <= len(data)
        assert prefix in (data, b"") or prefix.endswith(b"\n"), checkpoint
        assert checkpoint["lineOffset"] == count_lines(prefix), checkpoint
        assert checkpoint["outputBytes"] == len(expect(prefix)), checkpoint
        current = tuple(checkpoint[key] for key in ("inputIndex", "byteOffset", "lineOffset", "outputBytes"))
        assert current >= previous, (previous, current)
        if current[0] == previous[0]:
            assert all(now >= before for now, before in zip(current[1:], previous[1:], strict=True)), (
                previous,
                current,
            )
        previous = current


def assert_finals(checkpoints: list[dict[str, int]], inputs: list[str]) -> None:
    """Every input got a final checkpoint (byteOffset = input size), in input order."""
    finals = [cp["inputIndex"] for cp in checkpoints if cp["byteOffset"] == os.path.getsize(inputs[cp["inputIndex"]])]
    assert sorted(set(finals)) == list(range(len(inputs)))
    assert checkpoints[-1]["inputIndex"] == len(inputs) - 1


def read_outputs(out: Path, root: Path, inputs: list[str]) -> dict[str, bytes]:
    return {rel: (out / rel).read_bytes() for rel in (os.path.relpath(path, root) for path in inputs)}


def expected_outputs(root: Path, inputs: list[str], expect: Callable[[bytes], bytes]) -> dict[str, bytes]:
    return {os.path.relpath(path, root): expect(Path(path).read_bytes()) for path in inputs}


def sample_lines(seed: int, count: int, last_newline: bool = True) -> bytes:
    """Deterministic UTF-8 text with varied line lengths (including empty and long lines)."""
    rng = random.Random(seed)
    words = ["straße", "é", "ﬁx", "hello", "Ωmega", "a", "", "ßß", "x" * 40]
    lines = [" ".join(rng.choice(words) for _ in range(rng.randrange(0, 6))) for _ in range(count)]
    lines[-1] += "end"  # a non-empty last line, so `count` lines exist with or without the last newline
    text = "\n".join(lines) + ("\n" if last_newline else "")
    return text.encode("utf-8")


class Killed(BaseException):
    """Raised by the fake os.kill of in-process fault tests (BaseException: the SDK must not catch it)."""


# ------------------------------------------------------------------------------------ processors


def test_copy_mirrors_nested_paths_byte_for_byte(tmp_path, progress):
    root, out = tmp_path / "in", tmp_path / "out"
    inputs = write_tree(
        root,
        {
            "a/b/c.txt": b"one\ntwo\r\nthree",
            "top.bin": bytes(range(256)) * 5,
            "empty.txt": b"",
            "a/d.txt": b"\n\n\n",
        },
    )
    pipe = progress()
    assert stage_copy.main(make_env(root, out, inputs, PIPELINE_PROGRESS_FD=str(pipe.write_fd))) == 0
    assert read_outputs(out, root, inputs) == expected_outputs(root, inputs, same)
    checkpoints = pipe.close()
    assert_consistent(checkpoints, inputs, same)
    assert_finals(checkpoints, inputs)
    empty = inputs.index(str(root / "empty.txt"))
    assert {"inputIndex": empty, "lineOffset": 0, "byteOffset": 0, "outputBytes": 0} in checkpoints


def test_upper_unicode_full_case_mapping(tmp_path):
    root, out = tmp_path / "in", tmp_path / "out"
    text = "straße\nhello é ﬁ ǆ\nΩmega ß\nno newline at end"
    inputs = write_tree(root, {"x/t.txt": text.encode()})
    assert stage_upper.main(make_env(root, out, inputs)) == 0
    result = (out / "x/t.txt").read_bytes().decode()
    assert result == text.upper()
    assert result.startswith("STRASSE\nHELLO É FI Ǆ\nΩMEGA SS\n")


def test_upper_ascii_touches_only_ascii_letters(tmp_path):
    root, out = tmp_path / "in", tmp_path / "out"
    data = "straße é Ωmega\n".encode() + b"raw \xff\xfe bytes\n"
    inputs = write_tree(root, {"t.txt": data})
    assert stage_upper.main(make_env(root, out, inputs, PIPELINE_PARAMS='{"mode": "ascii"}')) == 0
    assert (out / "t.txt").read_bytes() == "STRAßE é ΩMEGA\n".encode() + b"RAW \xff\xfe BYTES\n"


@pytest.mark.parametrize(
    ("data", "offset", "line"),
    [
        (b"ok\nab\xffcd\n", 5, 2),
        (b"\xc3(\n", 0, 1),
        (b"fine\nline\ncut \xe2\x82", 14, 3),
        (b"x\n\xed\xa0\x80 surrogate\n", 2, 2),
    ],
)
def test_upper_invalid_utf8_names_file_and_offset(tmp_path, capsys, data, offset, line):
    root, out = tmp_path / "in", tmp_path / "out"
    inputs = write_tree(root, {"good.txt": b"fine\n", "sub/bad.txt": data})
    assert stage_upper.main(make_env(root, out, inputs)) == 65
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith(f"{STAGE}: invalid UTF-8 in {root / 'sub/bad.txt'} at byte offset {offset} (line {line})")


def test_upper_invalid_utf8_offset_is_absolute_after_resume(tmp_path, capsys):
    root, out = tmp_path / "in", tmp_path / "out"
    inputs = write_tree(root, {"t.txt": b"abc\ndef\ngh\xffi\n"})
    (out).mkdir()
    (out / "t.txt").write_bytes(b"ABC\nDEF\n")
    resume = '{"inputIndex":0,"lineOffset":2,"byteOffset":8,"outputBytes":8}'
    assert stage_upper.main(make_env(root, out, inputs, PIPELINE_RESUME=resume)) == 65
    assert "at byte offset 10 (line 3)" in capsys.readouterr().err


def test_upper_invalid_utf8_as_subprocess(tmp_path, progress):
    root, out = tmp_path / "in", tmp_path / "out"
    inputs = write_tree(root, {"bad.txt": "straße\n".encode() + b"\x80\n"})
    code, err, checkpoints = run_script(UPPER, make_env(root, out, inputs), progress())
    assert code == 65
    assert f"{root / 'bad.txt'} at byte offset 8" in err
    assert checkpoints == []


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ('{"mode": "shout"}', "unknown mode 'shout'"),
        ('{"mode": 3}', "unknown mode 3"),
        ('{"mode": ["ascii"]}', "unknown mode ['ascii']"),
        ('{"mode": "ascii", "locale": "tr"}', "unknown param 'locale'"),
    ],
)
def test_upper_rejects_bad_params_with_64(tmp_path, capsys, params, message):
    root, out = tmp_path / "in", tmp_path / "out"
    inputs = write_tree(root, {"t.txt": b"x\n"})
    assert stage_upper.main(make_env(root, out, inputs, PIPELINE_PARAMS=params)) == 64
    assert capsys.readouterr().err.startswith(f"{STAGE}: {message}")
    assert not out.exists()


def test_upper_unknown_mode_as_subprocess(tmp_path, progress):
    root, out = tmp_path / "in", tmp_path / "out"
    inputs = write_tree(root, {"t.txt": b"x\n"})
    code, err, _ = run_script(UPPER, make_env(root, out, inputs, PIPELINE_PARAMS='{"mode": "title"}'), progress())
    assert code == 64
    assert "unknown mode 'title'" in err


def test_copy_rejects_params(tmp_path, capsys):
    root, out = tmp_path / "in", tmp_path / "out"
    inputs = write_tree(root, {"t.txt": b"x\n"})
    assert stage_copy.main(make_env(root, out, inputs, PIPELINE_PARAMS='{"mode": "ascii"}')) == 64
    assert "copy takes no params" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("script", "params", "kind"), [(COPY, "{}", "copy"), (UPPER, "{}", "unicode"), (UPPER, '{"mode":"ascii"}', "ascii")]
)
def test_scripts_multi_input_with_inputs_file(tmp_path, progress, script, params, kind):
    root, out = tmp_path / "in", tmp_path / "out"
    inputs = write_tree(
        root, {"a.txt": sample_lines(1, 50), "d/e/f.txt": sample_lines(2, 70, last_newline=False), "z.txt": b""}
    )
    listing = tmp_path / "inputs.json"
    listing.write_text(json.dumps(inputs))
    env = make_env(root, out, inputs, PIPELINE_PARAMS=params, PIPELINE_CHECKPOINT='{"everyLines": 16}')
    del env["PIPELINE_INPUTS"]
    env["PIPELINE_INPUTS_FILE"] = str(listing)
    code, err, checkpoints = run_script(script, env, progress())
    assert (code, err) == (0, "")
    assert read_outputs(out, root, inputs) == expected_outputs(root, inputs, EXPECT[kind])
    assert_consistent(checkpoints, inputs, EXPECT[kind])
    assert_finals(checkpoints, inputs)


# ------------------------------------------------------------------------------------ checkpoints


@pytest.mark.parametrize("every", [1, 3, 7, 1000])
@pytest.mark.parametrize("chunked", [False, True])
def test_every_lines_cadence_is_exact(tmp_path, progress, monkeypatch, every, chunked):
    monkeypatch.setattr(pipe_sdk, "BUFFER_SIZE", 16)  # many chunks, lines spanning chunk ends
    root, out = tmp_path / "in", tmp_path / "out"
    inputs = write_tree(root, {"a.txt": sample_lines(3, 20), "b.txt": sample_lines(4, 9, last_newline=False)})
    pipe = progress()
    env = make_env(
        root,
        out,
        inputs,
        PIPELINE_PROGRESS_FD=str(pipe.write_fd),
        PIPELINE_CHECKPOINT=json.dumps({"everyLines": every}),
    )
    assert pipe_sdk.run_lines(same, chunked=chunked, env=env) == 0
    checkpoints = pipe.close()
    assert_consistent(checkpoints, inputs, same)
    expected = []
    for index, total in enumerate([20, 9]):
        offsets = list(range(every, total, every)) + [total]
        expected += [(index, offset) for offset in offsets]
    assert [(cp["inputIndex"], cp["lineOffset"]) for cp in checkpoints] == expected


@pytest.mark.parametrize(
    "cadence", [{"everyBytes": 1}, {"everyBytes": 10}, {"everyBytes": 10, "everyLines": 4}, {"everyLines": 5}, {}]
)
def test_chunked_and_line_modes_checkpoint_at_the_same_points(tmp_path, progress, monkeypatch, cadence):
    monkeypatch.setattr(pipe_sdk, "BUFFER_SIZE", 7)
    monkeypatch.setattr(pipe_sdk.time, "monotonic", lambda: 0.0)  # a stalled machine must not add checkpoints
    root, out_lines, out_chunks = tmp_path / "in", tmp_path / "lines", tmp_path / "chunks"
    inputs = write_tree(root, {"a.txt": sample_lines(5, 30), "b.txt": sample_lines(6, 12, last_newline=False)})
    results = []
    for out, chunked in ((out_lines, False), (out_chunks, True)):
        pipe = progress()
        env = make_env(
            root, out, inputs, PIPELINE_PROGRESS_FD=str(pipe.write_fd), PIPELINE_CHECKPOINT=json.dumps(cadence)
        )
        assert pipe_sdk.run_lines(bytes.upper, chunked=chunked, env=env) == 0
        checkpoints = pipe.close()
        assert_consistent(checkpoints, inputs, bytes.upper)
        assert_finals(checkpoints, inputs)
        results.append(checkpoints)
    assert results[0] == results[1]
    assert read_outputs(out_lines, root, inputs) == read_outputs(out_chunks, root, inputs)
    if cadence.get("everyBytes") == 10:
        for before, after in zip(results[0], results[0][1:], strict=False):
            if before["inputIndex"] == after["inputIndex"] and after["byteOffset"] < os.path.getsize(
                inputs[after["inputIndex"]]
            ):
                # due at the first line boundary at least 10 bytes (or 4 lines) after the previous one
                assert (
                    after["byteOffset"] - before["byteOffset"] >= 10 or after["lineOffset"] - before["lineOffset"] == 4
                )


def test_checkpoint_is_sent_only_after_fsync_and_matches_the_file_on_disk(tmp_path, progress, monkeypatch):
    root, out = tmp_path / "in", tmp_path / "out"
    out.mkdir()
    inputs = write_tree(root, {"n1/n2/deep.txt": sample_lines(7, 40), "top.txt": sample_lines(8, 25)})
    outputs = [str(out / os.path.relpath(path, root)) for path in inputs]
    pipe = progress()
    events: list[tuple] = []
    real_fsync, real_write = os.fsync, os.write

    def fsync(fd: int) -> None:
        real_fsync(fd)
        events.append(("fsync", os.fstat(fd).st_ino))

    def write(fd: int, data: bytes) -> int:
        if fd == pipe.write_fd:
            checkpoint = json.loads(data)
            events.append(("checkpoint", checkpoint, os.path.getsize(outputs[checkpoint["inputIndex"]])))
        return real_write(fd, data)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "write", write)
    env = make_env(root, out, inputs, PIPELINE_PROGRESS_FD=str(pipe.write_fd), PIPELINE_CHECKPOINT='{"everyLines": 6}')
    assert stage_upper.main(env) == 0
    monkeypatch.undo()
    checkpoints = pipe.close()
    assert len(checkpoints) == len([e for e in events if e[0] == "checkpoint"]) > 4
    synced: set[int] = set()
    seen_inputs: set[int] = set()
    for event in events:
        if event[0] == "fsync":
            synced.add(event[1])
            continue
        _, checkpoint, size_on_disk = event
        index = checkpoint["inputIndex"]
        assert size_on_disk == checkpoint["outputBytes"]
        assert os.stat(outputs[index]).st_ino in synced  # the output file, since the last checkpoint
        if index not in seen_inputs:  # a new file: its folder and every new folder's parent too
            seen_inputs.add(index)
            folders = [out / "n1" / "n2", out / "n1", out] if "deep" in outputs[index] else [out]
            assert {os.stat(folder).st_ino for folder in folders} <= synced
        synced = set()
    assert_consistent(checkpoints, inputs, upper_unicode)


def test_every_seconds_cadence_with_a_controlled_clock(tmp_path, progress, monkeypatch):
    clock = [1000.0]
    monkeypatch.setattr(pipe_sdk.time, "monotonic", lambda: clock[0])

    def tick(line: bytes) -> bytes:
        if line.startswith(b"TICK"):
            clock[0] += 10
        return line

    root, out = tmp_path / "in", tmp_path / "out"
    inputs = write_tree(root, {"t.txt": b"a\nb\nTICK\nc\nd\nTICK\ne\n"})
    pipe = progress()
    env = make_env(
        root, out, inputs, PIPELINE_PROGRESS_FD=str(pipe.write_fd), PIPELINE_CHECKPOINT='{"everySeconds": 5}'
    )
    assert pipe_sdk.run_lines(tick, env=env) == 0
    assert [cp["lineOffset"] for cp in pipe.close()] == [3, 6, 7]


def test_every_seconds_in_chunked_mode_cuts_at_the_next_newline(tmp_path, progress, monkeypatch):
    clock = [1000.0]
    monkeypatch.setattr(pipe_sdk.time, "monotonic", lambda: clock[0])
    monkeypatch.setattr(pipe_sdk, "BUFFER_SIZE", 4)

    def tick(piece: bytes) -> bytes:
        clock[0] += 10 if b"TICK" in piece else 0
        return piece

    root, out = tmp_path / "in", tmp_path / "out"
    inputs = write_tree(root, {"t.txt": b"TICK\nab\ncd\n"})
    pipe = progress()
    env = make_env(
        root, out, inputs, PIPELINE_PROGRESS_FD=str(pipe.write_fd), PIPELINE_CHECKPOINT='{"everySeconds": 2.5}'
    )
    assert pipe_sdk.run_lines(tick, chunked=True, env=env) == 0
    assert pipe.close() == [
        {"inputIndex": 0, "lineOffset": 1, "byteOffset": 5, "outputBytes": 5},
        {"inputIndex": 0, "lineOffset": 3, "byteOffset": 11, "outputBytes": 11},
    ]


def test_checkpoint_line_format():
    line = pipe_sdk.Checkpoint(2, 120000, 7340032, 7340031).to_line()
    assert line == b'{"inputIndex":2,"lineOffset":120000,"byteOffset":7340032,"outputBytes":7340031}\n'


def test_cadence_defaults_and_explicit_limits(tmp_path):
    env = make_env(tmp_path, tmp_path / "out", [])
    assert pipe_sdk.Context.from_env(env).cadence == pipe_sdk.Cadence(None, 64 << 20, 5.0)
    env["PIPELINE_CHECKPOINT"] = "{}"
    assert pipe_sdk.Context.from_env(env).cadence == pipe_sdk.Cadence(None, None, None)
    env["PIPELINE_CHECKPOINT"] = '{"everyLines": 10, "everySeconds": 0.5}'
    assert pipe_sdk.Context.from_env(env).cadence == pipe_sdk.Cadence(10, None, 0.5)


def test_context_from_env_reads_the_protocol(tmp_path, monkeypatch):
    root = tmp_path / "in"
    inputs = write_tree(root, {"a/b.txt": b"x"})
    env = make_env(
        root,
        tmp_path / "out",
        inputs,
        PIPELINE_ATTEMPT="3",
        PIPELINE_PARAMS='{"mode": "ascii"}',
        PIPE_FAULT="crash-after-lines:7",
    )
    monkeypatch.setattr(os, "environ", env)
    context = pipe_sdk.Context.from_env()
    assert (context.run_id, context.stage, context.attempt) == ("run-1", STAGE, 3)
    assert context.inputs == tuple(inputs)
    assert context.outputs == (str(tmp_path / "out" / "a" / "b.txt"),)
    assert context.params == {"mode": "ascii"}
    assert (context.progress_fd, context.resume, context.crash_after_lines) == (None, None, 7)


# ----------------------------------------------------------------------------------------- resume


def test_resume_truncates_current_output_and_restarts_later_inputs(tmp_path, progress):
    root, out = tmp_path / "in", tmp_path / "out"
    inputs = write_tree(root, {"a.txt": b"done\n", "b.txt": b"hello\nworld\nagain\n", "c/d.txt": b"last\n"})
    (out / "c").mkdir(parents=True)
    (out / "a.txt").write_bytes(b"SENTINEL, LEFT ALONE")
    (out / "b.txt").write_bytes(b"HELLO\ngarbage written after the checkpoint")
    (out / "c/d.txt").write_bytes(b"stale partial output of a later input")
    pipe = progress()
    resume = '{"inputIndex":1,"lineOffset":1,"byteOffset":6,"outputBytes":6,"extra":"ignored"}'
    env = make_env(
        root, out, inputs, PIPELINE_RESUME=resume, PIPELINE_PROGRESS_FD=str(pipe.write_fd), PIPELINE_CHECKPOINT="{}"
    )
    assert stage_upper.main(env) == 0
    assert read_outputs(out, root, inputs) == {
        "a.txt": b"SENTINEL, LEFT ALONE",
        "b.txt": b"HELLO\nWORLD\nAGAIN\n",
        "c/d.txt": b"LAST\n",
    }
    assert pipe.close() == [
        {"inputIndex": 1, "lineOffset": 3, "byteOffset": 18, "outputBytes": 18},
        {"inputIndex": 2, "lineOffset": 1, "byteOffset": 5, "outputBytes": 5},
    ]


@pytest.mark.parametrize("chunked", [False, True])
def test_resume_from_a_final_checkpoint_moves_on(tmp_path, progress, chunked):
    root, out = tmp_path / "in", tmp_path / "out"
    inputs = write_tree(root, {"a.txt": b"ab\ncd", "b.txt": b"ef\n"})
    out.mkdir()
    (out / "a.txt").write_bytes(b"AB\nCD")
    pipe = progress()
    resume = '{"inputIndex":0,"lineOffset":2,"byteOffset":5,"outputBytes":5}'
    env = make_env(
        root, out, inputs, PIPELINE_RESUME=resume, PIPELINE_PROGRESS_FD=str(pipe.write_fd), PIPELINE_CHECKPOINT="{}"
    )
    assert pipe_sdk.run_lines(bytes.upper, chunked=chunked, env=env) == 0
    assert read_outputs(out, root, inputs) == {"a.txt": b"AB\nCD", "b.txt": b"EF\n"}
    assert pipe.close() == [json.loads(resume), {"inputIndex": 1, "lineOffset": 1, "byteOffset": 3, "outputBytes": 3}]


RESUME_INPUTS = {"a.txt": b"x\ny\n", "b.txt": b"hello\nworld\n"}


@pytest.mark.parametrize(
    ("resume", "remove", "message"),
    [
        ("not json", None, "not valid JSON"),
        ("[0, 0, 0, 0]", None, "must be a JSON object"),
        ('{"inputIndex":0,"lineOffset":0,"byteOffset":0}', None, "'outputBytes' must be a non-negative integer"),
        ('{"inputIndex":-1,"lineOffset":0,"byteOffset":0,"outputBytes":0}', None, "'inputIndex' must be"),
        ('{"inputIndex":true,"lineOffset":0,"byteOffset":0,"outputBytes":0}', None, "'inputIndex' must be"),
        ('{"inputIndex":0,"lineOffset":1.0,"byteOffset":2,"outputBytes":0}', None, "'lineOffset' must be"),
        ('{"inputIndex":0,"lineOffset":"1","byteOffset":2,"outputBytes":0}', None, "'lineOffset' must be"),
        ('{"inputIndex":0,"lineOffset":3,"byteOffset":2,"outputBytes":2}', None, "does not fit"),
        ('{"inputIndex":0,"lineOffset":0,"byteOffset":2,"outputBytes":2}', None, "does not fit"),
        ('{"inputIndex":2,"lineOffset":0,"byteOffset":0,"outputBytes":0}', None, "inputIndex 2 but there are 2 inputs"),
        ('{"inputIndex":1,"lineOffset":2,"byteOffset":13,"outputBytes":6}', None, "past the end"),
        ('{"inputIndex":1,"lineOffset":1,"byteOffset":3,"outputBytes":3}', None, "not on a line boundary"),
        ('{"inputIndex":1,"lineOffset":1,"byteOffset":6,"outputBytes":7}', None, "shorter than outputBytes 7"),
        ('{"inputIndex":1,"lineOffset":1,"byteOffset":6,"outputBytes":6}', "b.txt", "shorter than outputBytes 6"),
        ('{"inputIndex":1,"lineOffset":1,"byteOffset":6,"outputBytes":6}', "a.txt", "of a completed input is missing"),
    ],
)
def test_invalid_resume_checkpoint_exits_65_and_touches_nothing(tmp_path, capsys, resume, remove, message):
    root, out = tmp_path / "in", tmp_path / "out"
    inputs = write_tree(root, RESUME_INPUTS)
    write_tree(out, {"a.txt": b"X\nY\n", "b.txt": b"HELLO\n"})
    if remove:
        (out / remove).unlink()
    before = {path.name: path.read_bytes() for path in out.iterdir()}
    assert stage_upper.main(make_env(root, out, inputs, PIPELINE_RESUME=resume)) == 65
    err = capsys.readouterr().err
    assert err.startswith(f"{STAGE}: ")
    assert "PIPELINE_RESUME" in err and message in err
    assert {path.name: path.read_bytes() for path in out.iterdir()} == before


def test_invalid_resume_as_subprocess(tmp_path, progress):
    root, out = tmp_path / "in", tmp_path / "out"
    inputs = write_tree(root, RESUME_INPUTS)
    env = make_env(root, out, inputs, PIPELINE_RESUME='{"inputIndex":5,"lineOffset":0,"byteOffset":0,"outputBytes":0}')
    code, err, checkpoints = run_script(COPY, env, progress())
    assert (code, checkpoints) == (65, [])
    assert "inputIndex 5" in err


# ------------------------------------------------------------------------------- fault injection


@pytest.mark.parametrize("lines", [1, 4, 5, 13])
@pytest.mark.parametrize("chunked", [False, True])
def test_fault_stops_after_exactly_n_lines(tmp_path, monkeypatch, lines, chunked):
    monkeypatch.setattr(pipe_sdk, "BUFFER_SIZE", 8)
    kills = []

    def fake_kill(pid: int, sig: int) -> None:
        kills.append((pid, sig))
        raise Killed

    monkeypatch.setattr(os, "kill", fake_kill)
    root, out = tmp_path / "in", tmp_path / "out"
    data = sample_lines(9, 30)
    inputs = write_tree(root, {"a.txt": data})
    env = make_env(root, out, inputs, PIPE_FAULT=f"crash-after-lines:{lines}", PIPELINE_CHECKPOINT='{"everyLines": 4}')
    with pytest.raises(Killed):
        pipe_sdk.run_lines(bytes.upper, chunked=chunked, env=env)
    assert kills == [(os.getpid(), signal.SIGKILL)]
    # unwinding the fake kill flushed the buffer, so the file shows exactly what was processed
    first_lines = b"".join(data.splitlines(keepends=True)[:lines])
    assert (out / "a.txt").read_bytes() == first_lines.upper()


def crash_then_resume(
    script: Path, env: dict[str, str], lines: int, progress
) -> tuple[list[dict[str, int]], str | None]:
    """Run with PIPE_FAULT, expect a SIGKILL, then resume from the last checkpoint received (a fresh
    start when none arrived) and expect success. Returns the checkpoints of both runs and the
    resume value used."""
    code, err, checkpoints = run_script(script, {**env, "PIPE_FAULT": f"crash-after-lines:{lines}"}, progress())
    assert code == -signal.SIGKILL, err
    resume_env = dict(env)
    resume = json.dumps(checkpoints[-1]) if checkpoints else None
    if resume is not None:
        resume_env["PIPELINE_RESUME"] = resume
    code, err, resumed = run_script(script, resume_env, progress())
    assert (code, err) == (0, "")
    return checkpoints + resumed, resume


@pytest.mark.parametrize("lines", [1, 2, 3, 5, 8, 21, 34])
@pytest.mark.parametrize(
    ("script", "params", "kind"), [(UPPER, "{}", "unicode"), (COPY, "{}", "copy"), (UPPER, '{"mode":"ascii"}', "ascii")]
)
def test_sigkill_then_resume_is_byte_identical(tmp_path, progress, lines, script, params, kind):
    root = tmp_path / "in"
    inputs = write_tree(root, {"t.txt": sample_lines(10, 40, last_newline=False)})
    env = make_env(root, tmp_path / "clean", inputs, PIPELINE_PARAMS=params, PIPELINE_CHECKPOINT='{"everyLines": 3}')
    assert run_script(script, env, progress())[0] == 0
    clean = read_outputs(tmp_path / "clean", root, inputs)
    assert clean == expected_outputs(root, inputs, EXPECT[kind])

    env["PIPELINE_OUTPUT_DIR"] = str(tmp_path / "crashed")
    checkpoints, resume = crash_then_resume(script, env, lines, progress)
    assert (resume is None) == (lines < 3)
    assert read_outputs(tmp_path / "crashed", root, inputs) == clean
    assert_consistent(checkpoints, inputs, EXPECT[kind])


@pytest.mark.parametrize("lines", [12, 15, 17, 29])
@pytest.mark.parametrize(("script", "kind"), [(UPPER, "unicode"), (COPY, "copy")])
def test_sigkill_in_second_input_then_resume(tmp_path, progress, lines, script, kind):
    root, out = tmp_path / "in", tmp_path / "out"
    inputs = write_tree(
        root, {"a/one.txt": sample_lines(11, 10), "b/two.txt": sample_lines(12, 30), "c.txt": sample_lines(13, 5)}
    )
    env = make_env(root, out, inputs, PIPELINE_CHECKPOINT='{"everyLines": 4}')
    code, _, checkpoints = run_script(script, {**env, "PIPE_FAULT": f"crash-after-lines:{lines}"}, progress())
    assert code == -signal.SIGKILL
    # checkpoints at 4, 8, 10 (end of the first input), then 14, 18, ...: the crash is in input 1
    assert checkpoints[-1]["inputIndex"] == (0 if lines < 14 else 1)
    code, err, resumed = run_script(script, {**env, "PIPELINE_RESUME": json.dumps(checkpoints[-1])}, progress())
    assert (code, err) == (0, "")
    assert read_outputs(out, root, inputs) == expected_outputs(root, inputs, EXPECT[kind])
    assert_consistent(checkpoints + resumed, inputs, EXPECT[kind])
    assert resumed[-1] == {
        "inputIndex": 2,
        "lineOffset": 5,
        "byteOffset": os.path.getsize(inputs[2]),
        "outputBytes": len(EXPECT[kind](Path(inputs[2]).read_bytes())),
    }


@pytest.mark.parametrize(("script", "kind"), [(UPPER, "unicode"), (COPY, "copy")])
def test_sigkill_with_unacknowledged_bytes_on_disk_then_resume(tmp_path, progress, script, kind):
    """Inputs larger than the 1 MiB buffers: output reaches the disk after the last checkpoint, so
    the resume must continue from outputBytes, not from the end of the file."""
    root, out = tmp_path / "in", tmp_path / "out"
    data = b"".join(f"{n:06d} straße é {'x' * (n % 150)}\n".encode() for n in range(60000))  # ~6 MB
    inputs = write_tree(root, {"big.txt": data})
    env = make_env(root, out, inputs, PIPELINE_CHECKPOINT='{"everyLines": 15000}')
    code, _, checkpoints = run_script(script, {**env, "PIPE_FAULT": "crash-after-lines:44000"}, progress())
    assert code == -signal.SIGKILL
    assert [cp["lineOffset"] for cp in checkpoints] == [15000, 30000]
    assert os.path.getsize(out / "big.txt") > checkpoints[-1]["outputBytes"]
    code, err, resumed = run_script(script, {**env, "PIPELINE_RESUME": json.dumps(checkpoints[-1])}, progress())
    assert (code, err) == (0, "")
    assert read_outputs(out, root, inputs) == expected_outputs(root, inputs, EXPECT[kind])
    assert_consistent(checkpoints + resumed, inputs, EXPECT[kind])


def test_repeated_sigkills_converge_to_the_clean_output(tmp_path, progress):
    root, out = tmp_path / "in", tmp_path / "out"
    inputs = write_tree(root, {"a.txt": sample_lines(14, 12), "b.txt": sample_lines(15, 17, last_newline=False)})
    env = make_env(root, out, inputs, PIPELINE_CHECKPOINT='{"everyLines": 2}', PIPE_FAULT="crash-after-lines:5")
    attempts = 0
    while True:
        attempts += 1
        assert attempts < 30
        code, err, checkpoints = run_script(UPPER, env, progress())
        if code == 0:
            break
        assert code == -signal.SIGKILL, err
        env["PIPELINE_RESUME"] = json.dumps(checkpoints[-1])
    assert attempts > 5
    assert read_outputs(out, root, inputs) == expected_outputs(root, inputs, upper_unicode)


# ----------------------------------------------------------------------- environment and exit codes


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        (dict(PIPELINE_INPUTS=None), "PIPELINE_INPUTS (or PIPELINE_INPUTS_FILE) is not set"),
        (dict(PIPELINE_INPUTS_FILE="/x.json"), "set only one of"),
        (dict(PIPELINE_INPUTS="{"), "PIPELINE_INPUTS is not valid JSON"),
        (dict(PIPELINE_INPUTS='{"a": 1}'), "must be a JSON array of file paths"),
        (dict(PIPELINE_INPUTS='[""]'), "must be a JSON array of file paths"),
        (dict(PIPELINE_INPUTS='["/elsewhere/x.txt"]'), "is not inside PIPELINE_INPUT_ROOT"),
        (dict(PIPELINE_INPUT_ROOT=None), "PIPELINE_INPUT_ROOT is not set"),
        (dict(PIPELINE_OUTPUT_DIR=""), "PIPELINE_OUTPUT_DIR is not set"),
        (dict(PIPELINE_PARAMS="[]"), "PIPELINE_PARAMS must be a JSON object, got list"),
        (dict(PIPELINE_ATTEMPT="0"), "PIPELINE_ATTEMPT must be a positive integer"),
        (dict(PIPELINE_ATTEMPT="²"), "PIPELINE_ATTEMPT must be a positive integer"),
        (dict(PIPELINE_PROGRESS_FD="three"), "must be a file descriptor number"),
        (dict(PIPELINE_PROGRESS_FD="987654"), "is not an open file descriptor"),
        (dict(PIPELINE_CHECKPOINT="5"), "PIPELINE_CHECKPOINT must be a JSON object"),
        (dict(PIPELINE_CHECKPOINT='{"everyLine": 5}'), "unknown key 'everyLine'"),
        (dict(PIPELINE_CHECKPOINT='{"everyLines": 0}'), "'everyLines' must be a positive number"),
        (dict(PIPELINE_CHECKPOINT='{"everyBytes": true}'), "'everyBytes' must be a positive number"),
        (dict(PIPELINE_CHECKPOINT='{"everyLines": 2.5}'), "'everyLines' must be a positive number"),
        (dict(PIPE_FAULT="crash-after-lines:0"), "PIPE_FAULT must be"),
        (dict(PIPE_FAULT="crash-after-bytes:3"), "PIPE_FAULT must be"),
    ],
)
def test_bad_environment_exits_64(tmp_path, capsys, changes, message):
    root, out = tmp_path / "in", tmp_path / "out"
    inputs = write_tree(root, {"t.txt": b"x\n"})
    env = make_env(root, out, inputs)
    for key, value in changes.items():
        if value is None:
            del env[key]
        else:
            env[key] = value
    assert stage_copy.main(env) == 64
    err = capsys.readouterr().err
    assert err.startswith(f"{STAGE}: ") and message in err and err.count("\n") == 1
    assert not out.exists()


def test_inputs_file_in_process(tmp_path):
    root, out = tmp_path / "in", tmp_path / "out"
    inputs = write_tree(root, {"b.txt": b"b\n", "a.txt": b"a\n"})
    listing = tmp_path / "inputs.json"
    listing.write_text(json.dumps(inputs))
    env = make_env(root, out, inputs, PIPELINE_INPUTS_FILE=str(listing))
    del env["PIPELINE_INPUTS"]
    assert pipe_sdk.Context.from_env(env).inputs == tuple(inputs)
    assert stage_upper.main(env) == 0
    assert read_outputs(out, root, inputs) == {"a.txt": b"A\n", "b.txt": b"B\n"}


def test_unreadable_inputs_file_exits_64(tmp_path, capsys):
    env = make_env(tmp_path, tmp_path / "out", [])
    del env["PIPELINE_INPUTS"]
    env["PIPELINE_INPUTS_FILE"] = str(tmp_path / "missing.json")
    assert stage_copy.main(env) == 64
    assert "cannot read PIPELINE_INPUTS_FILE" in capsys.readouterr().err


def test_empty_input_list_succeeds_without_output(tmp_path, progress):
    pipe = progress()
    env = make_env(tmp_path, tmp_path / "out", [], PIPELINE_PROGRESS_FD=str(pipe.write_fd))
    assert stage_upper.main(env) == 0
    assert pipe.close() == []


def raiser(error: BaseException) -> Callable[[bytes], bytes]:
    def apply(_line: bytes) -> bytes:
        raise error

    return apply


@pytest.mark.parametrize(
    ("error", "code", "message"),
    [
        (OSError(11, "Resource temporarily unavailable"), 75, "Resource temporarily unavailable"),
        (OSError(16, "Device or resource busy"), 75, "busy"),
        (OSError(13, "Permission denied"), 1, "Permission denied"),
        (pipe_sdk.TransientError("lock held by another job"), 75, "lock held by another job"),
        (pipe_sdk.DataError("negative count"), 65, "negative count"),
        (ValueError("bug\non two lines"), 1, "internal error: ValueError: bug on two lines"),
    ],
)
def test_failures_map_to_exit_codes_with_one_line_on_stderr(tmp_path, capsys, error, code, message):
    root = tmp_path / "in"
    inputs = write_tree(root, {"t.txt": b"x\n"})
    assert pipe_sdk.run_lines(raiser(error), env=make_env(root, tmp_path / "out", inputs)) == code
    err = capsys.readouterr().err
    assert err.startswith(f"{STAGE}: ") and message in err and err.count("\n") == 1


def test_missing_input_file_is_fatal_and_named(tmp_path, capsys):
    root = tmp_path / "in"
    root.mkdir()
    env = make_env(root, tmp_path / "out", [str(root / "gone.txt")])
    del env["PIPELINE_STAGE"]
    assert stage_copy.main(env) == 1
    err = capsys.readouterr().err
    assert err.startswith("pipe_sdk: ") and "gone.txt" in err


# --- failpoints (shared names with the Rust SDK; the crash sweep arms them through the engine) ---


def test_failpoint_kills_at_the_kth_hit_and_reports_it(tmp_path):
    """A real subprocess: armed `sdk.after-output-fsync:2` SIGKILLs at the second checkpoint and
    names itself in the fired log; unarmed names and earlier hits do nothing."""
    script = (
        "import sys; sys.path.insert(0, sys.argv[1]); import pipe_sdk\n"
        "for i in range(3):\n"
        "    pipe_sdk._failpoint('sdk.after-output-write')\n"
        "    pipe_sdk._failpoint('sdk.after-output-fsync')\n"
        "    print(i, flush=True)\n"
    )
    fired = tmp_path / "fired.log"
    env = dict(os.environ, PIPE_FAILPOINT="sdk.after-output-fsync:2", PIPE_FAILPOINT_FIRED=str(fired))
    proc = subprocess.run([sys.executable, "-c", script, str(PY_DIR)], env=env, capture_output=True, timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert proc.stdout.decode().split() == ["0"]
    assert fired.read_text() == "sdk.after-output-fsync:2\n"


def test_failpoint_unarmed_or_malformed_never_fires():
    pipe_sdk._FAILPOINT_STATE.clear()
    try:
        pipe_sdk._failpoint("sdk.after-output-write", env={"PIPE_FAILPOINT": "sdk.after-output-write:x"})
        pipe_sdk._failpoint("sdk.after-output-write")
    finally:
        pipe_sdk._FAILPOINT_STATE.clear()
