"""The skip memo (`cache/skip-v1.json`, docs/state.md): an unchanged stage is re-verified with `stat`
calls instead of a full decision. These tests arm the memo for real (its entries are only written
for files older than the racy window, 2 s) and then change things the way users do -- including
edits that keep size and mtime -- to prove that a memoised verdict never hides a change.
"""

from __future__ import annotations

import json
import os
import time

from blackbox import builtin_stage, pipeline, proc_stage

RACY_WINDOW_S = 2.0
"""The engine trusts a stat only for files whose mtime and ctime are this much older (hashing.rs)."""


def memo(project) -> dict:
    """The memo file (none yet: no entries)."""
    if not project.exists("cache/skip-v1.json"):
        return {"stages": {}}
    return project.json("cache/skip-v1.json")


def let_files_age() -> None:
    """The memo refuses stats younger than the racy window: this is time that must pass, not a
    wait for another process (no file or signal could stand in for it)."""
    time.sleep(RACY_WINDOW_S + 0.2)


def dry_run(project) -> dict[str, str]:
    """`build --dry-run`: each stage's decision."""
    events = project.ok("build", "--dry-run", "--message-format", "json").stdout.splitlines()
    return {e["stage"]: e["decision"] for e in map(json.loads, events)}


def sneaky_edit(path, old: bytes, new: bytes) -> None:
    """Same size, same inode, mtime put back: only ctime (which user space cannot set) changes."""
    st = path.stat()
    data = path.read_bytes()
    assert old in data and len(old) == len(new)
    path.write_bytes(data.replace(old, new))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    after = path.stat()
    assert (after.st_size, after.st_mtime_ns, after.st_ino) == (st.st_size, st.st_mtime_ns, st.st_ino)


STAGES = [
    builtin_stage("keep", "upper", ["input/keep.txt"], "out_keep"),
    builtin_stage("sneaky", "upper", ["input/sneaky.txt"], "out_sneaky"),
    builtin_stage("outedit", "upper", ["input/outedit.txt"], "out_outedit"),
    builtin_stage("marker", "upper", ["input/marker.txt"], "out_marker"),
    builtin_stage("added", "copy", ["data/added"], "out_added"),
    builtin_stage("removed", "copy", ["data/removed"], "out_removed"),
    builtin_stage("glob", "upper", ["globbed/**/*.txt"], "out_glob"),
    builtin_stage("params", "upper", ["input/params.txt"], "out_params", params={"mode": "ascii"}),
    proc_stage("script", ["input/script.txt"], "out_script"),
]
FILES = {
    "input/keep.txt": "keep me\n",
    "input/sneaky.txt": "quick brown fox\n",
    "input/outedit.txt": "edit my output\n",
    "input/marker.txt": "marker\n",
    "input/params.txt": "straße\n",
    "input/script.txt": "script\n",
    "data/added/a.txt": "a\n",
    "data/added/sub/b.txt": "b\n",
    "data/removed/a.txt": "a\n",
    "data/removed/b.txt": "b\n",
    "globbed/x.txt": "x\n",
    "globbed/deep/y.txt": "y\n",
}


def change_all_but_keep(project) -> None:
    """Changes what every stage of STAGES but `keep` rests on, the way users do: edits that keep
    size and mtime (an input, an output), a deleted marker, added and removed files, params, and
    the processor's file."""
    sneaky_edit(project.path("input/sneaky.txt"), b"quick", b"slick")
    sneaky_edit(project.path("out_outedit/outedit.txt"), b"EDIT", b"EDDY")
    project.path("out_marker/.marker.done").unlink()
    project.write("data/added/sub/new.txt", "new\n")
    project.path("data/removed/b.txt").unlink()
    project.write("globbed/deep/new.txt", "new\n")
    project.edit_pipefile(lambda spec: project.stage_spec(spec, "params").update(params={"mode": "unicode"}))
    with open(project.path("proc.py"), "a", encoding="utf-8") as f:
        f.write("# edited\n")


def assert_all_but_keep_rebuilt(project) -> None:
    """The outputs of the stages `change_all_but_keep` changed are those of the changed files."""
    assert project.read("out_sneaky/sneaky.txt") == b"SLICK BROWN FOX\n"
    assert project.read("out_outedit/outedit.txt") == b"EDIT MY OUTPUT\n"
    assert project.exists("out_marker/.marker.done")
    assert project.read("out_added/sub/new.txt") == b"new\n"
    assert not project.exists("out_removed/b.txt")
    assert project.read("out_glob/deep/new.txt") == b"NEW\n"
    assert project.read("out_params/params.txt") == "STRASSE\n".encode()


def test_a_memoised_verdict_never_hides_a_change(make_project):
    project = make_project(pipeline(*STAGES), files=FILES)
    project.ok("build", "--run-id", "first")
    # Just written: nothing is old enough to memoise yet.
    assert memo(project)["stages"] == {}
    let_files_age()
    project.ok("build", "--run-id", "arm")
    assert set(memo(project)["stages"]) == {s["name"] for s in STAGES}
    assert set(project.statuses("arm").values()) == {"skipped"}

    # The memo is what decides now: without it the no-op would hash every input again and write
    # the stat cache back.
    project.path("cache/stat-v2.bin").unlink()
    project.ok("build", "--run-id", "noop")
    assert set(project.statuses("noop").values()) == {"skipped"}
    assert not project.exists("cache/stat-v2.bin")

    change_all_but_keep(project)

    # A dry run trusts the memo as a build does, and sees the same changes.
    planned = dry_run(project)
    assert planned.pop("keep") == "skip", planned
    assert set(planned.values()) <= {"run", "restore"}, planned

    project.ok("build", "--run-id", "changed")
    statuses = project.statuses("changed")
    assert statuses.pop("keep") == "skipped", statuses
    assert all(s in ("succeeded", "restored") for s in statuses.values()), statuses
    assert_all_but_keep_rebuilt(project)
    # Everything that ran is fresh again: only the untouched stage stays memoised.
    assert set(memo(project)["stages"]) == {"keep"}


