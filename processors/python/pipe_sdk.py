"""Python SDK for `pipe` processors: the processor protocol of docs/protocol.md in one stdlib module.

Why this module exists: a processor author should write only the per-line function. Everything the
engine expects around that function is the same for every processor -- reading the PIPELINE_*
environment, mirroring input names into the staging dir, streaming inputs in constant memory,
durable checkpoints on the progress fd, exactly-once resume from PIPELINE_RESUME, PIPE_FAULT fault
injection and the exit-code contract -- so it lives here once, as the Python twin of the Rust SDK
that the built-in processors use.

A complete processor::

    import sys
    import pipe_sdk

    def shout(line: bytes) -> bytes:
        return line.upper()

    if __name__ == "__main__":
        sys.exit(pipe_sdk.run_lines(shout))

A processor whose choice of function depends on the stage's params uses `run(setup)` instead, where
`setup(context)` validates `context.params` and returns a `Transform`.

Only the standard library is used, and nothing that can reach a network: processors run offline.
"""

from __future__ import annotations

import errno
import json
import math
import os
import signal
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, BinaryIO

EX_OK = 0
EX_FAILURE = 1
EX_USAGE = 64
EX_DATAERR = 65
EX_TEMPFAIL = 75

BUFFER_SIZE = 1 << 20
"""Bytes per read and size of the output buffer: syscalls happen per MiB, never per line."""

DEFAULT_EVERY_BYTES = 64 << 20
DEFAULT_EVERY_SECONDS = 5.0

TRANSIENT_ERRNOS = frozenset({errno.EAGAIN, errno.EBUSY, errno.EINTR, errno.ETXTBSY})
"""OS errors worth a retry (exit 75); every other OSError is fatal (exit 1)."""

_NEVER = sys.maxsize
_CADENCE_KEYS = ("everyLines", "everyBytes", "everySeconds")
_CHECKPOINT_KEYS = ("inputIndex", "lineOffset", "byteOffset", "outputBytes")
_FAULT_PREFIX = "crash-after-lines:"


class PipeError(Exception):
    """A failure with a known exit code; its message becomes the processor's one-line diagnosis."""

    exit_code = EX_FAILURE


class UsageError(PipeError):
    """The environment or the stage's params are wrong (exit 64, EX_USAGE): fatal."""

    exit_code = EX_USAGE


class DataError(PipeError):
    """The input data (or the resume checkpoint) is unusable (exit 65, EX_DATAERR): fatal."""

    exit_code = EX_DATAERR


class TransientError(PipeError):
    """A failure that may go away on its own (exit 75, EX_TEMPFAIL): the engine retries."""

    exit_code = EX_TEMPFAIL


@dataclass(frozen=True)
class Transform:
    """The processor author's function and how the SDK may call it.

    `apply(piece) -> bytes` receives one line including its trailing b"\\n" (the last line of a
    file may lack it). With `chunked=True` it instead receives arbitrary slices of the input, which
    is much faster but only correct for byte-local functions, where apply(a + b) == apply(a) +
    apply(b) for every split (copying, ASCII case mapping); checkpoints stay on line boundaries.
    A UnicodeDecodeError from decoding the whole piece is reported as bad data (exit 65) naming the
    file and the absolute byte offset of the first invalid byte.
    """

    apply: Callable[[bytes], bytes]
    chunked: bool = False


@dataclass(frozen=True)
class Cadence:
    """When a checkpoint is due (PIPELINE_CHECKPOINT): as soon as any given limit is reached."""

    every_lines: int | None = None
    every_bytes: int | None = DEFAULT_EVERY_BYTES
    every_seconds: float | None = DEFAULT_EVERY_SECONDS

    @classmethod
    def from_json(cls, text: str) -> Cadence:
        """Parse PIPELINE_CHECKPOINT; limits it does not give are off (only the absent variable
        means the SDK default)."""
        obj = _json_object(text, "PIPELINE_CHECKPOINT", UsageError)
        unknown = sorted(set(obj) - set(_CADENCE_KEYS))
        if unknown:
            raise UsageError(f"PIPELINE_CHECKPOINT: unknown key {unknown[0]!r} (known: {', '.join(_CADENCE_KEYS)})")
        return cls(
            every_lines=_positive_limit(obj, "everyLines", int),
            every_bytes=_positive_limit(obj, "everyBytes", int),
            every_seconds=_positive_limit(obj, "everySeconds", (int, float)),
        )


