"""The shipped examples build, and the built-in processors stream correctly in constant memory."""

import json
import os
import random
import resource
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PIPE = os.environ.get("PIPE_BIN", str(REPO / "target" / "debug" / "pipe"))
sys.path.insert(0, str(REPO / "processors" / "python"))


def run_pipe(args, cwd, env=None, timeout=120):
    full_env = dict(os.environ, NO_COLOR="1", **(env or {}))
    return subprocess.run([PIPE, *args], cwd=cwd, env=full_env, capture_output=True, timeout=timeout)


def example_dirs():
    return sorted(p.parent for p in (REPO / "examples").glob("*/Pipefile.json"))


@pytest.mark.parametrize("example", example_dirs(), ids=lambda p: p.name)
def test_every_example_checks_and_builds_twice(tmp_path, example):
    # Copy the example with the processors it references (../../processors), keeping the layout.
    root = tmp_path / "repo"
    shutil.copytree(REPO / "processors" / "python", root / "processors" / "python")
    project = root / "examples" / example.name
    shutil.copytree(example, project)
    assert run_pipe(["check"], project).returncode == 0
    first = run_pipe(["build"], project)
    assert first.returncode == 0, first.stderr.decode()
    second = run_pipe(["--message-format", "json", "build"], project)
    assert second.returncode == 0, second.stderr.decode()
    events = [json.loads(line) for line in second.stdout.decode().splitlines()]
    finished = [e for e in events if e["event"] == "stageFinished"]
    assert finished and all(e["status"] == "skipped" for e in finished)


def processor_env(inputs, root, out, params=None):
    return {
        "PIPELINE_INPUTS": json.dumps([str(p) for p in inputs]),
        "PIPELINE_INPUT_ROOT": str(root),
        "PIPELINE_OUTPUT_DIR": str(out),
        "PIPELINE_PARAMS": json.dumps(params or {}),
    }


def test_builtin_upper_matches_python_str_upper(tmp_path):
    rng = random.Random(7)
    alphabet = "abcxyz ßéèñøåæœ ǆ ﬁ ΐ σς ĳ istanbul İı 123\t"
    lines = ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 80))) for _ in range(3000)]
    text = "\n".join(lines) + "\n"
    (tmp_path / "in").mkdir()
    src = tmp_path / "in" / "mixed.txt"
    src.write_text(text, encoding="utf-8")
    out = tmp_path / "out"
    out.mkdir()
    r = run_pipe(["processor", "upper"], tmp_path, processor_env([src], tmp_path / "in", out))
    assert r.returncode == 0, r.stderr.decode()
    assert (out / "mixed.txt").read_text(encoding="utf-8") == text.upper()


def test_builtin_upper_ascii_mode_is_bytes_upper(tmp_path):
    data = bytes(range(256)) * 40 + b"\nstra\xc3\x9fe\n"
    (tmp_path / "in").mkdir()
    src = tmp_path / "in" / "bin.dat"
    src.write_bytes(data)
    out = tmp_path / "out"
    out.mkdir()
    r = run_pipe(["processor", "upper"], tmp_path, processor_env([src], tmp_path / "in", out, {"mode": "ascii"}))
    assert r.returncode == 0, r.stderr.decode()
    assert (out / "bin.dat").read_bytes() == data.upper()


def test_builtin_upper_rejects_invalid_utf8_with_file_and_offset(tmp_path):
    (tmp_path / "in").mkdir()
    src = tmp_path / "in" / "bad.txt"
    src.write_bytes(b"fine line\nbad \xff byte\n")
    out = tmp_path / "out"
    out.mkdir()
    r = run_pipe(["processor", "upper"], tmp_path, processor_env([src], tmp_path / "in", out))
    assert r.returncode == 65
    err = r.stderr.decode()
    assert "bad.txt" in err and "byte offset 14" in err, err


def peak_rss_kb_of(args, cwd, env):
    """Peak RSS of one child, measured by running it under a fresh Python that reports its
    RUSAGE_CHILDREN (so earlier children of this test process do not count)."""
    code = (
        "import resource, subprocess, sys, os, json;"
        "r = subprocess.run(json.loads(sys.argv[1]), env=dict(os.environ, **json.loads(sys.argv[2])));"
        "print(r.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, json.dumps(args), json.dumps(env)], cwd=cwd, capture_output=True, timeout=300
    )
    rc, rss = out.stdout.decode().split()
    assert rc == "0", out.stderr.decode()
    return int(rss)


@pytest.mark.parametrize("mode", ["unicode", "ascii"])
def test_builtin_upper_streams_in_constant_memory(tmp_path, mode):
    """A 1 MiB and a 96 MiB input need about the same memory: the processor streams."""
    rss = {}
    for size_mb in (1, 96):
        root = tmp_path / f"in{size_mb}"
        root.mkdir()
        src = root / "data.txt"
        line = "straße café naïve alpha beta gamma\n".encode()
        with open(src, "wb") as f:
            for _ in range((size_mb << 20) // len(line) + 1):
                f.write(line)
        out = tmp_path / f"out{size_mb}"
        out.mkdir()
        rss[size_mb] = peak_rss_kb_of([PIPE, "processor", "upper"], tmp_path, processor_env([src], root, out, {"mode": mode}))
        # ß → SS and é → É keep the UTF-8 length, so the output is exactly as long as the input.
        assert (out / "data.txt").stat().st_size == src.stat().st_size
    # Streaming: the big input may not cost more than a few MiB over the small one.
    assert rss[96] < rss[1] + 8 * 1024, rss
