"""Memory measurement: CPU checks of the weight term, `plan --measure` exit codes, GPU runs.

The GPU tests skip cleanly without CUDA; the CPU ones check what can be checked without one.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, LlamaConfig

from edgeqra.cli import EXIT_NO_GPU, EXIT_OK, main
from edgeqra.measure import dry_run, measure_config, percent_error
from edgeqra.profiles import load_profile
from edgeqra.space import Config

ARCH = Path(__file__).resolve().parents[1] / "examples" / "architectures"
NO_CUDA = not torch.cuda.is_available()


def _tiny() -> LlamaConfig:
    return LlamaConfig(
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=256,
        max_position_embeddings=256,
        tie_word_embeddings=True,
    )


def test_percent_error_sign():
    assert percent_error(110, 100) == pytest.approx(10.0)  # over-estimate: positive (safe)
    assert percent_error(90, 100) == pytest.approx(-10.0)


@pytest.mark.parametrize("pairs", [[(16, 8)] * 3, [(2, 4), (3, 0), (8, 32)]])
def test_dry_run_built_bytes_equal_the_weight_term(tmp_path, pairs):
    sizes = dry_run(_tiny(), Config.from_pairs(pairs), work_dir=tmp_path, group_size=64)
    assert sizes["plan_quantized"] == sizes["predicted_quantized"] == sizes["built_quantized"]
    assert sizes["plan_dense"] == sizes["predicted_dense"] == sizes["built_dense"]


def test_dry_run_shapes_only_on_the_8b_architecture():
    """Llama-3.1-8B mixed config: the checkpoint's tensors (from shapes) = the weight term."""
    hf = AutoConfig.from_pretrained(ARCH / "llama-3.1-8b")
    config = Config.from_pairs([(b, 8) for b in (2, 3, 4, 8) * 8])
    sizes = dry_run(hf, config)
    assert "built_quantized" not in sizes
    assert sizes["plan_quantized"] == sizes["predicted_quantized"] > 2 * 2**30
    assert sizes["plan_dense"] == sizes["predicted_dense"]


def test_smollm2_architecture_matches_findings():
    """The config-only SmolLM2 folder has the published shapes (FINDINGS.md)."""
    from edgeqra.memory import ModelSpec

    spec = ModelSpec.from_config(AutoConfig.from_pretrained(ARCH / "smollm2-135m"))
    assert spec.n_units == 30 and spec.hidden_size == 576 and spec.num_kv_heads == 3
    assert sum(spec.unit_params) + spec.other_numel == 134_515_008


@pytest.mark.skipif(not NO_CUDA, reason="checks the no-GPU path")
@pytest.mark.parametrize("as_json", [False, True])
def test_plan_measure_without_gpu_exits_4_with_the_reason(capsys, as_json):
    argv = ["plan", "--profile", "t4-16gb", "--model", str(ARCH / "smollm2-135m"), "--measure"]
    assert main([*argv, "--json"] if as_json else argv) == EXIT_NO_GPU
    captured = capsys.readouterr()
    if as_json:
        data = json.loads(captured.out)
        assert data["measured"] is None and "needs a CUDA GPU" in data["measure_error"]
        assert data["rows"]  # the prediction is still there
    else:
        assert "needs a CUDA GPU" in captured.err
        assert "GPTQ 4-bit" in captured.out or "4-bit" in captured.out


def test_plan_without_measure_is_unchanged(capsys):
    argv = ["plan", "--profile", "t4-16gb", "--model", str(ARCH / "smollm2-135m"), "--json"]
    assert main(argv) == EXIT_OK
    assert "measured" not in json.loads(capsys.readouterr().out)


