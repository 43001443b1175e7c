"""Fixtures of the black-box suite: the real `pipe` binary, run on real files in temp folders.

The binary is $PIPE_BIN if set, else <repo>/target/debug/pipe; it is never built from here (run
`cargo build` first). Helpers live in blackbox.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from blackbox import PROC_PY, Project, copy_demo, pipe_binary


@pytest.fixture(scope="session")
def pipe_bin() -> Path:
    binary = pipe_binary()
    if not binary.is_file():
        pytest.fail(
            f"the pipe binary {binary} does not exist: run `cargo build` in the repository first "
            "(or set PIPE_BIN to the binary to test)",
            pytrace=False,
        )
    return binary


@pytest.fixture
def make_project(tmp_path: Path, pipe_bin: Path):
    """Factory: `make_project(spec=None, files=None, demo=False, name="proj")` -> Project.

    `spec` is a dict (written as JSON) or the literal Pipefile text; `demo=True` copies the
    repository's Pipefile.json and input/; `files` maps relative paths to text or bytes. Every
    project gets the test processor `proc.py`. Background `pipe` processes are killed at teardown.
    """
    made: list[Project] = []

    def make(spec=None, files=None, demo=False, name="proj", with_proc=True) -> Project:
        root = tmp_path / name
        root.mkdir(parents=True)
        project = Project(root, pipe_bin)
        if demo:
            copy_demo(root)
        if with_proc:
            project.write("proc.py", PROC_PY)
        for rel, data in (files or {}).items():
            project.write(rel, data)
        if spec is not None:
            project.write_pipefile(spec)
        made.append(project)
        return project

    yield make
    for project in made:
        project.cleanup()


@pytest.fixture
def demo(make_project) -> Project:
    """A copy of the repository's demo pipeline (no proc.py, so the tree is exactly the demo's)."""
    return make_project(demo=True, with_proc=False)
