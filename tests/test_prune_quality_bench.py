"""bench/prune_quality.py --remeasure on CPU: rows written by a GPU run (run-length configs,
no `model` field) are re-read, each given the model folder it was scored on, and rewritten
atomically; on CPU there is no peak to read, so `measured` is None (the GPU run fills it).

The GPU call of 2026-12-02 failed here: `Config.parse` did not read `16/8x30`."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from edgeqra.profiles import load_profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
prune_quality = pytest.importorskip("prune_quality")


def test_remeasure_reads_gpu_rows_and_names_each_rows_model(tmp_path):
    rows = [
        {"ratio": 0.0, "task": "piqa", "method": "unpruned FP16 LoRA", "config": "16/8x30"},
        {"ratio": 0.2, "task": "piqa", "method": "pruned uniform 4-bit", "config": "4/8x30"},
        {
            "ratio": 0.3,
            "task": "piqa",
            "method": "unpruned joint search (same memory)",
            "config": "4/8x5,2/4,3/8x24",
        },  # fmt: skip
        {"ratio": 0.0, "task": "piqa", "method": "a row without a config", "config": "—"},
    ]
    journal = tmp_path / "rows.jsonl"
    journal.write_text("".join(json.dumps(r) + "\n" for r in rows))
    profile = load_profile("jetson-orin-nano-8gb")
    prune_quality._remeasure(journal, "smollm2", profile, 64, jobs=2)
    again = [json.loads(line) for line in journal.read_text().splitlines()]
    assert [r["method"] for r in again] == [r["method"] for r in rows]  # order kept
    assert [r.get("model") for r in again] == [
        "smollm2",
        str(tmp_path / "pruned-0.2"),
        "smollm2",
        None,
    ]
    assert all(r["measured"] is None for r in again[:3]) and "measured" not in again[3]
    assert not list(tmp_path.glob("*.tmp"))  # the rewrite left no temp file
