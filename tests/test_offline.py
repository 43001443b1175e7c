"""The offline guard (docs/offline.md): static scan, runtime sandbox, hermetic reads, confined writes.

Network rule of this file: the only network targets are loopback sockets (127.0.0.1) that the test
itself binds, and every check happens after the build ended: a TCP connect to loopback completes
its handshake inside connect(), so anything that got through is already queued on the listener.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from blackbox import pipeline, snapshot, snapshot_diff, wait_for_file

# The processors here run a real interpreter named by path: hermetic stages read only what they
# declare plus the interpreter's own installation, and a shim (pyenv) is not that.
PYTHON = os.path.realpath(sys.executable)


@pytest.fixture
def listener():
    """A TCP listener and a UDP socket on 127.0.0.1, owned by the test."""

    class Listener:
        def __init__(self) -> None:
            self.tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            self.tcp.bind(("127.0.0.1", 0))
            self.tcp.listen(8)
            self.tcp.setblocking(False)
            self.udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            self.udp.bind(("127.0.0.1", 0))
            self.udp.setblocking(False)
            self.tcp_port = self.tcp.getsockname()[1]
            self.udp_port = self.udp.getsockname()[1]

        def received(self) -> int:
            n = 0
            while True:
                try:
                    conn, _ = self.tcp.accept()
                    conn.close()
                    n += 1
                except BlockingIOError:
                    break
            while True:
                try:
                    self.udp.recv(64)
                    n += 1
                except BlockingIOError:
                    break
            return n

    box = Listener()
    yield box
    box.tcp.close()
    box.udp.close()


def stage(name: str, script: str, inputs=("input",), output_dir: str = "out", **extra):
    spec = {"name": name, "processor": {"command": [PYTHON, script], "version": "1"}, "inputs": list(inputs), "outputDir": output_dir}
    spec.update(extra)
    return spec


def attempts(project, name: str) -> list[dict]:
    return project.json(f"state/stage_{name}.json")["attempts"]


# ------------------------------------------------------------------------------ runtime: network

NET_PROC = r'''
"""Writes its output, then tries the network the way params say, swallowing every error."""
import importlib, json, os, subprocess, sys
params = json.loads(os.environ["PIPELINE_PARAMS"])
with open(os.path.join(os.environ["PIPELINE_OUTPUT_DIR"], "out.txt"), "w") as f:
    f.write("written before the network attempt\n")
tcp, udp = params["tcp"], params["udp"]
how = params["how"]
try:
    if how == "direct":
        import socket
        s = socket.create_connection(("127.0.0.1", tcp), timeout=5)
        s.close()
    elif how == "udp":
        import socket
        u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        u.sendto(b"x", ("127.0.0.1", udp))
    elif how == "child":
        code = f"import socket; socket.create_connection(('127.0.0.1', {tcp}), timeout=5)"
        subprocess.run([sys.executable, "-c", code], timeout=30)
    elif how == "dynamic":
        sys.path.insert(0, os.getcwd())
        importlib.import_module(params["module"])
except BaseException as err:
    print(f"swallowed: {err!r}", file=sys.stderr)
sys.exit(0)
'''

NET_MODULE = r'''
import json, os, socket
params = json.loads(os.environ["PIPELINE_PARAMS"])
socket.create_connection(("127.0.0.1", params["tcp"]), timeout=5).close()
'''


@pytest.mark.parametrize("how", ["direct", "udp", "child", "dynamic"])
def test_a_network_attempt_fails_the_stage_even_when_swallowed(make_project, listener, how):
    params = {"tcp": listener.tcp_port, "udp": listener.udp_port, "how": how, "module": "netmod"}
    # `direct` and `udp` import socket openly: the stage allows that static finding, so the
    # runtime layers are what stops them. `child` and `dynamic` are invisible to the scan.
    spec = pipeline(
        stage("n", "net.py", params=params, offline={"allowStaticFindings": ["socket"]},
              retry={"maxAttempts": 3, "baseDelayMs": 1, "retryableExitCodes": [0, 75]}),
    )
    project = make_project(spec, files={"input/a.txt": "a\n", "net.py": NET_PROC, "netmod.py": NET_MODULE}, with_proc=False)
    result = project.run("build", "--run-id", "net")
    assert result.returncode == 1, str(result)
    assert listener.received() == 0, "the loopback listener was reached"
    tries = attempts(project, "n")
    assert len(tries) == 1, "a network attempt is not retried"
    assert tries[0]["classification"] == "network"
    assert tries[0]["violations"], tries[0]
    assert tries[0]["sandbox"]["netns"] and tries[0]["sandbox"]["seccomp"] and tries[0]["sandbox"]["landlock"]
    record = project.json("state/stage_n.json")
    assert record["error"].startswith("the sandbox blocked a network access: socket(AF_INET, SOCK_"), record["error"]
    assert "the sandbox blocked a network access" in result.stderr
    assert project.run_record("net")["status"] == "failed"
    assert not project.path("out/out.txt").exists(), "a violating attempt publishes nothing"


UNIX_PROC = r'''
"""Uses what must keep working: AF_UNIX sockets, multiprocessing, the private temp folder."""
import multiprocessing, os, socket, sys, tempfile
a, b = socket.socketpair()
a.sendall(b"ping"); assert b.recv(4) == b"ping"
with multiprocessing.Pool(2) as pool:
    assert pool.map(abs, [-1, -2]) == [1, 2]
with tempfile.NamedTemporaryFile(dir=None) as t:
    assert t.name.startswith(os.environ["TMPDIR"]), t.name
with open(os.path.join(os.environ["PIPELINE_OUTPUT_DIR"], "ok.txt"), "w") as f:
    f.write(os.environ["TMPDIR"])
'''


def test_unix_sockets_multiprocessing_and_the_private_temp_folder_keep_working(make_project):
    spec = pipeline(stage("u", "unix.py", offline={"allowStaticFindings": ["socket"]}))
    project = make_project(spec, files={"input/a.txt": "a\n", "unix.py": UNIX_PROC}, with_proc=False)
    project.ok("build")
    tmpdir = project.read("out/ok.txt").decode()
    assert Path(tmpdir) == project.root / "state" / "tmp" / "u"
    assert not Path(tmpdir).exists(), "the private temp folder is removed after the attempt"


BLOCKING_PROC = r'''
"""Says it started (pid, into its staging folder) and waits for the release file the test makes."""
import json, os, time
params = json.loads(os.environ["PIPELINE_PARAMS"])
out = os.environ["PIPELINE_OUTPUT_DIR"]
with open(os.path.join(out, "pid.tmp"), "w") as f:
    f.write(str(os.getpid()))
os.rename(os.path.join(out, "pid.tmp"), os.path.join(out, "pid"))
deadline = time.monotonic() + 60
while not os.path.exists(params["release"]) and time.monotonic() < deadline:
    time.sleep(0.02)
os.remove(os.path.join(out, "pid"))
'''


def status_fields(pid: int) -> dict[str, str]:
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return dict(line.split(":\t", 1) for line in lines if ":\t" in line)


def test_pipe_and_its_processor_run_under_their_filters_and_the_processor_in_its_own_netns(make_project, tmp_path):
    release = tmp_path / "release"
    spec = pipeline(stage("b", "block.py", params={"release": str(release)}))
    project = make_project(spec, files={"input/a.txt": "a\n", "block.py": BLOCKING_PROC}, with_proc=False)
    build = project.start("build")
    try:
        pid_file = wait_for_file(project.path("out/.pipe-staging/pid"), proc=build)
        processor = int(pid_file.read_text())
        engine = status_fields(build.pid)
        assert engine["Seccomp"].strip() == "2", engine  # pipe filters itself
        confined = status_fields(processor)
        assert confined["Seccomp"].strip() == "2" and int(confined["Seccomp_filters"]) >= 2, confined
        assert confined["NoNewPrivs"].strip() == "1"
        assert os.readlink(f"/proc/{processor}/ns/net") != os.readlink("/proc/self/ns/net")
        assert os.readlink(f"/proc/{build.pid}/ns/net") == os.readlink("/proc/self/ns/net")
    finally:
        release.write_text("")
    result = project.finish(build)
    assert result.returncode == 0, str(result)


# ----------------------------------------------------------------------------------- static scan

ALL_FORMS = '''import os, socket
import ssl as tls
import http.client
from urllib.request import urlopen
from xmlrpc import client
import requests, httpx
import aiohttp
import urllib3
import ftplib, smtplib, poplib, imaplib, telnetlib
import socketserver
import websocket, websockets
import paramiko
m = __import__("socket")
import importlib
n = importlib.import_module("http.client")
import asyncio
asyncio.open_connection("h", 1)
async def f(loop):
    await loop.create_connection(P, "h", 1)
    await loop.create_datagram_endpoint(P)
    await asyncio.start_server(cb)
'''

# (line, column, rule) of every finding in ALL_FORMS.
EXPECTED_FORMS = [
    (1, 12, "socket"), (2, 8, "ssl"), (3, 8, "http"), (4, 6, "urllib"), (5, 6, "xmlrpc"),
    (6, 8, "requests"), (6, 18, "httpx"), (7, 8, "aiohttp"), (8, 8, "urllib3"),
    (9, 8, "ftplib"), (9, 16, "smtplib"), (9, 25, "poplib"), (9, 33, "imaplib"), (9, 42, "telnetlib"),
    (10, 8, "socketserver"), (11, 8, "websocket"), (11, 19, "websockets"), (12, 8, "paramiko"),
    (13, 5, "socket"), (15, 15, "http"), (17, 9, "asyncio"), (19, 16, "asyncio"), (20, 16, "asyncio"),
    (21, 19, "asyncio"),
]

HARMLESS = '''"""Talks about `import socket` and requests.get() but never imports them."""
# import socket
# from http import client
import json, os, urllib.parse
from http import HTTPStatus
text = "import ssl; __import__('socket'); asyncio.open_connection()"
raw = r"from urllib import request"
fmt = f"{len(text)} import httpx {{__import__('paramiko')}}"
doc = """
import aiohttp
"""
def start_server():
    return HTTPStatus.OK
start_server()
'''


def test_check_reports_every_network_import_form_with_its_location(make_project):
    spec = pipeline(stage("s", "scanme.py"))
    project = make_project(spec, files={"input/a.txt": "a\n", "scanme.py": ALL_FORMS}, with_proc=False)
    before = snapshot(project.root)
    result = project.run("check")
    assert result.returncode == 2, str(result)
    found = [line for line in result.stderr.splitlines() if line.startswith("error: scanme.py:")]
    for line, col, rule in EXPECTED_FORMS:
        needle = f"error: scanme.py:{line}:{col}: stage `s`: "
        assert any(l.startswith(needle) and l.endswith(f"(rule `{rule}`)") for l in found), f"{line}:{col} {rule}\n{result.stderr}"
    assert len(found) == len(EXPECTED_FORMS), "\n".join(found)
    assert snapshot_diff(before, snapshot(project.root)) == [], "check writes nothing"


def test_check_accepts_words_in_strings_and_comments(make_project):
    spec = pipeline(stage("s", "harmless.py"))
    project = make_project(spec, files={"input/a.txt": "a\n", "harmless.py": HARMLESS}, with_proc=False)
    result = project.ok("check")
    assert "error" not in result.stderr
    project.ok("build")


def test_a_finding_fails_the_build_before_anything_runs(make_project):
    spec = pipeline(stage("s", "bad.py"))
    project = make_project(spec, files={"input/a.txt": "a\n", "bad.py": "import json\nfrom http import client\n"}, with_proc=False)
    before = snapshot(project.root)
    result = project.run("build")
    assert result.returncode == 2, str(result)
    assert "bad.py:2:18: stage `s`: import of network module `http.client` (rule `http`)" in result.stderr
    assert "allowStaticFindings" in result.stderr  # says how to opt out
    assert snapshot_diff(before, snapshot(project.root)) == [], "nothing ran, nothing was written"


def test_processor_files_and_python_c_code_are_scanned(make_project):
    inline = {"name": "c", "processor": {"command": ["python3", "-c", "import os\nimport ftplib"], "version": "1"}, "inputs": ["input"], "outputDir": "c"}
    files_stage = stage("f", "main.py", output_dir="f")
    files_stage["processor"]["files"] = ["lib"]
    spec = pipeline(inline, files_stage)
    project = make_project(spec, files={"input/a.txt": "a\n", "main.py": "import helper\n", "lib/helper.py": "\n\nimport smtplib\n"}, with_proc=False)
    result = project.run("check")
    assert result.returncode == 2, str(result)
    assert "(processor.command[2]):2:8: stage `c`: import of network module `ftplib` (rule `ftplib`)" in result.stderr
    assert "lib/helper.py:3:8: stage `f`: import of network module `smtplib` (rule `smtplib`)" in result.stderr


def test_an_allowed_finding_is_reported_and_the_build_runs(make_project):
    spec = pipeline(stage("s", "ok.py", offline={"allowStaticFindings": ["http"]}))
    script = "import os\nimport http.client  # only for HTTPStatus-like constants\nopen(os.path.join(os.environ['PIPELINE_OUTPUT_DIR'], 'x'), 'w').close()\n"
    project = make_project(spec, files={"input/a.txt": "a\n", "ok.py": script}, with_proc=False)
    result = project.ok("build", "--message-format", "json")
    events = [json.loads(l) for l in result.stdout.splitlines() if l.startswith("{")]
    finding = [e for e in events if e.get("event") == "offlineFinding"]
    assert finding and finding[0]["allowed"] is True and finding[0]["rule"] == "http" and (finding[0]["line"], finding[0]["column"]) == (2, 8)
    assert "allowed by the stage's `offline.allowStaticFindings`" in result.stderr
    records = [json.loads(l) for l in project.read("state/audit.jsonl").decode().splitlines()]
    offline = [r["data"] for r in records if r["action"] == "run.offline"]
    assert len(offline) == 1 and offline[0]["guard"] == "strict", offline
    assert [(f["stage"], f["file"], f["line"], f["rule"]) for f in offline[0]["allowedStaticFindings"]] == [("s", "ok.py", 2, "http")]


def test_an_unknown_rule_in_the_allow_list_is_a_located_error(make_project):
    spec = pipeline(stage("s", "ok.py", offline={"allowStaticFindings": ["sockets"]}))
    project = make_project(spec, files={"input/a.txt": "a\n", "ok.py": "pass\n"}, with_proc=False)
    result = project.run("check")
    assert result.returncode == 2
    assert "Pipefile.json:" in result.stderr and "unknown static-scan rule `sockets`" in result.stderr


# -------------------------------------------------------------------------------- hermetic reads

READER = r'''
import os
with open("secret.txt") as f:
    data = f.read()
with open(os.path.join(os.environ["PIPELINE_OUTPUT_DIR"], "copy.txt"), "w") as f:
    f.write(data)
'''


def test_a_hermetic_stage_reading_an_undeclared_file_fails_with_a_clear_message(make_project):
    spec = pipeline(stage("h", "reader.py", hermetic=True))
    project = make_project(spec, files={"input/a.txt": "a\n", "secret.txt": "s1\n", "reader.py": READER}, with_proc=False)
    result = project.run("build")
    assert result.returncode == 1, str(result)
    message = project.json("state/stage_h.json")["error"]
    assert "stage `h` is hermetic" in message and "`secret.txt`, which is not a declared input" in message, message
    assert "add \"secret.txt\" to the stage's `inputs`" in message
    assert attempts(project, "h")[0]["sandbox"]["hermetic"] is True
    # Not hermetic: the same read is allowed (the default reads anything).
    project.write_pipefile(pipeline(stage("h", "reader.py")))
    project.ok("build")


def test_declared_the_file_is_readable_and_part_of_the_fingerprint(make_project):
    spec = pipeline(stage("h", "reader.py", inputs=["input", "secret.txt"], hermetic=True))
    project = make_project(spec, files={"input/a.txt": "a\n", "secret.txt": "s1\n", "reader.py": READER}, with_proc=False)
    project.ok("build")
    assert project.read("out/copy.txt") == b"s1\n"
    project.ok("build", "--run-id", "again")
    assert project.statuses("again") == {"h": "skipped"}
    project.write("secret.txt", "s2\n")
    plan = project.ok("build", "--dry-run")
    assert "h: run" in plan.stdout and "secret.txt" in plan.stdout, plan.stdout
    project.ok("build")
    assert project.read("out/copy.txt") == b"s2\n"


# -------------------------------------------------------------------------------- confined writes

WRITER = r'''
import json, os
target = json.loads(os.environ["PIPELINE_PARAMS"])["target"]
target = target.replace("$TMPDIR", os.environ["TMPDIR"])
os.makedirs(os.path.dirname(os.path.abspath(target)), exist_ok=True)
with open(target, "w") as f:
    f.write("escaped\n")
open(os.path.join(os.environ["PIPELINE_OUTPUT_DIR"], "done"), "w").close()
'''


@pytest.mark.parametrize("target", ["escape.txt", "input/new.txt", "newdir/x.txt", "../outside.txt", "ABS"])
def test_a_processor_writing_outside_its_staging_folder_fails_and_creates_nothing(make_project, tmp_path, target):
    if target == "ABS":
        target = str(tmp_path / "elsewhere" / "abs.txt")
        (tmp_path / "elsewhere").mkdir()
    spec = pipeline(stage("w", "writer.py", params={"target": target}))
    project = make_project(spec, files={"input/a.txt": "a\n", "writer.py": WRITER}, with_proc=False)
    outside_before = snapshot(tmp_path)
    result = project.run("build")
    assert result.returncode == 1, str(result)
    assert "Permission denied" in project.json("state/stage_w.json")["error"]
    pipes_own = ("proj/state", "proj/cache", "proj/locks", "proj/out")  # pipe's, not the processor's
    changed = [d for d in snapshot_diff(outside_before, snapshot(tmp_path))
               if not any(f" {own}/" in d or d.endswith(f" {own}") for own in pipes_own)]
    assert changed == [], changed
    assert not project.path("out/done").exists()


def test_the_staging_and_temp_folders_are_writable(make_project):
    spec = pipeline(stage("w", "writer.py", params={"target": "$TMPDIR/sub/scratch.txt"}))
    project = make_project(spec, files={"input/a.txt": "a\n", "writer.py": WRITER}, with_proc=False)
    project.ok("build")
    assert project.path("out/done").exists()


# ------------------------------------------------------------------------------------ environment

ENV_DUMP = r'''
import json, os
with open(os.path.join(os.environ["PIPELINE_OUTPUT_DIR"], "env.json"), "w") as f:
    json.dump(dict(os.environ), f)
'''


def test_the_environment_is_an_allowlist_without_proxies(make_project):
    spec = pipeline(stage("e", "env.py"))
    project = make_project(spec, files={"input/a.txt": "a\n", "env.py": ENV_DUMP}, with_proc=False)
    secrets = {"HTTPS_PROXY": "http://127.0.0.1:9", "http_proxy": "http://127.0.0.1:9", "ALL_PROXY": "x", "no_proxy": "*", "AWS_SECRET_ACCESS_KEY": "k", "PIPELINE_RESUME": "{}"}
    project.ok("build", env={**secrets, "LC_ALL": "C.UTF-8"})
    env = project.json("out/env.json")
    for name in secrets:
        assert name not in env, name
    assert env["LC_ALL"] == "C.UTF-8" and env["PATH"] == os.environ["PATH"]
    assert env["TMPDIR"] == str(project.root / "state" / "tmp" / "e")
    assert env["PIPELINE_STAGE"] == "e" and env["PIPELINE_PROGRESS_FD"] == "3"


# -------------------------------------------------------------------------------- debugging, check

CONNECT_FIRST = r'''
import json, os, socket
socket.create_connection(("127.0.0.1", json.loads(os.environ["PIPELINE_PARAMS"])["tcp"]), timeout=5)
'''


def test_sandbox_debug_prints_a_command_that_reproduces_the_failure(make_project, listener):
    spec = pipeline(stage("d", "connect.py", params={"tcp": listener.tcp_port}, offline={"allowStaticFindings": ["socket"]}))
    project = make_project(spec, files={"input/a.txt": "a\n", "connect.py": CONNECT_FIRST}, with_proc=False)
    result = project.run("build", "--sandbox-debug")
    assert result.returncode == 1, str(result)
    prefix = "warning: sandbox-debug: `d` attempt 1 runs: "
    command = next(l[len(prefix):] for l in result.stderr.splitlines() if l.startswith(prefix))
    words = shlex.split(command)
    assert words[:3] == ["cd", str(project.root), "&&"] and words[3:5] == ["env", "-i"]
    assert "__exec" in words and words[-3:] == [PYTHON, "connect.py", "3>/dev/null"]
    # By hand (no engine on fd 4) the filter kills the network attempt with SIGSYS.
    by_hand = subprocess.run(["bash", "-c", command], capture_output=True, timeout=60)
    assert by_hand.returncode == 128 + signal.SIGSYS, by_hand
    assert listener.received() == 0


def test_check_sandbox_proves_every_layer_against_its_own_loopback_listener(make_project):
    project = make_project(pipeline(stage("s", "ok.py")), files={"input/a.txt": "a\n", "ok.py": "pass\n"}, with_proc=False)
    before = snapshot(project.root)
    result = project.run("check", "--sandbox")
    assert result.returncode == 0, str(result)
    for line in ["sandbox: engine: ok", "sandbox: netns: ok", "sandbox: seccomp: ok", "sandbox: landlock: ok", "sandbox: all: ok",
                 "sandbox: listener: ok: received no connection and no datagram", "sandbox: ok"]:
        assert line in result.stderr, f"{line}\n{result.stderr}"
    assert "FAILED" not in result.stderr and "REACHED" not in result.stderr
    assert snapshot_diff(before, snapshot(project.root)) == [], "check writes nothing"
