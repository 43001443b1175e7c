"""The process record `state/processes.jsonl`: a build stops what a killed build left running.

Why these tests exist: a processor dies with `pipe` (parent-death signal), but what it started in
its process group does not. The build appends one line per spawn and per exit to
`state/processes.jsonl`; the next build replays it and stops the process group of every processor
started and not ended, if it is still the same process (pid and start time). The record is written
without fsync and may end with a line torn by the kill: that must not stop the next build. The
whole-file `state/processes.json` of the previous version is still honoured.

Every wait here is on a file or a process state, never a fixed sleep.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess

from blackbox import builtin_stage, pipeline, proc_stage, process_alive, wait_for, wait_for_file

INPUTS = {"input/a.txt": "alpha\n"}


def start_time(pid: int) -> int:
    """Field 22 of /proc/PID/stat: the start time in clock ticks (what pipe records)."""
    text = open(f"/proc/{pid}/stat").read()
    return int(text.rsplit(")", 1)[1].split()[19])


def lines(project, rel: str = "state/processes.jsonl") -> list[dict]:
    return [json.loads(line) for line in project.read(rel).decode().splitlines()]


def test_a_build_stops_what_a_killed_build_left_running_from_the_process_record(make_project):
    spec = pipeline(proc_stage("slow", ["input"], "mid", {"spawnOrphan": "orphan.pid", "block": ["started", "release"], "pidFile": "proc.pid"}))
    project = make_project(spec, files=INPUTS)
    build = project.start("build", "--run-id", "killed")
    wait_for_file(project.path("started"), proc=build)
    wait_for_file(project.path("proc.pid"), proc=build)
    processor = int(project.read("proc.pid"))
    orphan = int(project.read("orphan.pid"))
    try:
        [spawned] = lines(project)
        assert spawned == {"event": "spawned", "stage": "slow", "pid": processor, "startTime": start_time(processor), "runId": "killed"}
        assert not project.exists("state/processes.json"), "the old whole-file record is no longer written"

        os.kill(build.pid, signal.SIGKILL)
        build.wait(timeout=10)
        wait_for(lambda: not process_alive(processor), f"processor {processor} to die with pipe")
        assert process_alive(orphan), "the processor's child outlives pipe: what the record is for"
        assert [line["event"] for line in lines(project)] == ["spawned"]

        project.write("release", "")
        result = project.ok("build", "--run-id", "after")
        assert f"stopped processor pid {processor} of stage `slow` left running by run killed" in result.stderr, str(result)
        wait_for(lambda: not process_alive(orphan), f"the leftover child {orphan} to be stopped")
        takeovers = [r for r in map(json.loads, project.read("state/audit.jsonl").decode().splitlines()) if r["action"] == "lock.takeover"]
        assert [(t["stage"], t["data"]["stoppedPid"], t["data"]["deadRun"]) for t in takeovers] == [("slow", processor, "killed")]
        # The second build's processor started and ended: its record is removed at the end.
        assert project.statuses("after") == {"slow": "succeeded"}
        assert not project.exists("state/processes.jsonl")
    finally:
        for pid in (orphan, processor):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def test_the_record_is_replayed_in_order_and_a_torn_last_line_is_skipped(make_project):
    project = make_project(pipeline(builtin_stage("copy", "copy", ["input"], "out")), files=INPUTS)
    sleepers = {name: subprocess.Popen(["sleep", "120"], start_new_session=True) for name in ("victim", "ended", "stranger", "legacy")}
    try:
        pid = {name: p.pid for name, p in sleepers.items()}
        t = {name: start_time(p) for name, p in pid.items()}
        record = [
            {"event": "spawned", "stage": "a", "pid": pid["victim"], "startTime": t["victim"], "runId": "dead"},
            {"event": "spawned", "stage": "b", "pid": pid["ended"], "startTime": t["ended"], "runId": "dead"},
            {"event": "exited", "pid": pid["ended"], "startTime": t["ended"]},
            # same pid, another process (start time differs): never signalled
            {"event": "spawned", "stage": "c", "pid": pid["stranger"], "startTime": t["stranger"] + 1, "runId": "dead"},
        ]
        text = "".join(json.dumps(line) + "\n" for line in record)
        text += '{"event":"exited","pid":%d,"sta' % pid["victim"]  # torn by the kill: the victim never ended
        project.write("state/processes.jsonl", text)
        project.write("state/processes.json", json.dumps({"old": {"pid": pid["legacy"], "startTime": t["legacy"], "runId": "older"}}))

        result = project.ok("build", "--run-id", "r")
        for name in ("victim", "legacy"):
            wait_for(lambda: sleepers[name].poll() is not None, f"the {name} to be stopped")
            assert sleepers[name].returncode == -signal.SIGKILL
        assert f"stopped processor pid {pid['victim']} of stage `a` left running by run dead" in result.stderr, str(result)
        assert f"stopped processor pid {pid['legacy']} of stage `old` left running by run older" in result.stderr, str(result)
        assert sleepers["ended"].poll() is None and sleepers["stranger"].poll() is None
        assert result.stderr.count("stopped processor pid") == 2, str(result)
        assert not project.exists("state/processes.jsonl") and not project.exists("state/processes.json")
        assert project.statuses("r") == {"copy": "succeeded"}
    finally:
        for p in sleepers.values():
            if p.poll() is None:
                p.kill()
            p.wait(timeout=10)
