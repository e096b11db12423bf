"""LoRA attach/train/detach on tiny random Llamas: per-unit ranks, determinism, restoration."""

from __future__ import annotations

import math
import re

import pytest
import torch
from conftest import tiny_model

from edgeqra.errors import ConfigError, DataError, ModelError
from edgeqra.models import find_units
from edgeqra.space import Config
from edgeqra.tune import (
    TARGETS,
    TrainBatches,
    TuneSettings,
    _row_order,
    adapter_ranks,
    attach_lora,
    detach_lora,
    lora_config,
    tune,
)

VOCAB = 256  # conftest.TINY


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models gain nothing from intra-op threads, and OpenMP spin-waits make them
    10-50x slower when another process shares the cores; restore the setting after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _batches(n: int = 8, seq: int = 24, prompt: int = 8, seed: int = 0) -> TrainBatches:
    """Random token rows whose first `prompt` tokens are unlabelled (the 'prompt')."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (n, seq), generator=generator)  # (n, seq)
    labels = ids.clone()
    labels[:, :prompt] = -100
    return TrainBatches(ids, labels, torch.ones_like(ids))


def _adapter_state(model) -> dict[str, torch.Tensor]:
    """Copies of every LoRA tensor, keyed by name."""
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}


def _config(ranks, bits: int = 4) -> Config:
    return Config.from_pairs([(bits, r) for r in ranks])


def test_per_unit_ranks_and_trainable_params():
    model = tiny_model()
    units = find_units(model)
    peft_model = attach_lora(model, units, _config((0, 4, 16)), TuneSettings(steps=0))
    ranks = adapter_ranks(peft_model)
    expected = {
        lin.name: rank
        for unit, rank in zip(units, (0, 4, 16), strict=True)
        if rank
        for lin in unit.linears
    }
    assert ranks == expected
    assert {name.rsplit(".", 1)[-1] for name in ranks} == set(TARGETS)
    assert not any(name.startswith("model.layers.0.") for name in ranks)

    trainable = {
        n: p.numel() for n, p in peft_model.get_base_model().named_parameters() if p.requires_grad
    }
    for unit, rank in zip(units, (0, 4, 16), strict=True):
        got = sum(v for n, v in trainable.items() if n.startswith(unit.name + "."))
        assert got == sum(rank * (lin.d_in + lin.d_out) for lin in unit.linears), unit.name


def test_layer_1_and_layer_11_keep_their_own_ranks():
    # PEFT matches rank_pattern keys as `(.*\.)?(KEY)$`; the escaped full name of layer 1
    # must not catch layer 11 (nor 10..19 in a bigger model).
    model = tiny_model(num_hidden_layers=12)
    units = find_units(model)
    ranks = [8] * 12
    ranks[1], ranks[11] = 4, 16
    settings = TuneSettings(steps=0)
    peft_config = lora_config(units, _config(ranks), settings)
    assert peft_config.r == 8
    assert set(peft_config.rank_pattern.values()) == {4, 16}
    key = re.escape("model.layers.1.mlp.up_proj")
    assert peft_config.rank_pattern[key] == 4
    assert re.match(rf"(.*\.)?({key})$", "model.layers.11.mlp.up_proj") is None

    got = adapter_ranks(attach_lora(model, units, _config(ranks), settings))
    for unit, rank in zip(units, ranks, strict=True):
        for lin in unit.linears:
            assert got[lin.name] == rank, lin.name


def test_only_lora_trains_and_base_weights_stay_bitwise():
    model = tiny_model()
    units = find_units(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    peft_model, log = tune(
        model, units, _config((4, 8, 4)), _batches(), TuneSettings(steps=5, lr=1e-2)
    )
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert log.trainable_params == sum(
        p.numel() for p in peft_model.parameters() if p.requires_grad
    )
    assert not peft_model.training
    # LoRA B starts at zero, so a nonzero B proves the adapters moved.
    assert any(p.abs().sum() > 0 for n, p in peft_model.named_parameters() if "lora_B" in n)
    base = detach_lora(peft_model)
    after = dict(base.named_parameters())
    assert after.keys() == before.keys()
    for name, tensor in before.items():
        assert torch.equal(after[name], tensor), name


def test_loss_goes_down_on_a_repeated_batch():
    model = tiny_model()
    units = find_units(model)
    batches = _batches(n=4)  # one batch of 4 rows, seen every step
    _, log = tune(model, units, _config((8, 8, 8)), batches, TuneSettings(steps=30, lr=1e-2))
    assert len(log.losses) == 30 and not log.diverged
    # Random init: loss ~ ln(256) = 5.55; memorising 4 rows takes it well below.
    assert log.losses[0] == pytest.approx(math.log(VOCAB), abs=0.2)
    assert log.losses[-1] < log.losses[0] - 1.0


def _run(model, seed: int, dropout: float = 0.1):
    settings = TuneSettings(steps=6, lr=1e-2, batch_size=3, dropout=dropout, seed=seed)
    peft_model, log = tune(model, find_units(model), _config((4, 0, 8)), _batches(), settings)
    return log.losses, _adapter_state(peft_model)


def test_determinism_and_global_rng_untouched():
    models = [tiny_model() for _ in range(3)]  # tiny_model seeds the global RNG itself
    torch.manual_seed(1234)
    rng = torch.get_rng_state()
    losses_a, state_a = _run(models[0], seed=0)
    assert torch.equal(torch.get_rng_state(), rng)
    losses_b, state_b = _run(models[1], seed=0)
    assert losses_a == losses_b
    assert state_a.keys() == state_b.keys()
    assert all(torch.equal(state_a[n], state_b[n]) for n in state_a)

    losses_c, state_c = _run(models[2], seed=1)
    assert losses_c != losses_a
    assert not any(torch.equal(state_a[n], state_c[n]) for n in state_a)
    assert torch.equal(torch.get_rng_state(), rng)


def test_fidelity_n_is_a_prefix_of_fidelity_2n():
    # Constant schedule after warmup + config-independent data order (wrapping past the
    # 8 rows): the first N steps of a 2N run are the N run. Tolerance 0: same ops, same order.
    short = _run_steps(5)
    long = _run_steps(10)
    assert long[:5] == short


def test_padding_columns_are_trimmed_and_change_nothing():
    """Rows of 10-20 real tokens right-padded to 64: `train` runs each batch at its longest
    row, and the losses and adapters equal a run on the same rows padded only to 20."""

    def padded(seq: int) -> TrainBatches:
        generator = torch.Generator().manual_seed(3)
        lengths = torch.randint(10, 21, (8,), generator=generator).tolist()
        ids = torch.zeros((8, seq), dtype=torch.long)  # pad id 0
        labels = torch.full((8, seq), -100)
        mask = torch.zeros((8, seq), dtype=torch.long)
        for i, n in enumerate(lengths):
            row = torch.randint(1, VOCAB, (n,), generator=generator)
            ids[i, :n], labels[i, 4:n], mask[i, :n] = row, row[4:], 1
        return TrainBatches(ids, labels, mask)

    settings = TuneSettings(steps=4, lr=1e-2, batch_size=3)
    runs = []
    widths: list[int] = []
    for seq in (64, 20):
        model = tiny_model()
        model.get_input_embeddings().register_forward_hook(
            lambda _m, args, _out: widths.append(args[0].shape[1])
        )
        tuned, log = tune(model, find_units(model), _config((4, 8, 0)), padded(seq), settings)
        runs.append((log.losses, _adapter_state(tuned)))
    (wide, wide_state), (narrow, narrow_state) = runs
    assert max(widths) <= 20 and widths[:4] == widths[4:]  # the 64-wide rows ran trimmed
    assert wide == pytest.approx(narrow, rel=1e-6, abs=1e-6)
    assert all(torch.allclose(wide_state[k], narrow_state[k], atol=1e-6) for k in wide_state)


def _run_steps(steps: int) -> tuple[float, ...]:
    model = tiny_model()
    settings = TuneSettings(steps=steps, lr=1e-2, batch_size=3, warmup_steps=2)
    return tune(model, find_units(model), _config((4, 4, 4)), _batches(), settings)[1].losses


@pytest.mark.parametrize("ratio", [0.5, 2.0, 3.0])
def test_scaling_equals_alpha_ratio_on_every_layer(ratio):
    from peft.tuners.lora import LoraLayer

    model = tiny_model()
    peft_model = attach_lora(
        model, find_units(model), _config((4, 16, 8)), TuneSettings(steps=0, alpha_ratio=ratio)
    )
    layers = [m for m in peft_model.modules() if isinstance(m, LoraLayer)]
    assert len(layers) == 3 * len(TARGETS)
    for layer in layers:
        assert layer.scaling["default"] == pytest.approx(ratio, rel=1e-12)


def test_detach_restores_the_original_logits():
    model = tiny_model()
    units = find_units(model)
    ids = _batches().input_ids[:2]
    with torch.no_grad():
        reference = model(ids).logits
    peft_model, _ = tune(
        model, units, _config((8, 4, 8)), _batches(), TuneSettings(steps=3, lr=1e-2)
    )
    with torch.no_grad():
        assert not torch.equal(peft_model(ids).logits, reference)  # the adapters do something
    base = detach_lora(peft_model)
    assert type(base).__name__ == "LlamaForCausalLM"
    assert adapter_ranks(base) == {}
    with torch.no_grad():
        assert torch.equal(base(ids).logits, reference)
    # The same base takes another config.
    again = attach_lora(base, units, _config((0, 0, 4)), TuneSettings(steps=0))
    assert set(adapter_ranks(again).values()) == {4}


def test_all_zero_ranks_mean_no_adapter_and_no_training():
    model = tiny_model()
    units = find_units(model)
    assert lora_config(units, _config((0, 0, 0)), TuneSettings(steps=3)) is None
    same, log = tune(model, units, _config((0, 0, 0)), _batches(), TuneSettings(steps=3))
    assert same is model
    assert log.losses == () and log.trainable_params == 0
    assert not any(p.requires_grad for p in model.parameters())
    assert detach_lora(same) is model


def test_gradient_checkpointing_gives_the_same_losses():
    def losses(checkpointing: bool):
        model = tiny_model()
        settings = TuneSettings(steps=3, lr=1e-2, gradient_checkpointing=checkpointing)
        tuned, log = tune(model, find_units(model), _config((4, 4, 4)), _batches(), settings)
        assert not any(getattr(m, "gradient_checkpointing", False) for m in tuned.modules())
        return log.losses

    # Recomputation repeats the same ops; allow float reassociation noise only.
    assert losses(True) == pytest.approx(losses(False), rel=1e-6, abs=1e-6)


def test_config_of_wrong_length_raises():
    model = tiny_model()
    with pytest.raises(ConfigError, match="3"):
        lora_config(find_units(model), _config((4, 4)), TuneSettings(steps=0))


@pytest.mark.parametrize(
    "kwargs",
    [
        {"steps": -1},
        {"steps": 1.5},
        {"steps": True},
        {"steps": 1, "lr": 0},
        {"steps": 1, "lr": float("nan")},
        {"steps": 1, "batch_size": 0},
        {"steps": 1, "alpha_ratio": 0},
        {"steps": 1, "alpha_ratio": -2.0},
        {"steps": 1, "dropout": 1.0},
        {"steps": 1, "dropout": -0.1},
        {"steps": 1, "weight_decay": -1e-3},
        {"steps": 1, "warmup_steps": -1},
        {"steps": 1, "max_grad_norm": 0},
        {"steps": 1, "max_grad_norm": float("nan")},
        {"steps": 1, "gradient_checkpointing": "yes"},
        {"steps": 1, "seed": -1},
    ],
)
def test_bad_settings_raise(kwargs):
    name = [k for k in kwargs if k != "steps"] or ["steps"]
    with pytest.raises(ConfigError, match=f"`{name[0]}`"):
        TuneSettings(**kwargs)


def test_useless_warmup_warns():
    with pytest.warns(UserWarning, match="warmup_steps"):
        TuneSettings(steps=5, warmup_steps=5)


def test_bad_batches_raise():
    ids = torch.zeros((2, 8), dtype=torch.long)
    with pytest.raises(DataError, match="share one shape"):
        TrainBatches(ids, ids[:, :4], ids)
    with pytest.raises(DataError, match="LongTensor"):
        TrainBatches(ids.float(), ids, ids)
    unlabelled = torch.full_like(ids, -100)
    with pytest.raises(DataError, match="no completion token"):
        TrainBatches(ids, unlabelled, torch.ones_like(ids))


def test_ranks_on_every_supported_architecture(any_tiny_model):
    _, model = any_tiny_model
    units = find_units(model)
    ranks = (4, 0, 8)
    got = adapter_ranks(attach_lora(model, units, _config(ranks), TuneSettings(steps=0)))
    expected = {
        lin.name: rank
        for unit, rank in zip(units, ranks, strict=True)
        if rank
        for lin in unit.linears
        if lin.name.rsplit(".", 1)[-1] in TARGETS
    }
    assert got == expected


def test_row_order_wraps_with_a_fresh_permutation_per_epoch():
    order = _row_order(5, 17, seed=3)
    assert order.shape == (17,)
    for epoch in range(3):
        assert sorted(order[5 * epoch : 5 * epoch + 5].tolist()) == list(range(5))
    assert not torch.equal(order[:5], order[5:10])  # a new permutation, not a repeat
    assert torch.equal(_row_order(5, 8, seed=3), order[:8])  # shorter runs are prefixes


def test_bf16_base_keeps_fp32_adapters_and_trains():
    model = tiny_model().to(torch.bfloat16)
    settings = TuneSettings(steps=2, lr=1e-2)
    tuned, log = tune(model, find_units(model), _config((4, 4, 4)), _batches(), settings)
    lora = [p for n, p in tuned.named_parameters() if "lora_" in n]
    assert lora and all(p.dtype == torch.float32 for p in lora)
    assert all(math.isfinite(loss) for loss in log.losses)


def test_progress_bar_runs():
    model = tiny_model()
    settings = TuneSettings(steps=2)
    _, log = tune(model, find_units(model), _config((4, 4, 4)), _batches(), settings, progress=True)
    assert len(log.losses) == 2


def test_units_of_another_model_raise_and_leave_the_model_alone():
    units_12 = find_units(tiny_model(num_hidden_layers=12))
    model = tiny_model()  # 3 layers: the plan's layers 3..11 do not exist here
    with pytest.raises(ModelError, match="differ from the plan"):
        attach_lora(model, units_12, _config([4] * 12), TuneSettings(steps=0))
    assert adapter_ranks(model) == {}
    assert type(model.model.layers[0].self_attn.q_proj) is torch.nn.Linear
    with pytest.raises(ModelError, match="cannot attach"):
        attach_lora(model, units_12, _config([0] * 11 + [4]), TuneSettings(steps=0))
