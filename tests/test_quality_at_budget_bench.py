"""A search's cost (bench/quality_at_budget.py's epochs column, summary.json's `epochs`): a
search cut by a device call's time limit and resumed in the next call must report the steps
of both calls. Its summary counted only the last process's steps (issue 20, H200 2026-12-03:
0.03 epochs for a 0.44-epoch search), so both read `Journal.search_steps`."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from edgeqra.result import Result
from edgeqra.search.journal import Journal

REPO = Path(__file__).resolve().parents[1]


def _result(config: str, fidelity: int, score: float) -> Result:
    return Result(
        config=config, fidelity=fidelity, score=score, metric="acc_norm", loss=1.0,
        perplexity=2.7, accuracy=score, accuracy_norm=score, train_loss=1.0,
        memory_bytes=1, fits=True, seconds=1.0, seed=0,
    )  # fmt: skip


def test_journal_steps_count_both_calls_and_skip_failures_and_baselines(tmp_path):
    first = Journal(tmp_path / "journal.jsonl")  # the call cut by its time limit
    first.append(_result("4/8,4/8", 4, 0.4), stage="initial population")
    first.append(_result("3/8,4/8", 16, 0.5), stage="evolution")
    again = Journal(tmp_path / "journal.jsonl")  # the next call resumes the same file
    again.append(_result("4/4,4/8", 16, 0.52), stage="bayes")
    again.append_failure("2/8,2/8", 4, "CUDA error", attempts=2, stage="evolution")
    again.append(_result("4/8,4/8", 64, 0.55), stage="baseline")  # a reference, not the search
    lines = (tmp_path / "journal.jsonl").read_text().splitlines()
    assert len(lines) == 5 and "error" in json.loads(lines[3])
    assert Journal(tmp_path / "journal.jsonl").search_steps() == 4 + 16 + 16


@pytest.mark.slow
def test_benchmark_prebuilds_each_seeds_bank_and_survives_a_failing_search(tmp_path):
    """Two workers, two seeds on the tiny model (~5 min on 2 cores): the parent builds seed 1's
    bank before the workers start (eight workers built the same banks at once on the H200), and
    a search that fails is reported while the others finish; the run then exits non-zero."""
    out = tmp_path / "qab"
    broken = out / "arc_easy" / "b3.5" / "random" / "s1"
    broken.mkdir(parents=True)
    (broken / "job.json").write_text("{not json")  # this search cannot resume
    cmd = [
        sys.executable, str(REPO / "bench" / "quality_at_budget.py"), "--tiny", "--device", "cpu",
        "--tasks", "arc_easy", "--budget-bits", "3.5", "--seeds", "0", "1", "--steps", "4",
        "--search-steps", "4", "--rungs", "1", "--evals", "6", "--n-eval", "20", "--n-train",
        "32", "--calib-samples", "8", "--jobs", "2", "--methods", "joint", "random",
        "--out", str(out),
    ]  # fmt: skip
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=1500, check=False)  # noqa: S603
    log = run.stdout + run.stderr
    assert run.returncode == 1, log[-3000:]
    assert "seed 1: bank and sensitivity ready" in run.stdout
    assert "search ('random', 3.5, 1) failed" in run.stdout
    assert "1 searches failed" in log
    rows = json.loads((out / "rows.json").read_text())
    done = {(r["method"], r["seed"]) for r in rows if r["evaluations"] > 1}
    assert done == {("joint", 0), ("joint", 1), ("random", 0)}
