"""CLI behaviour: output, --json, and exit codes on bad input."""

from __future__ import annotations

import json

import pytest
from conftest import tiny_model
from transformers import LlamaConfig

from edgeqra.cli import EXIT_BUDGET, EXIT_INPUT, EXIT_OK, main


@pytest.fixture(scope="module")
def config_only_folder(tmp_path_factory):
    """A folder with just config.json: enough for `plan` (meta-device shapes)."""
    folder = tmp_path_factory.mktemp("cfg")
    tiny_model("llama").config.save_pretrained(folder)
    return folder


def test_profiles_json_lists_builtins(capsys):
    assert main(["profiles", "--json"]) == EXIT_OK
    names = {p["name"] for p in json.loads(capsys.readouterr().out)}
    assert {"jetson-orin-nano-8gb", "rtx-4090-24gb", "t4-16gb", "h100-80gb"} <= names


@pytest.mark.parametrize("argv", [["profiles", "show", "t4-16gb"], ["profiles", "t4-16gb"]])
def test_profiles_show(capsys, argv):
    assert main([*argv, "--json"]) == EXIT_OK
    assert json.loads(capsys.readouterr().out)["name"] == "t4-16gb"


def test_unknown_profile_is_exit_2_with_the_available_names(capsys):
    assert main(["profiles", "show", "jetson-nano-9000"]) == EXIT_INPUT
    err = capsys.readouterr().err
    assert "jetson-nano-9000" in err and "jetson-orin-nano-8gb" in err


def test_plan_json_rows_and_best_fit(capsys, config_only_folder):
    assert (
        main(["plan", "--profile", "t4-16gb", "--model", str(config_only_folder), "--json"])
        == EXIT_OK
    )
    plan = json.loads(capsys.readouterr().out)
    labels = [r["label"] for r in plan["rows"]]
    assert labels == ["FP16 LoRA", "GPTQ 8-bit", "GPTQ 4-bit", "GPTQ 3-bit", "GPTQ 2-bit"]
    totals = [r["total"] for r in plan["rows"]]
    assert totals == sorted(totals, reverse=True)
    assert plan["best"]["fits"] and plan["best"]["average_bits"] == 8


def test_plan_table_renders(capsys, config_only_folder):
    assert (
        main(["plan", "--profile", "rtx-3060-12gb", "--model", str(config_only_folder)]) == EXIT_OK
    )
    out = capsys.readouterr().out
    assert "activations" in out and "reserve" in out and "Largest average bit-width" in out


def test_missing_model_is_exit_2(capsys, tmp_path):
    assert main(["plan", "--profile", "t4-16gb", "--model", str(tmp_path / "nope")]) == EXIT_INPUT
    assert "not found" in capsys.readouterr().err


def test_impossible_budget_states_the_minimum(capsys, tmp_path):
    big = tmp_path / "big"  # a ~1B-parameter Llama shape; config only, built on the meta device
    LlamaConfig(
        hidden_size=2048,
        intermediate_size=5632,
        num_hidden_layers=22,
        num_attention_heads=32,
        num_key_value_heads=4,
        vocab_size=32000,
    ).save_pretrained(big)
    tiny = tmp_path / "tiny-device.toml"
    text = (
        'name = "tiny-device"\ndisplay_name = "Too small"\nmemory_gib = 0.5\nunified_memory = false\n'
        'os_reserved_gib = 0.0\nruntime_reserve_mib = 100\ncompute_capability = "8.6"\n'
        'kernels = ["torch"]\nbits = [2, 3, 4, 8]\nmode = "finetune"\nsource = "test"\n'
        "[inference]\nbatch = 1\ncontext = 128\n"
        "[finetune]\nmicro_batch = 1\nseq_len = 128\ngradient_checkpointing = true\n"
    )
    tiny.write_text(text)
    code = main(["plan", "--profile", str(tiny), "--model", str(big)])
    assert code == EXIT_BUDGET
    err = capsys.readouterr().err
    assert "nothing fits" in err and "GiB" in err and "need" in err


