"""`edgeqra search` end to end on a tiny random Llama: budget, run directory, resume, errors."""

from __future__ import annotations

import json

import pytest
from conftest import tiny_model

from edgeqra.cli import EXIT_BUDGET, EXIT_INPUT, EXIT_OK, main
from edgeqra.memory import ModelSpec, estimate_for_profile
from edgeqra.profiles import load_profile
from edgeqra.space import Config

PROFILE = "t4-16gb"
GROUP = 32


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory, tokenizer):
    """A tiny Llama + tokenizer saved as a HF folder."""
    folder = tmp_path_factory.mktemp("tinysearch")
    tiny_model("llama", vocab_size=len(tokenizer)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def budget_gb(tiny_folder):
    """Between the smallest and the largest config: the budget binds."""
    from transformers import AutoConfig

    spec = ModelSpec.from_config(AutoConfig.from_pretrained(tiny_folder))
    profile = load_profile(PROFILE)

    def gib(bits: int, rank: int) -> float:
        config = Config.uniform(spec.n_units, bits, rank)
        return estimate_for_profile(spec, config, profile, group_size=GROUP).total / 2**30

    low, high = gib(2, 0), gib(8, 32)
    assert low < high
    return gib(4, 8) + 1e-6  # uniform 4-bit rank 8 just fits, 8-bit rank 32 does not


def _argv(folder, out, budget, *extra):
    return [
        "search",
        "--model",
        str(folder),
        "--profile",
        PROFILE,
        "--budget-gb",
        f"{budget:.9f}",
        "--task",
        "arc_easy",
        "--steps",
        "4",
        "--evals",
        "24",
        "--population",
        "4",
        "--children",
        "4",
        "--generations",
        "2",
        "--n-train",
        "16",
        "--n-eval",
        "6",
        "--seq-len",
        "96",
        "--calib-samples",
        "8",
        "--group-size",
        str(GROUP),
        "--device",
        "cpu",
        "--out",
        str(out),
        "--json",
        *extra,
    ]


def test_search_end_to_end_respects_budget_and_resumes(
    capsys, tiny_folder, budget_gb, tmp_path, monkeypatch
):
    monkeypatch.setenv("EDGEQRA_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "run"
    assert main(_argv(tiny_folder, out, budget_gb)) == EXIT_OK
    summary = json.loads(capsys.readouterr().out)
    budget = summary["budget_bytes"]
    assert abs(budget - budget_gb * 2**30) < 2  # --budget-gb is printed with 9 decimals
    chosen = summary["chosen"]
    assert chosen["fits"] and chosen["predicted_memory_bytes"] <= budget
    # Everything the search evaluated was within the budget, and journaled once.
    lines = [json.loads(x) for x in (out / "journal.jsonl").read_text().splitlines()]
    keys = [(x["config"], x["fidelity"]) for x in lines]
    assert len(keys) == len(set(keys))
    assert all(x["memory_bytes"] <= budget and x["fits"] for x in lines)
    assert summary["search"]["evaluations"] <= 24
    # The run directory holds the job, journal, front, chosen config, sensitivity and summary.
    for name in ("job.json", "journal.jsonl", "front.json", "chosen.json", "summary.json"):
        assert (out / name).is_file(), name
    assert json.loads((out / "sensitivity.json").read_text())["kl"]
    front = json.loads((out / "front.json").read_text())
    assert chosen["config"] in {r["config"] for r in front}
    config = Config.parse(chosen["config"])
    if any(c.rank for c in config):  # the adapter carries the per-layer ranks
        adapter = json.loads((out / "adapter" / "adapter_config.json").read_text())
        expected = {c.rank for c in config if c.rank}
        got = set(adapter["rank_pattern"].values())  # PEFT leaves ranks equal to `r` out
        assert got <= expected and expected - got <= {adapter["r"]}
    # The uniform baselines that fit are reported at the same length (4-bit rank 8 fits).
    assert "GPTQ 4-bit" in summary["baselines"] and "GPTQ 8-bit" not in summary["baselines"]

    # Resuming a finished run re-evaluates nothing and reaches the same answer.
    assert main(["search", "--resume", str(out), "--json"]) == EXIT_OK
    again = json.loads(capsys.readouterr().out)
    assert again["search"]["fresh_evaluations"] == 0
    assert again["chosen"]["config"] == chosen["config"]
    # Its cost is still the whole search's (the journal's steps), not the resumed process's 0.
    steps = sum(x["fidelity"] for x in lines if x["stage"] != "baseline")
    assert steps > 0 and again["search"]["tuning_steps"] == 0
    assert again["search"]["epochs"] == summary["search"]["epochs"] > 0
    assert len((out / "journal.jsonl").read_text().splitlines()) == len(lines)


def test_search_refuses_to_overwrite_a_run(capsys, tiny_folder, budget_gb, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "job.json").write_text("{}")
    assert main(_argv(tiny_folder, out, budget_gb)) == EXIT_INPUT
    assert "--resume" in capsys.readouterr().err


def test_search_input_errors(capsys, tiny_folder, tmp_path):
    assert main(["search", "--model", str(tiny_folder)]) == EXIT_INPUT
    assert "--profile" in capsys.readouterr().err
    assert main(["search", "--resume", str(tmp_path)]) == EXIT_INPUT
    assert "not a run directory" in capsys.readouterr().err
    assert main(["search", "--profile", "no-such-device"]) == EXIT_INPUT


def test_search_impossible_budget_exits_3_before_any_work(capsys, tiny_folder, tmp_path):
    out = tmp_path / "run"
    assert main(_argv(tiny_folder, out, 0.01)) == EXIT_BUDGET
    err = capsys.readouterr().err
    assert "nothing fits" in err and err.count("\n") == 1
    assert not (out / "journal.jsonl").exists()


def test_budget_bits_search_fills_every_candidate_to_the_budget(
    capsys, tiny_folder, tmp_path, monkeypatch
):
    """--budget-bits 3.5 is the memory of a rank-8 config at 3.5 average bits, exactly; every
    evaluated config that is not a uniform anchor has no single up step left that fits."""
    from transformers import AutoConfig

    from edgeqra.plan import budget_for_bits
    from edgeqra.space import SearchSpace

    monkeypatch.setenv("EDGEQRA_CACHE", str(tmp_path / "cache"))
    spec = ModelSpec.from_config(AutoConfig.from_pretrained(tiny_folder))
    profile = load_profile(PROFILE)
    budget = budget_for_bits(spec, profile, 3.5, group_size=GROUP)
    out = tmp_path / "run"
    argv = _argv(tiny_folder, out, 1.0, "--no-bayes", "--evals", "12")
    at = argv.index("--budget-gb")
    argv[at : at + 2] = ["--budget-bits", "3.5"]
    assert main(argv) == EXIT_OK
    summary = json.loads(capsys.readouterr().out)
    assert summary["budget_bytes"] == budget

    def memory(config: Config) -> int:
        return estimate_for_profile(spec, config, profile, group_size=GROUP).total

    space = SearchSpace(spec.n_units)
    lines = [json.loads(x) for x in (out / "journal.jsonl").read_text().splitlines()]
    searched = [Config.parse(x["config"]) for x in lines]
    searched = [c for c in searched if len(set(c)) > 1]  # uniform anchors are references
    assert searched, "the search evaluated no mixed config"
    for config in searched:
        assert memory(config) <= budget
        for index, choice in enumerate(config):
            for name, delta in space._moves(choice):
                if delta > 0:
                    choices = list(config.choices)
                    choices[index] = space._step(choice, name, delta)
                    assert memory(Config(tuple(choices))) > budget, (config.short(), index, name)


def test_budget_bits_bad_values_exit_2(capsys, tiny_folder, tmp_path):
    for bad in ("1.5", "17", "nan"):
        argv = _argv(tiny_folder, tmp_path / f"run{bad}", 1.0)
        at = argv.index("--budget-gb")
        argv[at : at + 2] = ["--budget-bits", bad]
        assert main(argv) == EXIT_INPUT, bad
        err = capsys.readouterr().err
        assert "budget_bits" in err and err.count("\n") == 1
        assert not (tmp_path / f"run{bad}" / "journal.jsonl").exists()
    both = _argv(tiny_folder, tmp_path / "both", 1.0, "--budget-bits", "4")
    assert main(both) == EXIT_INPUT
    assert "not both" in capsys.readouterr().err
    assert (
        main(["plan", "--profile", PROFILE, "--model", str(tiny_folder), "--budget-bits", "1"])
        == EXIT_INPUT
    )
    assert "budget_bits" in capsys.readouterr().err


def test_ceiling_seeds_buy_a_uniform_configs_bits_with_adapters_only(tiny_folder):
    """Over the budget, uniform 4-bit enters the search with its bits kept and the least
    important adapters lowered; uniform 8-bit, which no adapter saving brings in, does not."""
    from transformers import AutoConfig

    from edgeqra.pipeline import _ceiling_seeds, baseline_configs
    from edgeqra.space import SearchSpace

    spec = ModelSpec.from_config(AutoConfig.from_pretrained(tiny_folder))
    profile = load_profile(PROFILE)

    def memory(config: Config) -> int:
        return estimate_for_profile(spec, config, profile, group_size=GROUP).total

    space = SearchSpace(spec.n_units)
    n = spec.n_units
    budget = memory(Config.uniform(n, 8, 0)) - 1  # 8 bits do not fit even without adapters
    four = Config.uniform(n, 4, 8)
    assert memory(four) > budget
    importance = [1.0] * (n - 1) + [0.0]
    baselines = baseline_configs(n, space.bits, 8)
    seeds = _ceiling_seeds(baselines, space, memory, budget, importance, False)
    # Every uniform below 8 bits is over this budget at rank 8 (the tiny model's memory is
    # mostly adapters); each enters with its own bits, most bits first.
    assert [c.bits for c in seeds] == [Config.uniform(n, b, 0).bits for b in (4, 3, 2)]
    assert all(memory(c) <= budget for c in seeds)
    assert seeds[0].ranks[-1] < 8  # the unimportant unit's adapter went first
    filled = _ceiling_seeds(baselines, space, memory, budget, importance, True)[0]
    assert memory(filled) <= budget and filled.bits >= seeds[0].bits