@pytest.mark.gpu
@pytest.mark.skipif(NO_CUDA, reason="needs a CUDA GPU")
def test_measure_config_on_gpu(tmp_path):
    record = measure_config(
        _tiny(),
        Config.from_pairs([(4, 8), (3, 0), (8, 4)]),
        load_profile("rtx-4090-24gb"),
        work_dir=tmp_path,
        kernels=("triton", "torch"),
    )
    phases = record["phases"]
    assert [p["mode"] for p in phases] == ["inference", "finetune", "finetune"]
    for phase in phases:
        assert "measured" in phase, phase.get("error")
        m = phase["measured"]
        assert m["peak_allocated"] >= m["start_allocated"] > 0
        assert m["process_peak"] >= m["peak_reserved"] >= m["peak_allocated"]


@pytest.mark.gpu
@pytest.mark.skipif(NO_CUDA, reason="needs a CUDA GPU")
def test_plan_measure_on_gpu(capsys):
    argv = ["plan", "--profile", "t4-16gb", "--model", str(ARCH / "smollm2-135m"), "--measure"]
    assert main([*argv, "--json"]) == EXIT_OK
    data = json.loads(capsys.readouterr().out)
    assert data["measured"]["phases"] and data["measure_error"] is None


def _bench(name: str):
    """Import a bench/ script as a module (bench/ is not a package)."""
    import importlib.util

    path = ARCH.parents[1] / "bench" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"bench_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_memory_truth_grid_is_seeded_and_complete():
    bench = _bench("memory_truth")
    a = bench.grid(30, 6, seed=0, arch="smollm2-135m")
    assert list(a) == ["fp16", "u8", "u4", "u3", "u2", "m0", "m1", "m2", "m3", "m4", "m5"]
    assert a == bench.grid(30, 6, seed=0, arch="smollm2-135m")
    assert a["m0"] != bench.grid(30, 6, seed=1, arch="smollm2-135m")["m0"]
    assert len({str(c) for c in a.values()}) == 11  # six distinct mixed configs
    assert all(len(c) == 30 for c in a.values())


def test_memory_truth_dry_run_cli_on_8b_shapes(tmp_path, capsys):
    bench = _bench("memory_truth")
    out = tmp_path / "dry.json"
    argv = ["--dry-run", "--arch", "llama-3.1-8b", "--configs", "u3,m1", "--build-max-params", "0"]
    bench.main([*argv, "--out", str(out)])
    rows = json.loads(out.read_text())["results"]["llama-3.1-8b"]
    assert [r["label"] for r in rows] == ["u3", "m1"]
    assert all(r["plan_quantized"] == r["predicted_quantized"] for r in rows)
    assert "weight-term mismatches: 0" in capsys.readouterr().out


def test_memory_truth_runs_each_phase_in_a_fresh_process(tmp_path, monkeypatch):
    """Issue 15: one child process per (config, phase), its records merged in phase order."""
    import subprocess

    bench = _bench("memory_truth")
    args = bench._parse_args(["--arch", "smollm2-135m", "--configs", "u4", "--jobs", "2"])
    assert args.isolation == "phase" and args.quantized_backward == "recompute"
    assert bench._wanted_phases(args) == ["inference", "ft", "ft+ckpt"]
    assert bench._phase_args("ft+ckpt") == {"modes": ["finetune"], "checkpointing": (True,)}
    calls = []

    def fake_run(cmd, env, **kw):
        calls.append((cmd, env["CUDA_VISIBLE_DEVICES"]))
        phase = cmd[cmd.index("--child") + 1].split("/")[2]
        out = Path(cmd[cmd.index("--out") + 1])
        if phase == "ft+ckpt":  # a child that dies (e.g. a CUDA error) is a recorded result
            return subprocess.CompletedProcess(cmd, 1, "", "boom\nRuntimeError: bad kernel")
        record = {"phases": [{"mode": phase}], "kernels": {phase: {}}, "cuda_context_bytes": 7}
        out.write_text(json.dumps(record))
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(subprocess, "run", fake_run)
    record = bench._run_children(args, "smollm2-135m", "u4", tmp_path, gpu=1)
    assert [c[0][c[0].index("--child") + 1] for c in calls] == [
        "smollm2-135m/u4/inference",
        "smollm2-135m/u4/ft",
        "smollm2-135m/u4/ft+ckpt",
    ]
    assert {gpu for _, gpu in calls} == {"1"}
    assert all("--quantized-backward" in cmd for cmd, _ in calls)
    modes = [p["mode"] for p in record["phases"]]
    assert modes == ["inference", "ft", "ft+ckpt"]
    assert "RuntimeError: bad kernel" in record["phases"][2]["error"]
    assert record["phases"][0]["process"]["cuda_context_bytes"] == 7