def test_greedy_best_fit_is_between_the_uniform_rows(capsys, tmp_path):
    """A budget between uniform 4- and 8-bit gives a mixed config with 4 < avg bits < 8."""
    from edgeqra.memory import ModelSpec
    from edgeqra.plan import make_plan
    from edgeqra.profiles import load_profile

    spec = ModelSpec.from_model(
        tiny_model("llama", num_hidden_layers=8, hidden_size=256, intermediate_size=1024)
    )
    base = load_profile("t4-16gb")
    plan = make_plan(spec, base, mode=base.mode)
    by = {r.label: r.breakdown.total for r in plan.rows}
    import dataclasses

    budget_gib = (by["GPTQ 4-bit"] + by["GPTQ 8-bit"]) / 2 / (1 << 30)
    squeezed = dataclasses.replace(base, memory_gib=budget_gib + base.os_reserved_gib)
    best = make_plan(spec, squeezed).best
    assert best is not None and best.fits
    assert 4 < best.average_bits < 8


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory, tokenizer):
    """A tiny Llama + tokenizer saved as a HF folder: a full `evaluate` runs on it in seconds."""
    folder = tmp_path_factory.mktemp("tinymodel")
    tiny_model("llama", vocab_size=len(tokenizer)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.mark.parametrize(
    "spec, needle",
    [
        ("4/8,4/8,banana", "not `BITS/RANK`"),
        ("4/8,4/8", "has 2 units but the model has 3"),
        ("4/8,5/8,4/8", "bit-width 5, not in the allowed set"),
        ("4/8,4/7,4/8", "rank 7, not in the allowed set"),
        ("[[4, 8], [4]]", "use [bits, rank]"),
    ],
)
def test_evaluate_rejects_bad_specs_before_any_work(capsys, config_only_folder, spec, needle):
    code = main(["evaluate", "--model", str(config_only_folder), "--config", spec, "--steps", "1"])
    assert code == EXIT_INPUT
    err = capsys.readouterr().err
    assert needle in err and err.count("\n") == 1  # one line, not a traceback


def test_evaluate_config_file_that_does_not_exist(capsys, config_only_folder, tmp_path):
    code = main(
        [
            "evaluate",
            "--model",
            str(config_only_folder),
            "--config",
            str(tmp_path / "c.json"),
            "--steps",
            "1",
        ]
    )
    assert code == EXIT_INPUT and "does not exist" in capsys.readouterr().err


def test_evaluate_end_to_end_json(capsys, tiny_folder, tmp_path, monkeypatch):
    monkeypatch.setenv("EDGEQRA_CACHE", str(tmp_path / "cache"))
    spec = tmp_path / "config.json"
    spec.write_text(json.dumps([[4, 8], [16, 4], [4, 0]]))
    argv = [
        "evaluate",
        "--model",
        str(tiny_folder),
        "--task",
        "arc_easy",
        "--config",
        str(spec),
        "--steps",
        "3",
        "--n-train",
        "16",
        "--n-eval",
        "6",
        "--seq-len",
        "96",
        "--calib-samples",
        "8",
        "--group-size",
        "32",
        "--profile",
        "t4-16gb",
        "--device",
        "cpu",
        "--json",
    ]
    assert main(argv) == EXIT_OK
    result = json.loads(capsys.readouterr().out)
    assert result["config"] == "4/8,16/4,4/0" and result["fidelity"] == 3
    assert 0 <= result["accuracy"] <= 1 and result["fits"] is True and result["memory_bytes"] > 0
    banks = list((tmp_path / "cache" / "banks").iterdir())
    assert len(banks) == 1 and (banks[0] / "b4" / "DONE").is_file()
    assert not (banks[0] / "b2").exists()  # only the bit-widths the config uses are built
    # Same call again: a bank cache hit and the same numbers.
    assert main(argv) == EXIT_OK
    again = json.loads(capsys.readouterr().out)
    assert {k: v for k, v in again.items() if k != "seconds"} == {
        k: v for k, v in result.items() if k != "seconds"
    }
