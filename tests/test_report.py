"""`edgeqra report RUN_DIR`: the SVG of a real (tiny) finished search, and bad input.

One tiny search on a random Llama (3 layers, 4 tuning steps, rungs at 1 step) writes the run
directory the tests draw; the assertions compare the picture with that run's own files.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import xml.etree.ElementTree as ET

import pytest
from conftest import tiny_model

from edgeqra.cli import EXIT_INPUT, EXIT_OK, main
from edgeqra.memory import ModelSpec, estimate_for_profile
from edgeqra.profiles import load_profile
from edgeqra.space import Config

PROFILE = "t4-16gb"
GROUP = 32
SVG = "{http://www.w3.org/2000/svg}"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tokenizer):
    """A finished tiny search (journal with two fidelities, baselines, summary)."""
    from transformers import AutoConfig

    root = tmp_path_factory.mktemp("report")
    folder = root / "model"
    tiny_model("llama", vocab_size=len(tokenizer)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    spec = ModelSpec.from_config(AutoConfig.from_pretrained(folder))
    config = Config.uniform(spec.n_units, 4, 8)
    budget = estimate_for_profile(spec, config, load_profile(PROFILE), group_size=GROUP).total
    out = root / "run"
    argv = ["search", "--model", str(folder), "--profile", PROFILE,
            "--budget-gb", f"{budget / 2**30 + 1e-6:.9f}", "--task", "arc_easy",
            "--ranks", "0,4,8", "--steps", "4", "--evals", "10", "--population", "4",
            "--children", "3", "--generations", "1", "--no-bayes", "--n-train", "8",
            "--n-eval", "4", "--seq-len", "64", "--calib-samples", "4",
            "--group-size", str(GROUP), "--device", "cpu", "--out", str(out), "--json"]  # fmt: skip
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("EDGEQRA_CACHE", str(root / "cache"))
        assert main(argv) == EXIT_OK
    return out


def _journal(run_dir):
    return [json.loads(x) for x in (run_dir / "journal.jsonl").read_text().splitlines()]


def _tree_hashes(folder):
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def _parse(path):
    return ET.parse(path).getroot()  # noqa: S314 - the test's own file, not untrusted input


def _by_class(root, tag, cls):
    return [e for e in root.iter(f"{SVG}{tag}") if cls in e.get("class", "").split()]


def test_report_draws_the_run(run_dir, tmp_path, capsys):
    capsys.readouterr()
    before = _tree_hashes(run_dir)
    out = tmp_path / "front.svg"
    assert main(["report", str(run_dir), "--out", str(out)]) == EXIT_OK
    assert str(out) in capsys.readouterr().out
    assert _tree_hashes(run_dir) == before  # read-only: the run directory is untouched
    assert [p.name for p in tmp_path.iterdir()] == ["front.svg"]  # no temp file left
    root = _parse(out)  # well-formed XML
    assert root.tag == f"{SVG}svg"

    steps = json.loads((run_dir / "job.json").read_text())["search"]["steps"]
    summary = json.loads((run_dir / "summary.json").read_text())
    lines = [x for x in _journal(run_dir) if x.get("status") != "failed"]
    full = [x for x in lines if x["fidelity"] >= steps]
    low = [x for x in lines if x["fidelity"] < steps]
    assert full  # (lower rungs: whatever the search ran; a lower line is added in the next test)

    # One marker per journal evaluation, of its kind, carrying its config and fidelity.
    drawn_full = _by_class(root, "circle", "full")
    drawn_low = _by_class(root, "circle", "low")
    key = lambda x: (x["config"], int(x["fidelity"]))  # noqa: E731
    assert sorted(key(x) for x in full) == sorted(
        (e.get("data-config"), int(e.get("data-fidelity"))) for e in drawn_full
    )
    assert sorted(key(x) for x in low) == sorted(
        (e.get("data-config"), int(e.get("data-fidelity"))) for e in drawn_low
    )
    # x follows predicted memory: markers sorted by memory are sorted by x.
    memory = {key(x): x["memory_bytes"] for x in lines}
    placed = sorted(
        (memory[(e.get("data-config"), int(e.get("data-fidelity")))], float(e.get("cx")))
        for e in drawn_full + drawn_low
    )
    xs = [x for _, x in placed]
    assert xs == sorted(xs)

    # The budget line, with the chosen config (within the budget) at or left of it.
    budget = [e for e in root.iter(f"{SVG}line") if e.get("id") == "budget"]
    assert len(budget) == 1 and budget[0].get("x1") == budget[0].get("x2")
    chosen = [e for e in root.iter(f"{SVG}path") if e.get("id") == "chosen"]
    assert len(chosen) == 1
    assert chosen[0].get("data-config") == summary["chosen"]["config"]
    star_x = [float(p.split(",")[0]) for p in chosen[0].get("d")[1:-2].split(" L")]
    assert summary["chosen"]["predicted_memory_bytes"] <= summary["budget_bytes"]
    assert (max(star_x) + min(star_x)) / 2 <= float(budget[0].get("x1")) + 0.01
    texts = " ".join(t.text or "" for t in root.iter(f"{SVG}text"))
    assert f"chosen {summary['chosen']['short']}" in texts
    assert "budget" in texts

    # One diamond per uniform baseline in the summary, labelled.
    diamonds = _by_class(root, "path", "baseline")
    assert sorted(e.get("data-label") for e in diamonds) == sorted(summary["baselines"])
    for label in summary["baselines"]:
        assert label in texts

    # The per-layer strip is the chosen config, layer by layer.
    config = Config.parse(summary["chosen"]["config"])
    bits = sorted(_by_class(root, "rect", "layer-bits"), key=lambda e: int(e.get("data-layer")))
    ranks = sorted(_by_class(root, "rect", "layer-rank"), key=lambda e: int(e.get("data-layer")))
    assert [int(e.get("data-bits")) for e in bits] == list(config.bits)
    assert [int(e.get("data-rank")) for e in ranks] == list(config.ranks)


def test_report_default_path_lower_rungs_and_failed_lines(run_dir, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    steps = json.loads((copy / "job.json").read_text())["search"]["steps"]
    top = next(x for x in _journal(copy) if x["fidelity"] >= steps)
    rung = {**top, "fidelity": 1, "stage": "evolution"}  # the same config at a lower rung
    failed = {"status": "failed", "config": "2/0,2/0,2/0", "fidelity": 1, "error": "boom",
              "attempts": 3, "stage": "evolution", "finished": 0.0}  # fmt: skip
    with (copy / "journal.jsonl").open("a") as fh:
        fh.write(json.dumps(rung) + "\n" + json.dumps(failed) + "\n")
    assert main(["report", str(copy)]) == EXIT_OK
    root = _parse(copy / "report.svg")
    texts = " ".join(t.text or "" for t in root.iter(f"{SVG}text"))
    assert "1 failed (not drawn)" in texts
    lines = [x for x in _journal(copy) if x.get("status") != "failed"]
    assert len(_by_class(root, "circle", "eval")) == len(lines)  # the failure is no marker
    low = [(e.get("data-config"), e.get("data-fidelity")) for e in _by_class(root, "circle", "low")]
    assert (top["config"], "1") in low
    assert len(low) == sum(1 for x in lines if x["fidelity"] < steps)


def _one_error(capsys) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err  # one line
    return err


def test_report_not_a_run_directory(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == EXIT_INPUT
    err = _one_error(capsys)
    assert "not a run directory" in err and "job.json" in err
    assert main(["report", str(tmp_path / "missing")]) == EXIT_INPUT
    assert "not a run directory" in _one_error(capsys)
    assert list(tmp_path.iterdir()) == []


def test_report_unfinished_run(run_dir, tmp_path, capsys):
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    (copy / "summary.json").unlink()
    assert main(["report", str(copy)]) == EXIT_INPUT
    err = _one_error(capsys)
    assert "summary.json" in err and f"--resume {copy}" in err
    assert not (copy / "report.svg").exists()


def test_report_corrupt_journal_line(run_dir, tmp_path, capsys):
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    lines = (copy / "journal.jsonl").read_text().splitlines()
    lines[1] = lines[1][: len(lines[1]) // 2]  # a torn line in the middle
    (copy / "journal.jsonl").write_text("\n".join(lines) + "\n")
    before = _tree_hashes(copy)
    out = tmp_path / "r.svg"
    assert main(["report", str(copy), "--out", str(out)]) == EXIT_INPUT
    err = _one_error(capsys)
    assert "journal.jsonl" in err and "line 2" in err and "restore" in err
    assert not out.exists() and _tree_hashes(copy) == before


def test_report_bad_summary_and_out(run_dir, tmp_path, capsys):
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    assert main(["report", str(copy), "--out", str(tmp_path / "r.png")]) == EXIT_INPUT
    assert ".svg" in _one_error(capsys)
    assert main(["report", str(copy), "--out", str(tmp_path / "no" / "r.svg")]) == EXIT_INPUT
    assert "does not exist" in _one_error(capsys)
    (copy / "summary.json").write_text('{"budget_bytes": "lots"')
    assert main(["report", str(copy)]) == EXIT_INPUT
    err = _one_error(capsys)
    assert "summary.json" in err and "--resume" in err
    assert not (copy / "report.svg").exists()
