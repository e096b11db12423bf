"""Stage 1: KL / Fisher sensitivity on a tiny Llama with a {2, 4}-bit bank, seed, population."""

from __future__ import annotations

import contextlib
import copy
import random
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_model

from edgeqra import sensitivity as sens
from edgeqra.bank import BankSpec, build_bank
from edgeqra.errors import ConfigError, DataError
from edgeqra.models import LoadedModel, find_units
from edgeqra.sensitivity import (
    Sensitivity,
    initial_population,
    measure_sensitivity,
    seed_config,
)
from edgeqra.space import Config, SearchSpace, fill, repair


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tokenizer):
    """A tiny Llama, its {2, 4}-bit bank (group 32), 8 calibration rows of 32 tokens."""
    root = tmp_path_factory.mktemp("sens")
    model = tiny_model("llama", vocab_size=len(tokenizer))
    model.save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    units = find_units(model)
    g = torch.Generator().manual_seed(0)
    bank_calibration = torch.randint(0, len(tokenizer), (16, 64), generator=g)
    bank = build_bank(
        root / "model",
        units,
        bank_calibration,
        BankSpec(bits=(2, 4), group_size=32),
        cache_root=root / "cache",
        progress=False,
    )
    calibration = torch.randint(0, len(tokenizer), (8, 32), generator=g)
    loaded = LoadedModel(model, tokenizer, "tiny", root / "model", units)
    return loaded, bank, calibration


@pytest.fixture(scope="module")
def measured(setup):
    """One measurement, with the model's state before and after it."""
    loaded, bank, calibration = setup
    model = loaded.model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = measure_sensitivity(loaded, bank, calibration, batch_size=4, progress=False)
    return result, before


def _mean_kl(model, calibration, reference):
    """Slow reference: mean token KL(ref ‖ model) over the whole calibration at once."""
    with torch.no_grad():
        logp = F.log_softmax(model(input_ids=calibration).logits.float(), dim=-1)
    return float((reference.exp() * (reference - logp)).sum(-1).mean())


def test_scores_are_positive_and_the_model_is_left_untouched(setup, measured):
    loaded, _, _ = setup
    result, before = measured
    assert result.lowest_bits == 2
    assert len(result.kl) == len(result.fisher) == len(loaded.units) == 3
    # A 2-bit unit changes the output distribution and every unit has gradient signal.
    assert all(v > 1e-6 for v in result.kl)
    assert all(v > 0 for v in result.fisher)
    model = loaded.model
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # bit-identical
    assert not model.training
    assert all(p.requires_grad and p.grad is None for p in model.parameters())


def test_kl_matches_assembling_each_single_unit_config(setup, measured):
    """The fast path (swap one unit per batch) equals bank.assemble of the same config."""
    loaded, bank, calibration = setup
    result, _ = measured
    model, n = loaded.model, len(loaded.units)
    with torch.no_grad():
        reference = F.log_softmax(model(input_ids=calibration).logits.float(), dim=-1)
    try:
        for unit in range(n):
            config = Config.from_pairs([(2 if i == unit else 16, 0) for i in range(n)])
            bank.assemble(model, config)
            expected = _mean_kl(model, calibration, reference)
            assert result.kl[unit] == pytest.approx(expected, rel=1e-4, abs=1e-7)
    finally:
        bank.assemble(model, Config.uniform(n, 16, 0))


def test_kl_is_zero_when_the_low_entry_is_the_original(setup, monkeypatch):
    loaded, bank, calibration = setup
    model = loaded.model
    originals = {
        lin.name: model.get_submodule(lin.name).weight.detach().clone()
        for unit in loaded.units
        for lin in unit.linears
    }
    monkeypatch.setattr(bank, "entry", lambda index, bits: originals)
    result = measure_sensitivity(loaded, bank, calibration, progress=False)
    assert result.kl == (0.0, 0.0, 0.0)  # identical logits: KL exactly 0


def test_fisher_matches_direct_autograd(setup, measured):
    loaded, _, calibration = setup
    result, _ = measured
    model = copy.deepcopy(loaded.model)
    for position, unit in enumerate(loaded.units):
        weights = [model.get_submodule(lin.name).weight for lin in unit.linears]
        total = 0.0
        for batch in calibration.split(4):  # the same batches as batch_size=4
            model.zero_grad()
            model(input_ids=batch, labels=batch).loss.backward()
            total += sum(float((w.grad * w.detach()).pow(2).sum()) for w in weights)
        assert result.fisher[position] == pytest.approx(total, rel=1e-4)