def test_memory_truth_resume_measures_only_what_the_file_lacks(tmp_path, monkeypatch, capsys):
    """--resume keeps complete configs, measures the failed and missing ones, refuses a mismatch."""
    import subprocess

    import edgeqra.gptq

    bench = _bench("memory_truth")
    out = tmp_path / "truth.json"
    argv = ["--arch", "smollm2-135m", "--configs", "u4,u3,u2", "--out", str(out),
            "--work-dir", str(tmp_path / "work")]  # fmt: skip
    ran = []

    def fake_run(cmd, env, **kw):
        arch_label_phase = cmd[cmd.index("--child") + 1]
        ran.append(arch_label_phase)
        phase = arch_label_phase.split("/")[2]
        record = {"phases": [{"mode": phase, "measured": {"peak_allocated": len(ran)}}],
                  "kernels": {}}  # fmt: skip
        Path(cmd[cmd.index("--out") + 1]).write_text(json.dumps(record))
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(subprocess, "run", fake_run)
    monkeypatch.setattr(edgeqra.gptq, "write_random_checkpoint", lambda *a, **k: None)
    first = bench.measure(bench._parse_args([*argv, "--configs", "u4,u3"]))
    first["results"]["smollm2-135m"][1]["phases"][2] = {"mode": "ft+ckpt", "error": "OOM"}
    out.write_text(json.dumps(first))
    kept = first["results"]["smollm2-135m"][0]
    ran.clear()

    again = bench.measure(bench._parse_args([*argv, "--resume"]))
    assert sorted({r.rsplit("/", 1)[0] for r in ran}) == ["smollm2-135m/u2", "smollm2-135m/u3"]
    rows = again["results"]["smollm2-135m"]
    assert [r["label"] for r in rows] == ["u4", "u3", "u2"]  # the grid's order
    assert rows[0] == kept and all(bench._complete(r) for r in rows)
    assert "configs kept 1, to measure 2" in capsys.readouterr().out
    assert json.loads(out.read_text())["results"] == again["results"]

    with pytest.raises(SystemExit) as exit_:
        bench.measure(bench._parse_args([*argv, "--resume", "--group-size", "128"]))
    assert exit_.value.code == 2
    assert "other settings (group_size)" in capsys.readouterr().err


def test_memory_replay_of_the_h200_measurements_never_under_predicts_much(capsys):
    """bench/memory_replay.py on the stored H200 rows (issue 15): the figures RESULTS.md quotes.

    Bounds: at most 1 % under (the JSON's first-config smollm2 rows; see RESULTS.md) and at
    most 5 % over on every row, for every phase.
    """
    replay = _bench("memory_replay")
    files = sorted((ARCH.parents[1] / "bench" / "measurements").glob("memory_truth_*.json"))
    rows = [r for f in files for r in replay.replay(json.loads(f.read_text()))]
    assert len(rows) == 3 * 44
    assert {r["phase"] for r in rows} == {"inference", "ft", "ft+ckpt"}
    assert min(r["error_pct"] for r in rows) > -1.0
    assert max(r["error_pct"] for r in rows) <= 5.0
    # The recompute path drops the dense-weights term from quantized fine-tuning (8B, 4-bit):
    u4 = next(r for r in rows if r["arch"] == "llama-3.1-8b" and r["label"] == "u4" and
              r["phase"] == "ft")  # fmt: skip
    fp16 = next(r for r in rows if r["arch"] == "llama-3.1-8b" and r["label"] == "fp16" and
                r["phase"] == "ft")  # fmt: skip
    assert fp16["predicted"] - u4["predicted_recompute"] > 9 * (1 << 30)
