"""The Python reference processors, run by the engine, give the same bytes as the built-ins.

Why this test exists: `stage_upper.py` / `stage_copy.py` are documented as the Python twins of the
built-in `upper` / `copy`; a user switching between them must get identical outputs (including
full Unicode case mapping, ASCII mode on non-UTF-8 bytes, CRLF, a missing final newline, empty
files and nested paths).
"""

from __future__ import annotations

import shutil

import pytest

from blackbox import PY_PROCESSORS, pipeline

UNICODE_TEXT = (
    "straße café naïve ﬁne ǆungla ΐ σς ĳssel istanbul İı ŉ և ﬀ ﬃ ᾳ\n"
    "the quick brown fox jumps over the lazy dog\n"
    "crlf line\r\n"
    "Ünïcödé ÆØÅ æøå œ ÿ\n"
    "no final newline ß"
)
FILES = {
    "input/unicode.txt": UNICODE_TEXT,
    "input/nested/deeper/ascii.txt": "plain ascii text\nsecond line\n",
    "input/empty.txt": "",
}
BINARY = {"input/raw.bin": b"bytes \xff\xfe\x00 stra\xc3\x9fe \xe2\x82 cut\nmore\r\n\x80"}


def outputs(project, folder: str) -> dict[str, bytes]:
    root = project.path(folder)
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file() and not p.name.startswith(".")}


@pytest.mark.parametrize(
    "builtin,script,params,files",
    [
        ("upper", "stage_upper.py", {}, FILES),
        ("upper", "stage_upper.py", {"mode": "unicode"}, FILES),
        ("upper", "stage_upper.py", {"mode": "ascii"}, {**FILES, **BINARY}),
        ("copy", "stage_copy.py", None, {**FILES, **BINARY}),
    ],
    ids=["upper-default", "upper-unicode", "upper-ascii", "copy"],
)
def test_python_processor_matches_the_builtin(make_project, builtin, script, params, files):
    extra = {"params": params} if params is not None else {}
    spec = pipeline(
        {"name": "native", "processor": {"builtin": builtin, "version": "1"}, "inputs": ["input"], "outputDir": "out_native", **extra},
        {
            "name": "python",
            "processor": {"command": ["python3", f"py/{script}"], "version": "1", "files": ["py/pipe_sdk.py"]},
            "inputs": ["input"],
            "outputDir": "out_python",
            **extra,
        },
    )
    project = make_project(spec, files=files, with_proc=False)
    shutil.copytree(PY_PROCESSORS, project.path("py"), ignore=shutil.ignore_patterns("__pycache__"))
    project.ok("build", "--run-id", "r")
    assert project.statuses("r") == {"native": "succeeded", "python": "succeeded"}

    native, python = outputs(project, "out_native"), outputs(project, "out_python")
    assert set(native) == {rel.removeprefix("input/") for rel in files}
    assert python == native
    if builtin == "upper" and params != {"mode": "ascii"}:
        assert native["unicode.txt"] == UNICODE_TEXT.upper().encode()
        assert b"STRASSE" in native["unicode.txt"]
    elif builtin == "upper":
        assert native["raw.bin"] == BINARY["input/raw.bin"].upper()
        assert native["unicode.txt"] == UNICODE_TEXT.encode().upper()
    else:
        assert native["raw.bin"] == BINARY["input/raw.bin"]
