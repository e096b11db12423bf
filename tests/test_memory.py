"""The memory model: formulas, monotonicity, and agreement with model shapes."""

from __future__ import annotations

import pytest
from conftest import TINY, tiny_model

from edgeqra.memory import ModelSpec, estimate, gptq_linear_bytes, lora_params
from edgeqra.profiles import BudgetMode, FinetuneWorkload, InferenceWorkload
from edgeqra.space import Choice, Config

INF = InferenceWorkload(batch=2, context=128)
FT = FinetuneWorkload(micro_batch=2, seq_len=64, gradient_checkpointing=False)


@pytest.fixture(scope="module")
def spec():
    return ModelSpec.from_model(tiny_model("llama"))


def _est(spec, config, mode, **kw):
    return estimate(spec, config, mode=mode, inference=INF, finetune=FT, **kw)


def test_spec_counts_every_parameter_once(any_tiny_model):
    _, model = any_tiny_model
    spec = ModelSpec.from_model(model)
    linear = sum(u.params for u in spec.units)
    biases = sum(lin.d_out for u in spec.units for lin in u.linears if lin.bias)
    assert linear + biases + spec.other_numel == sum(p.numel() for p in model.parameters())


def test_from_config_on_meta_matches_real_model():
    model = tiny_model("qwen2")
    assert ModelSpec.from_config(model.config) == ModelSpec.from_model(model)


def test_fp16_weights_are_two_bytes_per_parameter(spec):
    n = spec.n_units
    b = _est(spec, Config.uniform(n, 16, 0), BudgetMode.INFERENCE)
    total_params = sum(u.params for u in spec.units) + spec.other_numel
    assert b.components["quantized_weights"] == 0
    assert b.components["unquantized_weights"] == 2 * total_params


def test_gptq_bytes_match_method_formula_when_groups_divide():
    # METHOD.md: params * (q + (16 + q) / G) / 8, plus int32 g_idx per input channel.
    for bits in (2, 3, 4, 8):
        for group in (32, 64, 128):
            d_in, d_out = 1536, 576
            expected = d_in * d_out * (bits + (16 + bits) / group) / 8 + 4 * d_in
            assert gptq_linear_bytes(d_in, d_out, bits, group, bias=False) == expected


def test_kv_cache_formula(spec):
    b = _est(spec, Config.uniform(spec.n_units, 4, 0), BudgetMode.INFERENCE)
    head_dim = TINY["hidden_size"] // TINY["num_attention_heads"]
    expected = (
        2
        * TINY["num_hidden_layers"]
        * TINY["num_key_value_heads"]
        * head_dim
        * INF.context
        * INF.batch
        * 2
    )
    assert b.components["kv_cache"] == expected


def test_sliding_window_layers_cache_only_the_window():
    model = tiny_model("gemma3")
    spec = ModelSpec.from_model(model)
    assert any(w is not None for w in spec.kv_window)
    long = InferenceWorkload(batch=1, context=1024)
    b = estimate(
        spec, Config.uniform(spec.n_units, 4, 0), mode=BudgetMode.INFERENCE, inference=long
    )
    full = 2 * spec.num_kv_heads * spec.head_dim * 2 * 1024 * spec.n_units
    assert b.components["kv_cache"] < full


@pytest.mark.parametrize("mode", [BudgetMode.INFERENCE, BudgetMode.FINETUNE])
def test_monotonic_in_bits_and_rank(spec, mode):
    n = spec.n_units
    totals = [_est(spec, Config.uniform(n, bits, 8), mode).total for bits in (2, 3, 4, 8, 16)]
    assert totals == sorted(totals) and len(set(totals)) == len(totals)
    ranks = [_est(spec, Config.uniform(n, 4, r), mode).total for r in (0, 4, 8, 16, 32)]
    assert ranks == sorted(ranks) and len(set(ranks)) == len(ranks)
    # Raising one unit's bits or rank never lowers the total.
    base = Config.uniform(n, 3, 4)
    for unit in range(n):
        for change in (Choice(4, 4), Choice(3, 8)):
            bumped = Config(tuple(change if i == unit else c for i, c in enumerate(base)))
            assert _est(spec, bumped, mode).total > _est(spec, base, mode).total


def test_finetune_counts_adapter_grads_and_adam_states(spec):
    n = spec.n_units
    with_r = _est(spec, Config.uniform(n, 4, 8), BudgetMode.FINETUNE).components
    params = sum(lora_params(lin.d_in, lin.d_out, 8) for u in spec.units for lin in u.linears)
    assert with_r["lora_weights"] == 4 * params
    assert with_r["lora_grads"] == 4 * params
    assert with_r["optimizer_states"] == 8 * params


def test_gradient_checkpointing_saves_activation_memory(spec):
    n = spec.n_units
    config = Config.uniform(n, 4, 8)
    plain = estimate(spec, config, mode=BudgetMode.FINETUNE, finetune=FT)
    ckpt = estimate(
        spec,
        config,
        mode=BudgetMode.FINETUNE,
        finetune=FinetuneWorkload(micro_batch=2, seq_len=64, gradient_checkpointing=True),
    )
    assert ckpt.components["activations"] < plain.components["activations"]


def test_per_unit_sums_to_weight_and_adapter_components(spec):
    config = Config.from_pairs([(2, 0), (4, 16), (8, 32)])
    b = _est(spec, config, BudgetMode.INFERENCE)
    assert sum(b.per_unit) == b.components["quantized_weights"] + b.components["lora_weights"]
    assert b.per_unit[0] < b.per_unit[1] < b.per_unit[2]


def test_unit_count_mismatch_is_a_config_error(spec):
    from edgeqra.errors import ConfigError

    with pytest.raises(ConfigError, match="units"):
        _est(spec, Config.uniform(spec.n_units + 1, 4, 8), BudgetMode.INFERENCE)