def test_second_call_is_a_cache_hit(setup, tmp_path, monkeypatch):
    loaded, bank, calibration = setup
    first = measure_sensitivity(loaded, bank, calibration, cache_dir=tmp_path, progress=False)
    (path,) = tmp_path.glob("sensitivity-*.json")
    assert bank.root.name in path.name

    def no_forward(*args, **kwargs):
        raise AssertionError("a cache hit must not run the model")

    monkeypatch.setattr(loaded.model, "forward", no_forward)
    again = measure_sensitivity(loaded, bank, calibration, cache_dir=tmp_path, progress=False)
    assert again == first
    with pytest.raises(AssertionError, match="cache hit"):  # other tokens: a miss
        measure_sensitivity(loaded, bank, calibration[:4], cache_dir=tmp_path, progress=False)


def test_bad_inputs_are_refused(setup):
    loaded, bank, calibration = setup
    with pytest.raises(DataError, match="calibration"):
        measure_sensitivity(loaded, bank, calibration[0], progress=False)
    with pytest.raises(DataError, match="integer"):
        measure_sensitivity(loaded, bank, calibration.float(), progress=False)
    with pytest.raises(ConfigError, match="batch_size"):
        measure_sensitivity(loaded, bank, calibration, batch_size=0, progress=False)


# ---------------------------------------------------------------- pure parts


def test_importance_normalises_each_score_then_mixes():
    s = Sensitivity(kl=(0.0, 1.0, 2.0), fisher=(4.0, 4.0, 4.0), lowest_bits=2)
    assert s.importance() == pytest.approx((0.25, 0.5, 0.75))  # fisher all equal -> 0.5
    assert s.importance(kl_weight=1.0) == pytest.approx((0.0, 0.5, 1.0))
    assert s.importance(kl_weight=0.0) == pytest.approx((0.5, 0.5, 0.5))
    t = Sensitivity(kl=(3.0, 1.0), fisher=(10.0, 30.0), lowest_bits=2)
    assert t.importance(0.25) == pytest.approx((0.25, 0.75))
    with pytest.raises(ConfigError, match="kl_weight"):
        s.importance(1.5)


def test_json_round_trip_and_validation():
    s = Sensitivity(kl=(0.1, 0.2), fisher=(3.0, 4.0), lowest_bits=2)
    assert Sensitivity.from_json(s.to_json()) == s
    with pytest.raises(ConfigError, match="lowest_bits"):
        Sensitivity.from_json({"kl": [0.1], "fisher": [1.0]})
    with pytest.raises(ConfigError, match="one `kl`"):
        Sensitivity((0.1,), (1.0, 2.0), 2)


def test_seed_config_hand_checked():
    space = SearchSpace(4, bits=(2, 3, 4, 8), ranks=(0, 4, 8, 16, 32))
    # bits index round(s*3), rank index round(s*4), half up: 0.5 -> 1.5 -> 2 (4 bits)
    assert str(seed_config([0.0, 0.5, 1.0, 0.3], space)) == "2/0,4/8,8/32,3/4"
    with_fp16 = SearchSpace(2, bits=(4, 16), ranks=(8,))
    assert str(seed_config([0.2, 0.9], with_fp16)) == "4/8,16/8"
    with pytest.raises(ConfigError, match="importance"):
        seed_config([0.5], space)
    with pytest.raises(ConfigError, match=r"\[0, 1\]"):
        seed_config([0.0, 0.5, 1.0, 1.2], space)


def test_seed_config_is_monotone_in_importance():
    space = SearchSpace(22)
    rng = random.Random(1)
    scores = sorted([rng.random() for _ in range(20)] + [0.0, 1.0])
    config = seed_config(scores, space)
    assert list(config.bits) == sorted(config.bits)
    assert list(config.ranks) == sorted(config.ranks)
    assert config.bits[0] < config.bits[-1] and config.ranks[0] < config.ranks[-1]


def _toy_repair(space, budget):
    """Budget on sum(bits) + sum(rank)/4, through the real greedy repair."""
    memory = lambda c: sum(c.bits) + sum(c.ranks) // 4  # noqa: E731
    return lambda c: repair(c, space, memory, budget)


def test_initial_population_seed_first_extras_distinct_feasible_deterministic():
    space = SearchSpace(6)
    fix = _toy_repair(space, budget=40)
    importance = [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]
    seed = seed_config(importance, space)  # 2..8 bits, 0..32 ranks: over the budget
    assert fix(seed) != seed
    fits, too_big = Config.uniform(6, 4, 8), Config.uniform(6, 8, 16)
    population = initial_population(
        seed,
        space,
        random.Random(7),
        12,
        repair=fix,
        importance=importance,
        extra=[fits, too_big, fits],
    )
    assert len(population) == 12 == len(set(population))
    assert population[0] == fix(seed)
    assert population[1] == fits and population[2] == fix(too_big) != too_big
    assert all(fix(c) == c for c in population)
    again = initial_population(
        seed,
        space,
        random.Random(7),
        12,
        repair=fix,
        importance=importance,
        extra=[fits, too_big, fits],
    )
    assert again == population
    other = initial_population(seed, space, random.Random(8), 12, repair=fix, extra=[fits])
    assert other != population


