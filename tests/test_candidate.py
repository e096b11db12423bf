"""evaluate(config, fidelity) end to end on a tiny Llama: bank -> LoRA tune -> score."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model

from edgeqra.bank import BankSpec, build_bank
from edgeqra.data import load_task
from edgeqra.errors import ConfigError
from edgeqra.evaluate import EvalSettings, Evaluator
from edgeqra.models import LoadedModel, find_units
from edgeqra.space import Config
from edgeqra.tune import TuneSettings, adapter_ranks


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tokenizer):
    """A tiny Llama over the test tokenizer, saved, with a {2, 4}-bit bank and ARC-Easy data."""
    root = tmp_path_factory.mktemp("cand")
    model = tiny_model("llama", vocab_size=len(tokenizer))
    model.save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    units = find_units(model)
    g = torch.Generator().manual_seed(0)
    calibration = torch.randint(0, len(tokenizer), (16, 64), generator=g)
    bank = build_bank(
        root / "model",
        units,
        calibration,
        BankSpec(bits=(2, 4), group_size=32),
        cache_root=root / "cache",
        progress=False,
    )
    loaded = LoadedModel(model, tokenizer, "tiny", root / "model", units)
    task = load_task("arc_easy", n_train=32, n_eval=12)
    evaluator = Evaluator(
        loaded,
        task,
        bank,
        TuneSettings(steps=0, lr=1e-3, batch_size=4, seed=3),
        EvalSettings(seq_len=96, eval_batch_size=8),
        memory=lambda config: (sum(c.bits for c in config), True),
    )
    return evaluator, bank


def test_repeated_calls_give_the_same_numbers(setup):
    evaluator, _ = setup
    config = Config.from_pairs([(2, 4), (4, 8), (4, 0)])
    first = evaluator.evaluate(config, 4)
    other = evaluator.evaluate(Config.uniform(3, 16, 8), 4)  # something else in between
    again = evaluator.evaluate(config, 4)
    strip = lambda r: {k: v for k, v in r.to_json().items() if k != "seconds"}  # noqa: E731
    assert strip(first) == strip(again)
    assert strip(first) != strip(other)


def test_result_fields(setup):
    evaluator, _ = setup
    result = evaluator.evaluate(Config.from_pairs([(4, 4), (4, 4), (2, 4)]), 3)
    assert result.metric == "acc_norm" and result.score == result.accuracy_norm
    assert 0 <= result.accuracy <= 1 and result.loss > 0
    assert result.fidelity == 3 and result.train_loss is not None
    assert result.memory_bytes == 10 and result.fits is True
    assert result.config == "4/4,4/4,2/4"


def test_model_is_left_clean_after_an_evaluation(setup):
    evaluator, bank = setup
    evaluator.evaluate(Config.from_pairs([(2, 8), (4, 8), (2, 8)]), 2)
    model = evaluator.loaded.model
    assert adapter_ranks(model) == {}  # adapters detached
    assert not any(p.requires_grad and "lora" in n for n, p in model.named_parameters())
    q = model.model.layers[0].self_attn.q_proj.weight
    assert torch.equal(q, bank.entry(0, 2)["model.layers.0.self_attn.q_proj"])


def test_more_steps_lower_the_training_loss(setup):
    evaluator, _ = setup
    config = Config.uniform(3, 4, 8)
    short = evaluator.evaluate(config, 1)
    longer = evaluator.evaluate(config, 24)
    assert longer.train_loss < short.train_loss


def test_quantized_config_without_bank_is_refused(setup, tokenizer):
    evaluator, _ = setup
    bare = Evaluator(
        evaluator.loaded, evaluator.task, None, evaluator.tune_settings, evaluator.eval_settings
    )
    with pytest.raises(ConfigError, match="no bank"):
        bare.evaluate(Config.uniform(3, 4, 8), 1)
    assert bare.evaluate(Config.uniform(3, 16, 4), 1).memory_bytes is None