def test_a_torn_or_foreign_memo_only_costs_a_full_decision(make_project):
    project = make_project(pipeline(*STAGES[:3]), files=FILES)
    project.ok("build")
    let_files_age()
    project.ok("build")
    assert len(memo(project)["stages"]) == 3
    words = [b"quick", b"qu0ck", b"qu1ck", b"qu2ck"]
    for i, garbage in enumerate((b"", b'{"version": 1, "stages": {"keep": 7', b"\x00" * 64)):
        project.path("cache/skip-v1.json").write_bytes(garbage)
        sneaky_edit(project.path("input/sneaky.txt"), words[i], words[i + 1])
        run_id = f"garbage{i}"
        project.ok("build", "--run-id", run_id)
        assert project.statuses(run_id) == {"keep": "skipped", "sneaky": "succeeded", "outedit": "skipped"}
        assert project.read("out_sneaky/sneaky.txt") == words[i + 1].upper() + b" BROWN FOX\n"
        # Rewritten whole, without the stage that just ran.
        assert set(memo(project)["stages"]) == {"keep", "outedit"}
    # The rewritten memo (its path table compacted) still vouches for the other two: with the
    # stage that ran gone from the Pipefile, a build hashes nothing and writes no stat cache.
    project.edit_pipefile(lambda spec: spec["stages"].remove(project.stage_spec(spec, "sneaky")))
    project.path("cache/stat-v2.bin").unlink()
    project.ok("build", "--run-id", "without-sneaky")
    assert project.statuses("without-sneaky") == {"keep": "skipped", "outedit": "skipped"}
    assert not project.exists("cache/stat-v2.bin")


def test_a_memo_entry_from_another_definition_is_not_used(make_project):
    """The entry is keyed by the stage's definition: same name, other input, decides in full."""
    project = make_project(pipeline(builtin_stage("s", "upper", ["input/keep.txt"], "out")), files=FILES)
    project.ok("build")
    let_files_age()
    project.ok("build")
    entry = memo(project)["stages"]["s"]
    project.edit_pipefile(lambda spec: spec["stages"][0].update(inputs=["input/sneaky.txt"]))
    project.ok("build", "--run-id", "other")
    assert project.statuses("other") == {"s": "succeeded"}
    assert project.read("out/sneaky.txt") == b"QUICK BROWN FOX\n"
    assert "s" not in memo(project)["stages"]
    let_files_age()
    project.ok("build", "--run-id", "rearm")
    assert project.statuses("rearm") == {"s": "skipped"}
    assert memo(project)["stages"]["s"]["key"] != entry["key"]


def test_a_dry_run_reports_a_publish_journal_the_memo_cannot_see(make_project):
    """A publish journal left in an output folder (its build died while publishing) changes
    nothing the memo watches; a build completes that publish before it looks at any verdict, a
    dry run recovers nothing and must say the stage would run."""
    project = make_project(pipeline(*STAGES[:2]), files=FILES)
    project.ok("build")
    let_files_age()
    project.ok("build")
    assert set(memo(project)["stages"]) == {"keep", "sneaky"}
    assert dry_run(project) == {"keep": "skip", "sneaky": "skip"}

    marker = project.path("out_keep/.keep.done")
    project.path("out_keep/.keep.publishing").write_bytes(marker.read_bytes())
    assert dry_run(project) == {"keep": "run", "sneaky": "skip"}
    human = project.ok("build", "--dry-run").stdout
    assert "keep: run (" in human and "publish" in human, human


def test_stages_decided_together_without_the_memo_see_every_change(make_project):
    """Without a memo verdict (the first build after stages ran, or the memo removed), the stages a
    build must decide in full are decided many at once, on all cores, ahead of their turn. Each
    must still see every change, find a publish journal left in its output folder, and run when
    its turn comes; the unchanged ones are memoised again."""
    # Decided before any stage runs (a stage that starts ends deciding ahead): `keep`, then the
    # stage with the journal.
    journal = builtin_stage("journal", "upper", ["input/journal.txt"], "out_journal")
    stages = [STAGES[0], journal, *STAGES[1:]]
    project = make_project(pipeline(*stages), files={**FILES, "input/journal.txt": "journal\n"})
    project.ok("build", "--run-id", "first")
    let_files_age()
    project.ok("build", "--run-id", "arm")
    assert len(memo(project)["stages"]) == len(stages)

    project.path("cache/skip-v1.json").unlink()
    change_all_but_keep(project)
    # Not a journal a publish could complete: the stage's marker is removed and it runs again.
    project.write("out_journal/.journal.publishing", "torn")

    result = project.ok("build", "--run-id", "changed")
    statuses = project.statuses("changed")
    assert statuses.pop("keep") == "skipped", statuses
    assert all(s in ("succeeded", "restored") for s in statuses.values()), statuses
    assert "interrupted publish of `journal`" in result.stderr, result.stderr
    assert not project.exists("out_journal/.journal.publishing")
    assert project.read("out_journal/journal.txt") == b"JOURNAL\n"
    assert_all_but_keep_rebuilt(project)
    assert set(memo(project)["stages"]) == {"keep"}

    # Nothing changed since: decided together again, every stage is a skip, and memoised.
    let_files_age()
    project.path("cache/skip-v1.json").unlink()
    project.ok("build", "--run-id", "again")
    assert set(project.statuses("again").values()) == {"skipped"}
    assert set(memo(project)["stages"]) == {s["name"] for s in stages}