def test_initial_population_keeps_a_baseline_below_the_budget_filled_to_it():
    """The pipeline's repair fills: a uniform baseline under the budget must enter raised to
    it, not be dropped because repair changed it (issue 20's first generation on the H200)."""
    space = SearchSpace(6, bits=(2, 3, 4, 8), ranks=(0, 8))
    memory = lambda c: sum(c.bits) + sum(c.ranks) // 8  # noqa: E731
    importance = [0.9, 0.1, 0.1, 0.1, 0.1, 0.9]  # the seed spends on the ends, 2 bits between

    def fix(config):
        return fill(repair(config, space, memory, 27), space, memory, 27, importance)

    uniform3 = Config.uniform(6, 3, 8)  # 18 + 6 = 24 bytes, 3 under the budget
    seed = seed_config(importance, space)
    population = initial_population(
        seed, space, random.Random(0), 6, repair=fix, importance=importance, extra=[uniform3]
    )
    filled = fix(uniform3)
    assert filled != uniform3 and memory(filled) <= 27 and min(filled.bits) == 3
    assert population[1] == filled and uniform3 not in population
    assert 2 in population[0].bits  # what the sensitivity seed alone would have offered


def test_initial_population_of_a_tiny_space_stops():
    space = SearchSpace(1, bits=(2, 4), ranks=(8,))  # two configs in all
    population = initial_population(
        Config.uniform(1, 4, 8), space, random.Random(0), 5, repair=lambda c: c
    )
    assert sorted(map(str, population)) == ["2/8", "4/8"]
    with pytest.raises(ConfigError, match="size"):
        initial_population(Config.uniform(1, 4, 8), space, random.Random(0), 0, repair=lambda c: c)


def test_cache_path_depends_on_calibration(setup):
    loaded, bank, calibration = setup
    a = sens._cache_path(Path("/c"), bank, calibration, 4, loaded.model)
    b = sens._cache_path(Path("/c"), bank, calibration.flip(0), 4, loaded.model)
    c = sens._cache_path(Path("/c"), bank, calibration, 2, loaded.model)
    assert len({a, b, c}) == 3


def test_a_quantized_model_is_measured_from_the_remembered_originals(setup, measured):
    """After an evaluation left the model at 2 bits, the bank's originals are the reference."""
    loaded, bank, calibration = setup
    result, before = measured
    bank.assemble(loaded.model, Config.uniform(len(loaded.units), 2, 0))
    again = measure_sensitivity(loaded, bank, calibration, batch_size=4, progress=False)
    assert again.kl == pytest.approx(result.kl, rel=1e-5)
    assert again.fisher == pytest.approx(result.fisher, rel=1e-5)
    after = loaded.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3"])
def test_kl_replaying_earlier_layers_changes_no_number_and_skips_them(arch, monkeypatch):
    """Units before l replay the reference forward: same KL bit for bit, fewer layer runs."""
    model = tiny_model(arch)
    units = find_units(model)
    g = torch.Generator().manual_seed(3)
    batches = list(torch.randint(0, 256, (4, 24), generator=g).split(2))  # 2 x (2, 24)
    low = {  # a perturbed copy of each unit's weights stands in for its low-bit entry
        u.index: {
            lin.name: model.get_submodule(lin.name).weight.detach()
            + 0.05 * torch.randn(lin.d_out, lin.d_in, generator=g)
            for lin in u.linears
        }
        for u in units
    }
    first = model.get_submodule(units[0].linears[0].name)
    runs = []
    first.register_forward_pre_hook(lambda *_: runs.append(1))
    fast = sens._kl_scores(model, units, lambda u: low[u.index], batches, lambda _s: None)
    fast_runs = len(runs)
    runs.clear()
    monkeypatch.setattr(sens, "_replayed", lambda *_: contextlib.nullcontext())
    slow = sens._kl_scores(model, units, lambda u: low[u.index], batches, lambda _s: None)
    assert fast == slow  # exactly: the replayed tensors are the ones the layers computed
    assert all(v > 0 for v in fast)
    # Unit 0's first linear runs for the reference and for unit 0 only, not for units 1, 2.
    assert fast_runs == 2 * len(batches) and len(runs) == (1 + len(units)) * len(batches)
