"""The tamper-evident audit log: `state/audit.jsonl`, `state/audit.head`, `pipe audit verify|show`.

Why these tests exist: weeks after a build, a user must be able to show what ran, with what inputs,
producing what, and whether anyone altered that record. So: the chain verifies after ordinary
builds, cleans and failures; every kind of tampering (an edited byte, a deleted, swapped or appended
line, a truncated tail, a whole re-hashed forgery) is caught with exit 1 naming the right record,
using the head the user kept elsewhere or a key held outside the workspace where hashes alone cannot
tell; a crash between an append and the head update is not mistaken for tampering; and two builds
cannot interleave their records. The tampering here is done the way a forger would: Python
recomputes the hashes from the documented canonical form (docs/audit.md), which also checks that the
documented form is the one pipe uses.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import re

import pytest

from blackbox import builtin_stage, pipeline, proc_stage, wait_for_file

INPUTS = {"input/a.txt": "alpha\n", "input/b.txt": "beta\n"}
GENESIS = "0" * 64
HEAD_LINE = re.compile(r"^audit head: (\d+):([0-9a-f]{64})$", re.M)


def canonical(record: dict) -> bytes:
    """docs/audit.md: the record without hash/hmac, keys sorted, compact, UTF-8."""
    body = {k: v for k, v in record.items() if k not in ("hash", "hmac")}
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def line_of(record: dict) -> str:
    return json.dumps(record, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def records(project) -> list[dict]:
    return [json.loads(line) for line in project.read("state/audit.jsonl").decode().splitlines()]


def write_records(project, recs: list[dict]) -> None:
    project.write("state/audit.jsonl", "".join(line_of(r) + "\n" for r in recs))


def rehash(recs: list[dict], key: bytes | None = None) -> list[dict]:
    """What a forger does: renumber, relink and recompute every hash (and HMAC, with the key)."""
    prev = GENESIS
    for seq, rec in enumerate(recs, 1):
        rec["seq"] = seq
        rec["prev"] = prev
        rec["hash"] = hashlib.sha256(canonical(rec)).hexdigest()
        if key is not None:
            rec["hmac"] = hmac.new(key, b"pipe-audit-record-v1\n" + rec["hash"].encode(), hashlib.sha256).hexdigest()
        prev = rec["hash"]
    return recs


def head_copies(project) -> list[dict | None]:
    """The two copies in state/audit.head (docs/audit.md): one line each, padded to 4096 bytes;
    None for a copy whose `check` does not match."""
    raw = project.read("state/audit.head")
    assert len(raw) == 2 * 4096, len(raw)
    copies = []
    for line in raw.decode().splitlines():
        assert len(line) == 4095
        copy = json.loads(line)
        check = copy.pop("check", None)
        copies.append(copy if hashlib.sha256(line_of(copy).encode()).hexdigest() == check else None)
    return copies


def head_of(project) -> dict:
    """The head: the newest intact copy (or the one object of the earlier form, as `forge` writes)."""
    raw = project.read("state/audit.head")
    if len(raw) != 2 * 4096:
        return json.loads(raw)
    return max((c for c in head_copies(project) if c), key=lambda c: c["generation"])


def forge(project, recs: list[dict], key: bytes | None = None) -> None:
    """Replace the log with a re-hashed version of `recs` and point state/audit.head at its last
    record, as a forger can (the head's HMAC, if any, is left as it was: no key to recompute it).
    The forger writes the head in the one-object form of earlier versions, which pipe still reads."""
    write_records(project, rehash(recs, key))
    head = {k: v for k, v in head_of(project).items() if k in ("seq", "hash", "hmac")}
    head.update(version=1, seq=recs[-1]["seq"], hash=recs[-1]["hash"])
    project.write("state/audit.head", json.dumps(head))


def spec(fail: bool = False) -> dict:
    params = {"exit": 3, "message": "broken on purpose"} if fail else {"upper": True}
    return pipeline(
        proc_stage("shout", ["input"], "mid", params),
        builtin_stage("copy", "copy", ["mid"], "out"),
    )


def verify(project, *args: str, env=None):
    return project.run("audit", "verify", *args, env=env)


def history(make_project, **kwargs):
    """A project with some history: two builds, a failure, a partial clean, a rebuild, a clean."""
    project = make_project(spec(), files=INPUTS, **kwargs)
    first = project.ok("build", "--run-id", "r1")
    project.ok("build", "--run-id", "r2")
    project.write_pipefile(spec(fail=True))
    project.write("input/c.txt", "gamma\n")
    assert project.run("build", "--run-id", "r3").returncode == 1
    project.write_pipefile(spec())
    project.ok("clean", "copy")
    project.ok("build", "--run-id", "r4")
    project.ok("clean", "shout", "--state")
    return project, first


def test_verify_passes_after_builds_cleans_and_failures_and_records_what_happened(make_project):
    project, first = history(make_project)
    recs = records(project)
    assert [r["seq"] for r in recs] == list(range(1, len(recs) + 1))
    for rec in recs:  # the documented canonical form is the one pipe hashes
        assert rec["hash"] == hashlib.sha256(canonical(rec)).hexdigest()
        assert set(rec["actor"]) == {"user", "uid", "pid", "hostname"}
    actions = [(r["action"], r.get("run"), r.get("stage")) for r in recs]
    r1 = [(action, stage) for action, run, stage in actions if run == "r1"]
    assert r1[0] == ("run.start", None) and r1[-1] == ("run.end", None), r1
    assert [x for x in r1 if x[0].startswith("stage.")] == [("stage.run", "shout"), ("stage.run", "copy")]
    assert actions[: len(r1)] == [(a, "r1", s) for a, s in r1], "a run's records are contiguous"
    skips = [r for r in recs if r["action"] == "stages.skip" and r.get("run") == "r2"]
    assert len(skips) == 1 and "shout" in [e["stage"] for e in skips[0]["data"]["stages"]], skips
    assert ("stage.fail", "r3", "shout") in actions
    assert [a for a, run, _ in actions if a == "clean"] == ["clean", "clean"]
    # outputs published are recorded with their blake3 hashes, as in the marker
    published = next(r for r in recs if r["action"] == "stage.run" and r.get("run") == "r4" and r["stage"] == "copy")
    assert published["data"]["outputs"] == project.marker("out", "copy")["outputs"]
    assert set(published["data"]["inputs"]) == {"mid/a.txt", "mid/b.txt", "mid/c.txt"}
    failed = next(r for r in recs if r["action"] == "stage.fail")
    assert failed["data"]["attempts"] == 1 and "broken on purpose" in failed["data"]["reason"], failed
    cleaned = [r for r in recs if r["action"] == "clean"]
    assert "out/a.txt" in cleaned[0]["data"]["removed"] and cleaned[0]["data"]["stages"] == ["copy"]
    assert cleaned[1]["data"]["state"] is True
    assert recs[-1]["action"] == "clean", "clean --state keeps the audit log"

    # the build printed its head; the head file and verify agree
    seq, digest = HEAD_LINE.search(first.stderr).groups()
    assert int(seq) == len(r1) and recs[int(seq) - 1]["hash"] == digest
    head = head_of(project)
    assert (head["seq"], head["hash"]) == (len(recs), recs[-1]["hash"])
    ok = verify(project)
    assert ok.returncode == 0, str(ok)
    assert f"audit log OK: {len(recs)} records, head {len(recs)}:{recs[-1]['hash']}" in ok.stdout
    assert "cannot be detected" in ok.stdout and "--head" in ok.stdout
    # a head kept from the first build is still in the chain
    kept = verify(project, "--head", f"{seq}:{digest}")
    assert kept.returncode == 0, str(kept)
    as_json = json.loads(project.ok("--message-format", "json", "audit", "verify").stdout)
    assert as_json["ok"] is True and as_json["records"] == len(recs)


def test_show_filters_by_stage_and_run(make_project):
    project, _ = history(make_project)
    by_run = project.ok("--message-format", "json", "audit", "show", "--run", "r3").stdout.splitlines()
    assert {json.loads(l)["run"] for l in by_run} == {"r3"}
    assert [json.loads(l)["action"] for l in by_run][0] == "run.start"
    by_stage = [json.loads(l) for l in project.ok("--message-format", "json", "audit", "show", "--stage", "copy").stdout.splitlines()]
    assert by_stage and all(r.get("stage") == "copy" or "copy" in r["data"].get("stages", []) for r in by_stage)
    human = project.ok("audit", "show", "--stage", "copy", "--run", "r1").stdout
    assert re.search(r"^#\d+ \S+ stage\.run stage=copy run=r1 by ", human, re.M), human
    assert "a.txt  6 bytes  blake3 " in human, human


def edit_one_byte(recs: list[dict]) -> list[dict]:
    """Change one digit of record 5's timestamp."""
    ts = recs[4]["ts"]
    recs[4]["ts"] = ts[:-2] + str((int(ts[-2]) + 1) % 10) + ts[-1]
    return recs


TAMPERING = {
    # name: (tamper(records) -> records, record named, words in the reason)
    "edit one byte of a field": (edit_one_byte, 5, "edited"),
    "delete a line": (lambda r: r[:3] + r[4:], 5, "record 4 is missing"),
    "swap two lines": (lambda r: [*r[:5], r[6], r[5], *r[7:]], 7, "reordered"),
    "truncate the tail": (lambda r: r[:-3], len, "truncated"),
}


@pytest.mark.parametrize("kind", TAMPERING)
def test_each_kind_of_tampering_is_detected_naming_the_record(make_project, kind):
    project, _ = history(make_project)
    tamper, named, why = TAMPERING[kind]
    original = records(project)
    if named is len:
        named = len(original) - 2  # the first record missing
    write_records(project, tamper(records(project)))
    if kind == "edit one byte of a field":  # exactly one byte differs
        before, after = project.read("state/audit.jsonl"), "".join(line_of(r) + "\n" for r in original).encode()
        assert len(before) == len(after) and sum(a != b for a, b in zip(before, after)) == 1
    bad = verify(project)
    assert bad.returncode == 1, str(bad)
    assert f"record {named}" in bad.stderr and why in bad.stderr, str(bad)
    # a build refuses to extend a log whose end no longer matches its head
    if kind == "truncate the tail":
        refused = project.run("build")
        assert refused.returncode == 1 and "audit log cannot be extended" in refused.stderr, str(refused)


def test_an_appended_forged_record_is_detected(make_project):
    project, _ = history(make_project)
    recs = records(project)
    forged = {**recs[-1], "action": "stage.run", "stage": "copy", "data": {"outputs": []}}
    forged["seq"], forged["prev"] = len(recs) + 1, recs[-1]["hash"]
    forged["hash"] = hashlib.sha256(canonical(forged)).hexdigest()  # a well-formed record
    write_records(project, [*recs, forged])
    bad = verify(project)
    assert bad.returncode == 1, str(bad)
    assert f"record {len(recs) + 1}" in bad.stderr and "not covered by state/audit.head" in bad.stderr, str(bad)


def test_a_rehashed_forgery_is_caught_by_the_head_kept_elsewhere(make_project):
    project, first = history(make_project)
    seq, digest = HEAD_LINE.search(first.stderr).groups()  # the user wrote this down
    recs = records(project)
    published = next(r for r in recs if r["action"] == "stage.run")
    published["data"]["outputs"][0]["blake3"] = "f" * 64  # claim other output bytes
    forge(project, recs)
    assert verify(project).returncode == 0, "a consistent rewrite passes without more"
    bad = verify(project, "--head", f"{seq}:{digest}")
    assert bad.returncode == 1, str(bad)
    assert f"record {seq}" in bad.stderr and "rewritten" in bad.stderr, str(bad)
    assert verify(project, "--head", digest).returncode == 1
    assert verify(project, "--head", "not-a-hash").returncode == 2


def test_a_rehashed_forgery_is_caught_by_the_key(make_project, tmp_path):
    key_file = tmp_path / "audit.key"  # outside the project
    key_file.write_bytes(b"0123456789abcdef0123456789abcdef\n")
    env = {"PIPE_AUDIT_KEY": str(key_file)}
    project = make_project(spec(), files=INPUTS)
    project.ok("build", "--run-id", "r1", env=env)
    project.ok("clean", env=env)
    project.ok("build", "--run-id", "r2", "--audit-key", str(key_file))
    ok = verify(project, "--audit-key", str(key_file))
    assert ok.returncode == 0 and "authenticated with the key" in ok.stdout, str(ok)
    assert "HMACs that were not checked" in verify(project).stdout
    # without the key, nothing more can be appended (it would break the authenticated chain)
    refused = project.run("build", "--run-id", "r3")
    assert refused.returncode == 1 and "--audit-key" in refused.stderr, str(refused)
    recs = records(project)
    clean = next(i for i, r in enumerate(recs) if r["action"] == "clean")
    recs[clean]["data"]["removed"] = []  # hide what the clean removed; recompute every hash
    forge(project, recs)
    assert verify(project).returncode == 0, "hashes alone cannot tell"
    bad = verify(project, env=env)
    assert bad.returncode == 1, str(bad)
    assert f"record {clean + 1} " in bad.stderr and "HMAC" in bad.stderr, str(bad)
    # a forger with a different key does no better
    forge(project, records(project), key=b"a guessed key, not the real one")
    bad = verify(project, env=env)
    assert bad.returncode == 1 and "record 1" in bad.stderr, str(bad)


def test_a_crash_between_append_and_head_update_is_not_tampering(make_project):
    project = make_project(spec(), files=INPUTS)
    project.ok("build", "--run-id", "r1")
    crashed = project.run("build", "--run-id", "r2", env={"PIPE_FAILPOINT": "audit.after-append:2"})
    assert crashed.returncode != 0
    head = head_of(project)
    # The intent names the last record of the batch being appended (group commit: one or more
    # records), and all of that batch reached the log before the kill.
    assert head["seq"] < head["pending"]["seq"] == len(records(project))
    ok = verify(project)
    assert ok.returncode == 0, str(ok)
    assert "died before updating the head" in ok.stdout, str(ok)
    project.ok("build", "--run-id", "r3")  # repairs the head under the lock
    ok = verify(project)
    assert ok.returncode == 0 and "died before" not in ok.stdout, str(ok)


def test_the_head_is_two_copies_updated_in_place_and_one_damaged_copy_is_survived(make_project):
    project = make_project(spec(), files=INPUTS)
    project.ok("build", "--run-id", "r1")
    first, second = head_copies(project)
    assert first is not None and first == second, "at rest both copies hold the current head"
    recs = records(project)
    assert (first["version"], first["seq"], first["hash"]) == (2, len(recs), recs[-1]["hash"])
    assert "pending" not in first
    inode = os.stat(project.path("state/audit.head")).st_ino
    project.ok("build", "--run-id", "r2")
    assert os.stat(project.path("state/audit.head")).st_ino == inode, "rewritten in place, not replaced"
    assert head_of(project)["seq"] == len(records(project))

    # A copy torn by a power cut (its first sector garbage): the other one is the head.
    raw = bytearray(project.read("state/audit.head"))
    raw[4096:4096 + 512] = b"x" * 512
    project.write("state/audit.head", bytes(raw))
    ok = verify(project)
    assert ok.returncode == 0, str(ok)
    assert "one of the two copies in state/audit.head" in ok.stdout, str(ok)
    project.ok("build", "--run-id", "r3")  # rewrites both copies
    first, second = head_copies(project)
    assert first is not None and first == second
    assert "two copies" not in verify(project).stdout

    # Both copies damaged: the log can no longer be vouched for, and nothing extends it.
    raw = bytearray(project.read("state/audit.head"))
    raw[100] ^= 1
    raw[4096 + 100] ^= 1
    project.write("state/audit.head", bytes(raw))
    bad = verify(project)
    assert bad.returncode == 1 and "neither copy is intact" in bad.stderr, str(bad)
    refused = project.run("build", "--run-id", "r4")
    assert refused.returncode == 1 and "audit log cannot be extended" in refused.stderr, str(refused)


def test_a_kill_between_the_two_copies_of_a_head_update_is_survived(make_project):
    project = make_project(spec(), files=INPUTS)
    project.ok("build", "--run-id", "r1")
    for k in (1, 2):  # the intent of an append, then its commit
        crashed = project.run("build", "--run-id", f"k{k}", env={"PIPE_FAILPOINT": f"audit.after-first-head-copy:{k}"})
        assert crashed.returncode == -9, str(crashed)
        first, second = head_copies(project)
        assert first is not None and second is not None and first["generation"] == second["generation"] + 1
        ok = verify(project)
        assert ok.returncode == 0 and "one of the two copies" in ok.stdout, str(ok)
    project.ok("build", "--run-id", "after")
    ok = verify(project)
    assert ok.returncode == 0 and "copies" not in ok.stdout and "died before" not in ok.stdout, str(ok)


def test_two_builds_cannot_interleave_audit_records(make_project):
    blocking = proc_stage("slow", ["input"], "mid", {"block": ["started", "release"]})
    project = make_project(pipeline(blocking, builtin_stage("copy", "copy", ["mid"], "out")), files=INPUTS)
    first = project.start("build", "--run-id", "first")
    wait_for_file(project.path("started"), proc=first)
    during = len(records(project))
    second = project.run("build", "--run-id", "second", timeout=15)
    assert second.returncode == 3, str(second)
    assert len(records(project)) == during, "the build that did not get the lock appended nothing"
    assert verify(project).returncode == 0, "verify takes no lock and sees a consistent chain mid-build"
    project.write("release", "")
    assert project.finish(first).returncode == 0
    project.ok("build", "--run-id", "third")
    runs = [r["run"] for r in records(project)]
    assert "second" not in runs
    assert runs == sorted(runs, key=["first", "third"].index), "each run's records are contiguous"
    assert verify(project).returncode == 0