@dataclass(frozen=True)
class Checkpoint:
    """A durable point of progress: inputs before `input_index` are complete, and input
    `input_index` is consumed up to `byte_offset` (`line_offset` lines) with `output_bytes` of its
    output written, flushed and fsynced."""

    input_index: int
    line_offset: int
    byte_offset: int
    output_bytes: int

    def to_line(self) -> bytes:
        """The JSON line sent on the progress fd."""
        return (
            f'{{"inputIndex":{self.input_index},"lineOffset":{self.line_offset},'
            f'"byteOffset":{self.byte_offset},"outputBytes":{self.output_bytes}}}\n'
        ).encode("ascii")

    @classmethod
    def from_json(cls, text: str) -> Checkpoint:
        """Parse PIPELINE_RESUME; anything malformed is a DataError (exit 65). Extra keys are
        ignored, so the engine may add fields without breaking processors."""
        obj = _json_object(text, "PIPELINE_RESUME", DataError)
        values = []
        for key in _CHECKPOINT_KEYS:
            value = obj.get(key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise DataError(f"invalid PIPELINE_RESUME: {key!r} must be a non-negative integer, got {value!r}")
            values.append(value)
        checkpoint = cls(*values)
        if checkpoint.line_offset > checkpoint.byte_offset or (checkpoint.byte_offset > 0) != (
            checkpoint.line_offset > 0
        ):
            raise DataError(
                f"invalid PIPELINE_RESUME: lineOffset {checkpoint.line_offset} does not fit "
                f"byteOffset {checkpoint.byte_offset}"
            )
        return checkpoint


@dataclass(frozen=True)
class Context:
    """Everything the engine tells one attempt of a processor, parsed and validated."""

    run_id: str
    stage: str
    attempt: int
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    """The mirrored output path of each input: output_dir / (input relative to input_root)."""
    input_root: str
    output_dir: str
    params: dict[str, Any]
    progress_fd: int | None
    resume: Checkpoint | None
    cadence: Cadence
    crash_after_lines: int | None

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Context:
        """Read the protocol's environment (os.environ by default). Raises UsageError for a wrong
        environment and DataError for a malformed PIPELINE_RESUME."""
        env = os.environ if env is None else env
        inputs = _read_inputs(env)
        input_root = os.path.abspath(_required(env, "PIPELINE_INPUT_ROOT"))
        output_dir = os.path.abspath(_required(env, "PIPELINE_OUTPUT_DIR"))
        cadence_text = env.get("PIPELINE_CHECKPOINT")
        resume_text = env.get("PIPELINE_RESUME")
        return cls(
            run_id=env.get("PIPELINE_RUN_ID", ""),
            stage=env.get("PIPELINE_STAGE", ""),
            attempt=_read_attempt(env),
            inputs=inputs,
            outputs=tuple(_mirror(path, input_root, output_dir) for path in inputs),
            input_root=input_root,
            output_dir=output_dir,
            params=_json_object(env.get("PIPELINE_PARAMS") or "{}", "PIPELINE_PARAMS", UsageError),
            progress_fd=_read_progress_fd(env),
            resume=Checkpoint.from_json(resume_text) if resume_text else None,
            cadence=Cadence.from_json(cadence_text) if cadence_text else Cadence(),
            crash_after_lines=_read_fault(env),
        )


def run(setup: Callable[[Context], Transform], env: Mapping[str, str] | None = None) -> int:
    """Run one processor attempt and return its exit code (the value for sys.exit).

    `setup(context)` validates the stage's params (raising UsageError when they are wrong) and
    returns the Transform to apply. Every failure is reported on stderr as one line starting with
    the stage name.
    """
    env = os.environ if env is None else env
    name = env.get("PIPELINE_STAGE") or "pipe_sdk"
    try:
        context = Context.from_env(env)
        _Attempt(context, setup(context)).run()
    except PipeError as err:
        return _fail(name, str(err), err.exit_code)
    except OSError as err:
        return _fail(name, str(err), EX_TEMPFAIL if err.errno in TRANSIENT_ERRNOS else EX_FAILURE)
    except Exception as err:  # noqa: BLE001 -- the exit-code contract must cover every failure
        return _fail(name, f"internal error: {type(err).__name__}: {err}", EX_FAILURE)
    return EX_OK


def run_lines(apply: Callable[[bytes], bytes], *, chunked: bool = False, env: Mapping[str, str] | None = None) -> int:
    """Run a processor whose function does not depend on params; see Transform for `chunked`."""
    transform = Transform(apply, chunked)
    return run(lambda _context: transform, env)


class _Attempt:
    """One attempt over all inputs, in order, with the checkpoint bookkeeping of the protocol.

    Per input it tracks the bytes consumed (`pos`), lines consumed (`lines`) and the output file;
    `done` counts the lines this process has handled, which is what PIPE_FAULT counts.
    """

    out: BinaryIO
    """The output file of the input being processed (set by _process)."""

    def __init__(self, context: Context, transform: Transform) -> None:
        self.context = context
        self.transform = transform
        self.crash_at = context.crash_after_lines or _NEVER
        self.done = 0
        self.tallied = 0
        self.index = 0
        self.path = ""
        self.pos = 0
        self.lines = 0
        self.unsynced_dirs: list[str] = []
        self.last_sent: tuple[int, int] | None = None
        self.checkpoint_line = _NEVER
        self.checkpoint_byte = _NEVER
        self.deadline = math.inf

    def run(self) -> None:
        resume = self.context.resume
        if resume is not None:
            _check_resume(self.context, resume)
        first = resume.input_index if resume is not None else 0
        for index in range(first, len(self.context.inputs)):
            self._process(index, resume if index == first else None)

    def _process(self, index: int, resume: Checkpoint | None) -> None:
        """Produce the output of one input, from the start or from its resume checkpoint."""
        self.index = index
        self.path = self.context.inputs[index]
        buffering = 0 if self.transform.chunked else BUFFER_SIZE
        with open(self.path, "rb", buffering=buffering) as reader, self._open_output(resume) as self.out:
            reader.seek(self.pos)
            self._reset_cadence()
            if self.transform.chunked:
                self._stream_chunks(reader)
            else:
                self._stream_lines(reader)
            if self.last_sent != (index, self.pos):
                self._checkpoint()

    def _open_output(self, resume: Checkpoint | None) -> BinaryIO:
        """Open the current input's output: new and empty, or cut back to the resume checkpoint.
        Sets the input position to match."""
        output = self.context.outputs[self.index]
        if resume is None:
            self.unsynced_dirs = _make_parent_dirs(output)
            self.pos = self.lines = 0
            return open(output, "wb", buffering=BUFFER_SIZE)
        out = open(output, "r+b", buffering=BUFFER_SIZE)
        out.truncate(resume.output_bytes)
        out.seek(resume.output_bytes)
        self.pos, self.lines = resume.byte_offset, resume.line_offset
        return out

    def _stream_lines(self, reader: BinaryIO) -> None:
        for line in reader:
            self._emit(line)
            self.lines += 1
            self.done += 1
            self._at_line_boundary()

    def _stream_chunks(self, reader: BinaryIO) -> None:
        open_line = False
        while chunk := reader.read(BUFFER_SIZE):
            start = 0
            while start < len(chunk):
                end = self._piece_end(chunk, start)
                piece = chunk[start:end]
                self._emit(piece)
                newlines = piece.count(b"\n")
                self.lines += newlines
                self.done += newlines
                start = end
                open_line = piece[-1] != 0x0A
                if not open_line:
                    self._at_line_boundary()
        if open_line:
            self.lines += 1
            self.done += 1
            self._at_line_boundary()

    def _piece_end(self, chunk: bytes, start: int) -> int:
        """Where the next piece of `chunk` ends: just after the first line boundary at which a
        checkpoint or the fault may be due, or at the chunk's end."""
        end = len(chunk)
        time_due = time.monotonic() >= self.deadline
        first = start if time_due else start + max(self.checkpoint_byte - self.pos - 1, 0)
        if first < end:
            newline = chunk.find(b"\n", first, end)
            if newline >= 0:
                end = newline + 1
        lines_left = min(self.checkpoint_line, self.crash_at) - self.done
        return _after_nth_newline(chunk, start, end, lines_left)

    def _emit(self, piece: bytes) -> None:
        try:
            data = self.transform.apply(piece)
        except UnicodeDecodeError as err:
            line = self.lines + piece.count(b"\n", 0, err.start) + 1
            raise DataError(
                f"invalid UTF-8 in {self.path} at byte offset {self.pos + err.start} (line {line}): {err.reason}"
            ) from None
        self.out.write(data)
        _failpoint("sdk.after-output-write")
        self.pos += len(piece)

    def _at_line_boundary(self) -> None:
        """Take a checkpoint if one is due, then honour PIPE_FAULT."""
        if self.done >= self.checkpoint_line or self.pos >= self.checkpoint_byte or time.monotonic() >= self.deadline:
            self._checkpoint()
        if self.done >= self.crash_at:
            os.kill(os.getpid(), signal.SIGKILL)

    def _checkpoint(self) -> None:
        """Make the output durable, and only then tell the engine how far it goes."""
        self.out.flush()
        _failpoint("sdk.after-output-flush")
        os.fsync(self.out.fileno())
        _failpoint("sdk.after-output-fsync")
        for folder in self.unsynced_dirs:
            _fsync_dir(folder)
            _failpoint("sdk.after-dir-fsync")
        self.unsynced_dirs = []
        if self.context.progress_fd is not None:
            line = Checkpoint(self.index, self.lines, self.pos, self.out.tell()).to_line()
            os.write(self.context.progress_fd, line)  # < PIPE_BUF bytes: one atomic write
            _failpoint("sdk.after-checkpoint-sent")
        tally = os.environ.get("PIPE_LINE_TALLY")
        if tally:  # test instrumentation: lines handled since the last checkpoint
            with open(tally, "a", encoding="utf-8") as log:
                log.write(f"{self.done - self.tallied}\n")
            self.tallied = self.done
        self.last_sent = (self.index, self.pos)
        self._reset_cadence()

    def _reset_cadence(self) -> None:
        cadence = self.context.cadence
        self.checkpoint_line = self.done + cadence.every_lines if cadence.every_lines else _NEVER
        self.checkpoint_byte = self.pos + cadence.every_bytes if cadence.every_bytes else _NEVER
        self.deadline = time.monotonic() + cadence.every_seconds if cadence.every_seconds else math.inf


_FAILPOINT_STATE: dict[str, Any] = {}


def _failpoint(name: str, env: Mapping[str, str] | None = None) -> None:
    """A named crash point at a durability step (`PIPE_FAILPOINT=NAME:K`: SIGKILL at the K-th hit
    in this process), shared with the Rust SDK and engine for the crash-consistency sweep. When
    `PIPE_FAILPOINT_FIRED` names a file, `NAME:K` is appended to it first."""
    state = _FAILPOINT_STATE
    if "name" not in state:
        spec = (os.environ if env is None else env).get("PIPE_FAILPOINT", "")
        target, _, at = spec.rpartition(":")
        state.update(name=target if at.isdigit() else None, at=int(at) if at.isdigit() else 0, hits=0)
        state["fired"] = (os.environ if env is None else env).get("PIPE_FAILPOINT_FIRED")
    if state["name"] != name:
        return
    state["hits"] += 1
    if state["hits"] != state["at"]:
        return
    if state["fired"]:
        with open(state["fired"], "a", encoding="utf-8") as log:
            log.write(f"{name}:{state['hits']}\n")
    os.kill(os.getpid(), signal.SIGKILL)


def _after_nth_newline(data: bytes, start: int, stop: int, n: int) -> int:
    """Index just after the n-th b"\\n" of data[start:stop], or `stop` when it holds fewer."""
    if n > stop - start:
        return stop
    pos = start
    for _ in range(n):
        newline = data.find(b"\n", pos, stop)
        if newline < 0:
            return stop
        pos = newline + 1
    return pos


def _check_resume(context: Context, resume: Checkpoint) -> None:
    """Refuse a checkpoint that does not match the inputs and the staging dir (exit 65), since a
    resume that starts at the wrong place cannot be exactly-once."""
    if resume.input_index >= len(context.inputs):
        raise DataError(
            f"invalid PIPELINE_RESUME: inputIndex {resume.input_index} but there are {len(context.inputs)} inputs"
        )
    for output in context.outputs[: resume.input_index]:
        if not os.path.isfile(output):
            raise DataError(f"invalid PIPELINE_RESUME: output {output} of a completed input is missing")
    path = context.inputs[resume.input_index]
    size = os.path.getsize(path)
    if resume.byte_offset > size:
        raise DataError(
            f"invalid PIPELINE_RESUME: byteOffset {resume.byte_offset} is past the end of {path} ({size} bytes)"
        )
    if 0 < resume.byte_offset < size and _byte_at(path, resume.byte_offset - 1) != b"\n":
        raise DataError(f"invalid PIPELINE_RESUME: byteOffset {resume.byte_offset} of {path} is not on a line boundary")
    output = context.outputs[resume.input_index]
    if not os.path.isfile(output) or os.path.getsize(output) < resume.output_bytes:
        raise DataError(f"invalid PIPELINE_RESUME: output {output} is shorter than outputBytes {resume.output_bytes}")


def _byte_at(path: str, offset: int) -> bytes:
    with open(path, "rb", buffering=0) as file:
        file.seek(offset)
        return file.read(1)


def _make_parent_dirs(path: str) -> list[str]:
    """Create the missing folders above `path`; return every folder that gains an entry (the new
    file's, and the parent of each new folder), i.e. the folders to fsync."""
    existing = os.path.dirname(path)
    missing = []
    while not os.path.isdir(existing):
        missing.append(existing)
        existing = os.path.dirname(existing)
    for folder in reversed(missing):
        os.mkdir(folder)
    return missing + [existing]


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _mirror(path: str, input_root: str, output_dir: str) -> str:
    relative = os.path.relpath(path, input_root)
    if relative in (os.curdir, os.pardir) or relative.startswith(os.pardir + os.sep):
        raise UsageError(f"input {path} is not inside PIPELINE_INPUT_ROOT {input_root}")
    return os.path.join(output_dir, relative)


def _read_inputs(env: Mapping[str, str]) -> tuple[str, ...]:
    inline = env.get("PIPELINE_INPUTS")
    listed = env.get("PIPELINE_INPUTS_FILE")
    if inline is not None and listed is not None:
        raise UsageError("set only one of PIPELINE_INPUTS and PIPELINE_INPUTS_FILE")
    if inline is not None:
        source, text = "PIPELINE_INPUTS", inline
    elif listed is not None:
        source = f"PIPELINE_INPUTS_FILE {listed}"
        try:
            with open(listed, encoding="utf-8") as file:
                text = file.read()
        except OSError as err:
            raise UsageError(f"cannot read {source}: {err.strerror}") from None
    else:
        raise UsageError("PIPELINE_INPUTS (or PIPELINE_INPUTS_FILE) is not set")
    value = _json(text, source, UsageError)
    if not isinstance(value, list) or not all(isinstance(path, str) and path for path in value):
        raise UsageError(f"{source} must be a JSON array of file paths")
    return tuple(os.path.abspath(path) for path in value)


def _read_attempt(env: Mapping[str, str]) -> int:
    text = env.get("PIPELINE_ATTEMPT", "1")
    attempt = _count(text)
    if attempt is None or attempt < 1:
        raise UsageError(f"PIPELINE_ATTEMPT must be a positive integer, got {text!r}")
    return attempt


def _read_progress_fd(env: Mapping[str, str]) -> int | None:
    text = env.get("PIPELINE_PROGRESS_FD")
    if not text:
        return None
    fd = _count(text)
    if fd is None:
        raise UsageError(f"PIPELINE_PROGRESS_FD must be a file descriptor number, got {text!r}")
    try:
        os.fstat(fd)
    except OSError:
        raise UsageError(f"PIPELINE_PROGRESS_FD {fd} is not an open file descriptor") from None
    return fd


def _read_fault(env: Mapping[str, str]) -> int | None:
    text = env.get("PIPE_FAULT")
    if not text:
        return None
    count = _count(text.removeprefix(_FAULT_PREFIX)) if text.startswith(_FAULT_PREFIX) else None
    if count is None or count < 1:
        raise UsageError(f"PIPE_FAULT must be '{_FAULT_PREFIX}N' with N >= 1, got {text!r}")
    return count


def _count(text: str) -> int | None:
    """The value of a decimal number of plain ASCII digits, else None."""
    return int(text) if text.isascii() and text.isdigit() else None


def _required(env: Mapping[str, str], name: str) -> str:
    value = env.get(name)
    if not value:
        raise UsageError(f"{name} is not set")
    return value


def _positive_limit(obj: dict[str, Any], key: str, kind: type | tuple[type, ...]) -> Any:
    value = obj.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, kind) or value <= 0:
        raise UsageError(f"PIPELINE_CHECKPOINT: {key!r} must be a positive number, got {value!r}")
    return value


def _json(text: str, source: str, error: type[PipeError]) -> Any:
    try:
        return json.loads(text)
    except ValueError as err:
        raise error(f"{source} is not valid JSON: {err}") from None


def _json_object(text: str, source: str, error: type[PipeError]) -> dict[str, Any]:
    value = _json(text, source, error)
    if not isinstance(value, dict):
        raise error(f"{source} must be a JSON object, got {type(value).__name__}")
    return value


def _fail(name: str, message: str, code: int) -> int:
    print(f"{name}: {' '.join(message.splitlines())}", file=sys.stderr)
    return code
