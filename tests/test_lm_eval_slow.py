"""edgeqra's ARC-Easy scores are lm-eval's: the same items through lm-eval-harness 0.4.x (slow).

Runs ``bench/lm_eval_check.py`` on 20 validation items of the embedded SmolLM2: edgeqra's
scorer here, lm-eval's ``HFLM`` with its own ``arc_easy`` YAML (data pointed at the same
local files) in the interpreter that has lm-eval, usually a separate venv because lm-eval's
pins clash with gptqmodel's (see the bench script). Skips when no interpreter imports
``lm_eval``: set ``EDGEQRA_LMEVAL_PYTHON`` or create ``/tmp/lmeval-venv`` as the script says.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
N_ITEMS = 20
ROOT = Path(__file__).resolve().parent.parent


def _lm_eval_python() -> str | None:
    """The first interpreter that imports lm_eval: $EDGEQRA_LMEVAL_PYTHON, the venv, this one."""
    venv = "/tmp/lmeval-venv/bin/python"  # noqa: S108 - where the bench script says to make it
    candidates = [os.environ.get("EDGEQRA_LMEVAL_PYTHON"), venv]
    for python in [c for c in candidates if c and Path(c).exists()] + [sys.executable]:
        probe = subprocess.run(  # noqa: S603 - a fixed probe on a local interpreter
            [python, "-c", "import lm_eval, lm_eval.models.huggingface"],
            capture_output=True,
            check=False,
        )
        if probe.returncode == 0:
            return python
    return None


def test_arc_easy_scores_equal_lm_eval_item_by_item(tmp_path):
    python = _lm_eval_python()
    if python is None:
        pytest.skip("lm-eval is not importable: set EDGEQRA_LMEVAL_PYTHON (bench/lm_eval_check.py)")
    spec = importlib.util.spec_from_file_location("lm_eval_check", ROOT / "bench/lm_eval_check.py")
    check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(check)
    out = tmp_path / "check.json"
    code = check.main(
        [
            "--n",
            str(N_ITEMS),
            "--lm-eval-python",
            python,
            "--work",
            str(tmp_path),
            "--out",
            str(out),
        ]
    )
    report = json.loads(out.read_text())
    # Every item: same question and gold, same acc and acc_norm decisions, and every choice's
    # log-likelihood within 1e-3 nats (float32 on CPU, different batching: ~1e-4 seen).
    assert report["n_items"] == N_ITEMS and report["n_choices"] >= 2 * N_ITEMS
    assert report["items_same_question_and_gold"] == N_ITEMS
    assert report["items_same_acc"] == N_ITEMS
    assert report["items_same_acc_norm"] == N_ITEMS
    assert report["max_abs_loglik_diff"] <= 1e-3
    assert report["edgeqra"]["acc"] == report["lm_eval"]["acc"]
    assert report["edgeqra"]["acc_norm"] == report["lm_eval"]["acc_norm"]
    assert code == 0 and report["agree"]
