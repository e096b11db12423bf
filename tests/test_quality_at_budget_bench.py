"""A search's cost (bench/quality_at_budget.py's epochs column, summary.json's `epochs`): a
search cut by a device call's time limit and resumed in the next call must report the steps
of both calls. Its summary counted only the last process's steps (issue 20, H200 2026-12-03:
0.03 epochs for a 0.44-epoch search), so both read `Journal.search_steps`."""

from __future__ import annotations

import json

from edgeqra.result import Result
from edgeqra.search.journal import Journal


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
