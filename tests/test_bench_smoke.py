"""The benchmark harness (bench/) in smoke mode: tiny sizes, one run each, so it cannot rot.

Asserts only that `bench/run.sh --smoke` runs to the end and writes the results table with a row
for every section; never a timing. A missing peer (ninja, hyperfine, b3sum, make) turns its rows
into "skipped: <reason>", which is accepted. Everything is written under pytest's tmp_path.
"""

from __future__ import annotations

import json
import os
import subprocess

from blackbox import REPO, base_env

SECTIONS = ["full", "noop", "onetouch", "hashing", "processing", "mapnoop", "memory"]


def test_bench_smoke_runs_and_writes_a_row_per_section(tmp_path, pipe_bin):
    out = tmp_path / "bench"
    env = base_env({"PIPE_BIN": str(pipe_bin)})
    done = subprocess.run(
        [str(REPO / "bench" / "run.sh"), "--smoke", "--out", str(out)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, f"bench/run.sh --smoke failed\n--- stdout\n{done.stdout}\n--- stderr\n{done.stderr}"

    table = (out / "results.md").read_text(encoding="utf-8")
    assert "## Summary" in table
    assert table in done.stdout  # the table is also printed
    # The header names the filesystem the workloads were on (it decides what one-touch and full-build
    # rows measure, see bench/README.md).
    workloads = [line for line in table.splitlines() if line.startswith("- workloads in `")]
    assert len(workloads) == 1, table
    assert not workloads[0].endswith(": unknown"), workloads[0]
    rows = [line for line in table.splitlines() if line.startswith("| ") and not line.startswith("| section")]
    for section in SECTIONS:
        assert any(row.startswith(f"| {section} |") for row in rows), f"no row for section {section}:\n{table}"

    # Each row either has a measured ratio/value or says why it was skipped.
    for row in json.loads((out / "results.json").read_text(encoding="utf-8")):
        assert row["section"] in SECTIONS
        assert (
            row["ratio"] is not None
            or row["note"].startswith("skipped: ")
            or row["section"] == "memory"
            or (row["pipe_s"] is not None)
        ), row
        if row["note"].startswith("skipped: "):
            assert len(row["note"]) > len("skipped: "), row  # a reason is given


def test_bench_generator_writes_equivalent_workloads(tmp_path):
    """gen.py: N upper stages + a fan-in for pipe, the same edges for ninja and make; seeded."""
    for flags, name in (([], "a"), ([], "b"), (["--map"], "m")):
        subprocess.run(
            ["python3", str(REPO / "bench" / "gen.py"), str(tmp_path / name), "--n", "12", "--seed", "3", *flags],
            check=True, capture_output=True, env={**os.environ},
        )
    a, b, m = tmp_path / "a", tmp_path / "b", tmp_path / "m"
    inputs = sorted(p.name for p in (a / "input").iterdir())
    assert len(inputs) == 12
    assert all((a / "input" / n).read_bytes() == (b / "input" / n).read_bytes() for n in inputs)  # seeded

    spec = json.loads((a / "Pipefile.json").read_text())
    stages = spec["stages"]
    assert len(stages) == 13
    assert [s["processor"]["builtin"] for s in stages] == ["upper"] * 12 + ["copy"]
    assert stages[-1]["inputs"] == [s["outputDir"] for s in stages[:-1]]
    ninja = (a / "build.ninja").read_text()
    assert ninja.count(": upper input/") == 12 and "rspfile = $out.rsp" in ninja
    assert "tr a-z A-Z" in (a / "Makefile").read_text()

    map_spec = json.loads((m / "Pipefile.json").read_text())
    assert len(map_spec["stages"]) == 1 and map_spec["stages"][0]["foreach"] == "file"
    assert (m / "build.ninja").read_text().count(": upper input/") == 12
