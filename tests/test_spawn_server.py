"""The spawn server (`pipe __zygote`): one small process per build forks every processor attempt.

Why these tests exist: a build of many short stages spent most of its CPU starting a fresh
`pipe __exec` per attempt; the server forks them instead (docs/offline.md). What users depend on
must not change: every processor is still confined (a network namespace of its own for any
processor that is not a built-in), a killed build still takes its processors along, and the
server does not outlive its build. Every wait is on a file or a process state.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path

import pytest

from blackbox import base_env, pipe_binary, process_alive, wait_for, wait_for_file

from test_lock_and_interrupt import blocking_project, start_blocked_build


def parent_of(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[1])


def cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def shell_stage(name: str, script: str) -> dict:
    return {
        "name": name,
        "processor": {"command": ["/bin/sh", "-c", script], "version": "1"},
        "inputs": ["input/a.txt"],
        "outputDir": f"out-{name}",
    }


WHO = (
    'echo "$PPID" > "$PIPELINE_OUTPUT_DIR/ppid"; '
    'tr "\\0" " " < "/proc/$PPID/cmdline" > "$PIPELINE_OUTPUT_DIR/parent"; '
    'readlink /proc/self/ns/net > "$PIPELINE_OUTPUT_DIR/netns"'
)


def test_the_processors_of_a_build_are_forked_by_one_server_that_ends_with_the_build(make_project):
    project = make_project(
        spec={"version": 1, "stages": [shell_stage("one", WHO), shell_stage("two", WHO)]},
        files={"input/a.txt": "a\n"},
    )
    project.ok("build", "--run-id", "r")
    read = lambda stage, name: project.read(f"out-{stage}/{name}").decode().strip()  # noqa: E731
    server = int(read("one", "ppid"))
    assert int(read("two", "ppid")) == server, "both processors have the same parent"
    assert " __zygote" in read("one", "parent"), read("one", "parent")
    # A processor that is not a built-in gets a network namespace of its own: not the other
    # processor's, not this test's. (The server's cannot be read from inside: Landlock denies a
    # confined process ptrace-level access to processes outside its domain.)
    mine = os.readlink("/proc/self/ns/net")
    spaces = {read("one", "netns"), read("two", "netns"), mine}
    assert len(spaces) == 3, spaces
    assert all(s.startswith("net:[") for s in spaces), spaces
    # The server ended with the build.
    assert "__zygote" not in cmdline(server)


def test_a_killed_build_takes_the_server_and_its_processor_along(make_project):
    project = blocking_project(make_project)
    build, processor = start_blocked_build(project, "first")
    server = parent_of(processor)
    assert server != build.pid and " __zygote" in cmdline(server), cmdline(server)

    os.kill(build.pid, signal.SIGKILL)
    build.wait(timeout=10)
    wait_for(lambda: not process_alive(processor), f"processor {processor} to die with pipe", timeout=10)
    wait_for(lambda: "__zygote" not in cmdline(server), f"spawn server {server} to end", timeout=10)


def test_a_spawn_server_killed_mid_stage_ends_the_attempt_as_killed_and_the_next_build_finishes(make_project):
    # The engine learns a forked processor's end only from the server. With the server gone
    # (its processor goes too, by its parent-death signal), the attempt must end as killed by a
    # signal, never as a success, and the build must not hang; the next build starts a new server.
    project = blocking_project(make_project)
    build, processor = start_blocked_build(project, "first")
    server = parent_of(processor)
    assert " __zygote" in cmdline(server), cmdline(server)

    os.kill(server, signal.SIGKILL)
    wait_for(lambda: not process_alive(processor), f"processor {processor} to die with the server", timeout=10)
    _, stderr = build.communicate(timeout=60)
    assert build.returncode == 1, stderr
    attempt = project.stage_record("slow")["attempts"][-1]
    assert attempt["classification"] == "signal" and attempt["signal"] == signal.SIGKILL, attempt
    assert project.run_record("first")["status"] == "failed"

    project.path("release").write_text("go")
    project.ok("build", "--run-id", "second")
    assert project.stage_record("slow")["status"] in ("succeeded", "resumed")
    assert project.exists("out")


def test_built_in_processors_share_the_servers_network_namespace_as_root(make_project):
    project = make_project(
        spec={"version": 1, "stages": [
            {"name": "up", "processor": {"builtin": "upper", "version": "1"}, "inputs": ["input/a.txt"], "outputDir": "out"},
        ]},
        files={"input/a.txt": "a\n"},
    )
    project.ok("build", "--run-id", "r")
    sandbox = project.stage_record("up")["attempts"][0]["sandbox"]
    assert sandbox["netns"] is True and sandbox["seccomp"] is True, sandbox
    shared = any("shared with the build's other built-in processors" in n for n in sandbox.get("notes", []))
    assert shared == (os.geteuid() == 0), sandbox
    assert project.read("out/a.txt") == b"A\n"


OFF = {"PIPE_SPAWN_SERVER": "off"}


def test_with_the_server_off_every_processor_is_posix_spawned_by_pipe_itself(make_project):
    # The fallback path (also taken when the server cannot be started), chosen on purpose: no
    # server, each processor a child of the build, each with a network namespace of its own, the
    # built-ins' too (nothing is shared without the server).
    project = make_project(
        spec={"version": 1, "stages": [
            shell_stage("one", WHO), shell_stage("two", WHO),
            {"name": "up", "processor": {"builtin": "upper", "version": "1"}, "inputs": ["input/a.txt"], "outputDir": "out"},
        ]},
        files={"input/a.txt": "a\n"},
    )
    build = project.start("build", "--run-id", "r", env=OFF)
    _, stderr = build.communicate(timeout=60)
    assert build.returncode == 0, stderr
    read = lambda stage, name: project.read(f"out-{stage}/{name}").decode().strip()  # noqa: E731
    for stage in ("one", "two"):
        assert int(read(stage, "ppid")) == build.pid, (stage, read(stage, "ppid"), build.pid)
        assert "__zygote" not in read(stage, "parent") and " build" in read(stage, "parent"), read(stage, "parent")
    spaces = {read("one", "netns"), read("two", "netns"), os.readlink("/proc/self/ns/net")}
    assert len(spaces) == 3, spaces
    sandbox = project.stage_record("up")["attempts"][0]["sandbox"]
    assert sandbox["netns"] is True and sandbox["seccomp"] is True, sandbox
    assert not any("shared" in n for n in sandbox.get("notes", [])), sandbox
    assert project.read("out/a.txt") == b"A\n"


def test_with_the_server_off_a_killed_build_still_takes_its_processor_along(make_project):
    project = blocking_project(make_project)
    build = project.start("build", "--run-id", "first", env=OFF)
    wait_for_file(project.path("started"), proc=build)
    wait_for_file(project.path("proc.pid"), proc=build)
    processor = int(project.path("proc.pid").read_text())
    # The processor is the helper's pid (it execs): posix_spawned by the build itself.
    assert parent_of(processor) == build.pid, (parent_of(processor), build.pid)

    os.kill(build.pid, signal.SIGKILL)
    build.wait(timeout=10)
    wait_for(lambda: not process_alive(processor), f"processor {processor} to die with pipe", timeout=10)


def test_a_misspelt_switch_warns_and_keeps_the_server(make_project):
    project = make_project(
        spec={"version": 1, "stages": [shell_stage("one", WHO)]},
        files={"input/a.txt": "a\n"},
    )
    result = project.ok("build", "--run-id", "r", env={"PIPE_SPAWN_SERVER": "of"})
    assert "PIPE_SPAWN_SERVER=of is neither `on` nor `off`" in result.stderr, str(result)
    assert " __zygote" in project.read("out-one/parent").decode()


NOBODY = 65534


def test_without_root_every_processor_makes_its_own_namespaces_under_the_server(tmp_path):
    # The non-root path, run as `nobody` (setpriv) when the tests run as root: the server makes
    # no namespace, and each forked processor enters a user namespace and a network namespace of
    # its own, as a posix_spawned helper did.
    setpriv = shutil.which("setpriv")
    if os.geteuid() != 0 or setpriv is None:
        pytest.skip("needs root (to become nobody) and setpriv")
    root = Path(tempfile.mkdtemp(prefix="pipe-nobody-"))
    try:
        (root / "input").mkdir()
        (root / "input" / "a.txt").write_text("a\n")
        (root / "Pipefile.json").write_text(json.dumps({"version": 1, "stages": [
            {"name": "up", "processor": {"builtin": "upper", "version": "1"}, "inputs": ["input"], "outputDir": "out"},
            shell_stage("sh", 'readlink /proc/self/ns/net > "$PIPELINE_OUTPUT_DIR/netns"; '
                              'tr "\\0" " " < "/proc/$PPID/cmdline" > "$PIPELINE_OUTPUT_DIR/parent"'),
        ]}))
        for path in [root, *root.rglob("*")]:
            os.chown(path, NOBODY, NOBODY)
        result = subprocess.run(
            [setpriv, f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", str(pipe_binary()), "build"],
            cwd=root, env=base_env({"HOME": str(root)}), capture_output=True, text=True, timeout=120,
        )
        assert result.returncode == 0, result.stderr
        assert (root / "out" / "a.txt").read_text() == "A\n"
        for stage in ("up", "sh"):
            sandbox = json.loads((root / "state" / f"stage_{stage}.json").read_text())["attempts"][0]["sandbox"]
            assert sandbox["netns"] and sandbox["seccomp"], sandbox
            notes = sandbox.get("notes", [])
            assert "network namespace inside a user namespace" in notes, sandbox
            assert not any("shared" in n for n in notes), sandbox
        assert (root / "out-sh" / "netns").read_text().strip() != os.readlink("/proc/self/ns/net")
        assert " __zygote" in (root / "out-sh" / "parent").read_text(), "forked by the server"
    finally:
        shutil.rmtree(root, ignore_errors=True)


# --- which binary serves: `pipe-spawn` beside `pipe`, else `pipe __zygote` ------------------------

UPPER_STAGE = {"name": "up", "processor": {"builtin": "upper", "version": "1"}, "inputs": ["input/a.txt"], "outputDir": "out-up"}


def server_project(make_project):
    return make_project(
        spec={"version": 1, "stages": [shell_stage("one", WHO), UPPER_STAGE]},
        files={"input/a.txt": "abc\n"},
    )


def pipe_alone(tmp_path: Path) -> Path:
    """The binary under test, linked (or copied) into a folder of its own: no `pipe-spawn` beside it."""
    folder = tmp_path / "alone"
    folder.mkdir()
    alone = folder / "pipe"
    try:
        os.link(pipe_binary(), alone)
    except OSError:
        shutil.copy2(pipe_binary(), alone)
    return alone


def served_by(project) -> str:
    return project.read("out-one/parent").decode().strip()


def test_the_server_is_the_pipe_spawn_binary_beside_pipe(make_project):
    project = server_project(make_project)
    project.ok("build")
    pipe = os.path.realpath(pipe_binary())
    spawn = os.path.join(os.path.dirname(pipe), "pipe-spawn")
    assert served_by(project).startswith(f"{spawn} __zygote --engine {pipe} --build-id "), served_by(project)
    # The built-in ran in the server's child, which was told which binary is the engine's.
    assert project.read("out-up/a.txt") == b"ABC\n"
    assert project.stage_record("up")["attempts"][0]["sandbox"]["seccomp"]


def test_without_pipe_spawn_beside_it_pipe_serves_itself(make_project, tmp_path):
    project = server_project(make_project)
    project.binary = pipe_alone(tmp_path)
    project.ok("build")
    me = str(project.binary)
    assert served_by(project).startswith(f"{me} __zygote --engine {me} --build-id "), served_by(project)
    assert project.read("out-up/a.txt") == b"ABC\n"


def served_by_pipe_itself_after(make_project, tmp_path, script: str) -> str:
    """Builds with `pipe` alone beside a `pipe-spawn` running `script` (`{tried}`: a file it may
    write); asserts that the build ran, served by `pipe __zygote`; returns what `script` wrote."""
    project = server_project(make_project)
    project.binary = pipe_alone(tmp_path)
    tried = tmp_path / "tried"
    wrapper = project.binary.parent / "pipe-spawn"
    wrapper.write_text("#!/bin/sh\n" + script.format(tried=tried))
    wrapper.chmod(0o755)
    project.ok("build")
    assert served_by(project).startswith(f"{project.binary} __zygote "), served_by(project)
    assert project.read("out-up/a.txt") == b"ABC\n"
    return tried.read_text() if tried.exists() else ""


def test_a_pipe_spawn_of_other_sources_is_refused_and_pipe_serves_itself(make_project, tmp_path):
    # The real pipe-spawn, handed another build id (as a pipe-spawn left from another install
    # would have): it must refuse, and the build must still run, served by pipe itself.
    real = os.path.join(os.path.dirname(os.path.realpath(pipe_binary())), "pipe-spawn")
    script = 'echo "$@" >> {tried}\nexec ' + real + ' "$1" "$2" "$3" "$4" 0000000000000000\n'
    tried = served_by_pipe_itself_after(make_project, tmp_path, script)
    assert "__zygote --engine" in tried, "the pipe-spawn beside pipe was tried first"


def test_a_pipe_spawn_that_is_no_spawn_server_is_passed_over(make_project, tmp_path):
    tried = served_by_pipe_itself_after(make_project, tmp_path, "echo tried > {tried}\nexit 0\n")
    assert tried == "tried\n", "it was tried"


def test_pipe_spawn_run_by_hand_says_what_it_is_and_refuses():
    spawn = os.path.join(os.path.dirname(os.path.realpath(pipe_binary())), "pipe-spawn")
    alone = subprocess.run([spawn], env=base_env(), capture_output=True, text=True, timeout=60)
    assert alone.returncode == 2
    assert "the spawn server of `pipe build`" in alone.stderr, alone.stderr
    usage = subprocess.run([spawn, "__zygote"], env=base_env(), capture_output=True, text=True, timeout=60)
    assert usage.returncode == 2
    assert "usage: __zygote --engine PIPE --build-id ID" in usage.stderr, usage.stderr
    other = subprocess.run([spawn, "__zygote", "--engine", "/bin/true", "--build-id", "0"], env=base_env(),
                           capture_output=True, text=True, timeout=60)
    assert (other.returncode, other.stderr) == (3, ""), "another build's engine is refused without a word"
