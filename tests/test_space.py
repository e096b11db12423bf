"""Search-space operators: neighbours, mutation, crossover, sampling, encoding, repair."""

from __future__ import annotations

import random
import re

import pytest
from conftest import tiny_model
from gguf_files import write_gguf

from edgeqra.cli import main
from edgeqra.errors import BudgetError, ConfigError
from edgeqra.memory import ModelSpec, estimate_for_profile
from edgeqra.profiles import load_profile
from edgeqra.space import FP16_BITS, Choice, Config, SearchSpace, fill, repair

SMALL = SearchSpace(2, bits=(2, 4, 8), ranks=(0, 8, 16))


def _differences(a: Config, b: Config) -> list[tuple[int, str]]:
    """(unit, field) pairs where two configs differ."""
    out = []
    for index, (x, y) in enumerate(zip(a, b, strict=True)):
        if x.bits != y.bits:
            out.append((index, "bits"))
        if x.rank != y.rank:
            out.append((index, "rank"))
    return out


def _is_one_step(space: SearchSpace, old: Choice, new: Choice) -> bool:
    """Whether ``new`` is ``old`` with exactly one field moved to an adjacent sorted value."""
    bits = space.bits if old.bits in space.bits else (*space.bits, old.bits)
    if old.rank == new.rank:
        return abs(bits.index(old.bits) - bits.index(new.bits)) == 1
    if old.bits == new.bits:
        return abs(space.ranks.index(old.rank) - space.ranks.index(new.rank)) == 1
    return False


# --- parsing ---------------------------------------------------------------------------------


def test_parse_reads_back_the_run_length_form_short_writes():
    rng = random.Random(3)
    space = SearchSpace(30, bits=(2, 3, 4, 8, FP16_BITS), ranks=(0, 4, 8, 16))
    for _ in range(50):  # random configs, and ones with long runs, as bench rows store them
        config = space.sample(rng)
        runs = Config.from_pairs([(4, 8)] * 12 + [(c.bits, c.rank) for c in config][:18])
        for each in (config, runs):
            assert Config.parse(each.short()) == each
    assert Config.parse("16/8x30") == Config.uniform(30, FP16_BITS, 8)
    assert Config.parse(" 4/8 x 2 ,8/16") == Config.from_pairs([(4, 8), (4, 8), (8, 16)])


@pytest.mark.parametrize("spec", ["4/8x0", "4/8x", "4/8x-1", "x3"])
def test_parse_rejects_a_bad_run_naming_the_item(spec):
    with pytest.raises(ConfigError, match=re.escape(spec.split(",")[0].strip())):
        Config.parse(spec)


# --- neighbours ------------------------------------------------------------------------------


def test_neighbours_are_exactly_the_one_step_configs():
    config = Config.from_pairs([(4, 0), (8, 8)])
    got = SMALL.neighbours(config)
    # Counted by hand: unit 0 bits 4 -> 2 or 8, rank 0 -> 8 (rank has no lower value);
    # unit 1 bits 8 -> 4 (top of Q), rank 8 -> 0 or 16.
    expected = [
        Config.from_pairs([(2, 0), (8, 8)]),
        Config.from_pairs([(8, 0), (8, 8)]),
        Config.from_pairs([(4, 8), (8, 8)]),
        Config.from_pairs([(4, 0), (4, 8)]),
        Config.from_pairs([(4, 0), (8, 0)]),
        Config.from_pairs([(4, 0), (8, 16)]),
    ]
    assert got == expected
    for neighbour in got:
        SMALL.validate(neighbour)
        assert len(_differences(config, neighbour)) == 1


def test_neighbours_match_brute_force_over_the_whole_space():
    every = [
        Config.from_pairs([(b0, r0), (b1, r1)])
        for b0 in SMALL.bits
        for r0 in SMALL.ranks
        for b1 in SMALL.bits
        for r1 in SMALL.ranks
    ]
    for config in every:
        brute = {
            other
            for other in every
            if len(_differences(config, other)) == 1
            and all(_is_one_step(SMALL, x, y) for x, y in zip(config, other, strict=True) if x != y)
        }
        got = SMALL.neighbours(config)
        assert len(got) == len(set(got))
        assert set(got) == brute


def test_fp16_unit_outside_q_only_steps_down_into_q():
    config = Config.from_pairs([(FP16_BITS, 8), (8, 8)])
    got = SMALL.neighbours(config)
    assert Config.from_pairs([(8, 8), (8, 8)]) in got
    assert all(n[0].bits in (FP16_BITS, 8) for n in got)
    assert len(got) == 1 + 2 + 1 + 2


def test_neighbours_reject_a_config_outside_the_space():
    with pytest.raises(ConfigError, match="bit-width 3"):
        SMALL.neighbours(Config.from_pairs([(3, 0), (4, 0)]))


# --- sample / mutate / crossover -------------------------------------------------------------


def test_sample_stays_in_space_is_seeded_and_covers_every_value():
    space = SearchSpace(6)
    seen_bits, seen_ranks = set(), set()
    for seed in range(300):
        config = space.sample(random.Random(seed))
        space.validate(config, allow_fp16=False)
        assert config == space.sample(random.Random(seed))
        seen_bits.update(config.bits)
        seen_ranks.update(config.ranks)
    assert seen_bits == set(space.bits)
    assert seen_ranks == set(space.ranks)


def test_mutate_stays_in_space_moves_one_step_per_unit_and_always_changes():
    space = SearchSpace(8)
    for seed in range(500):
        rng = random.Random(seed)
        parent = space.sample(rng)
        child = space.mutate(parent, rng, rate=0.2)
        space.validate(child, allow_fp16=False)
        assert child != parent
        for old, new in zip(parent, child, strict=True):
            assert old == new or _is_one_step(space, old, new)
        again = random.Random(seed)
        assert space.mutate(space.sample(again), again, rate=0.2) == child


def test_mutate_changes_something_even_at_rate_zero_and_in_a_corner():
    space = SearchSpace(3, bits=(4,), ranks=(0, 8))
    corner = Config.uniform(3, 4, 8)
    for seed in range(50):
        child = space.mutate(corner, random.Random(seed), rate=0.0)
        # Only rank can move and only downwards, on exactly one unit.
        assert sorted(child.ranks) == [0, 8, 8]


def test_mutate_rejects_bad_rate_and_weights():
    space = SearchSpace(3)
    config = Config.uniform(3, 4, 8)
    with pytest.raises(ConfigError, match="`rate`"):
        space.mutate(config, random.Random(0), rate=1.5)
    with pytest.raises(ConfigError, match="3 units"):
        space.mutate(config, random.Random(0), weights=[1.0, 1.0])
    with pytest.raises(ConfigError, match="non-negative"):
        space.mutate(config, random.Random(0), weights=[1.0, -1.0, 1.0])


def test_importance_weights_concentrate_mutation_on_heavy_units():
    # 10 units, unit 0 ten times as important. Unit l mutates in the first pass with
    # p_l = rate * w_l / mean(w); if nothing mutated (probability P0) one unit is forced,
    # picked with probability w_l / sum(w). So P(unit l changes) = p_l + P0 * w_l / sum(w).
    space = SearchSpace(10)
    weights = [10.0] + [1.0] * 9
    rate, trials = 0.1, 4000
    mean = sum(weights) / len(weights)
    p = [rate * w / mean for w in weights]
    p_none = 1.0
    for x in p:
        p_none *= 1 - x
    expected = [pi + p_none * w / sum(weights) for pi, w in zip(p, weights, strict=True)]

    rng = random.Random(1234)
    counts = [0] * 10
    for _ in range(trials):
        parent = space.sample(rng)
        child = space.mutate(parent, rng, rate=rate, weights=weights)
        for index, _field in _differences(parent, child):
            counts[index] += 1
    heavy = counts[0] / trials
    light = sum(counts[1:]) / (9 * trials)
    # Binomial standard errors are ~0.0074 (heavy) and ~0.0013 (pooled light): allow ~4 sigma.
    assert heavy == pytest.approx(expected[0], abs=0.03)  # 0.680
    assert light == pytest.approx(expected[1], abs=0.006)  # 0.068
    assert heavy / light > 8


def test_crossover_children_inherit_whole_genes_and_are_seeded():
    space = SearchSpace(12)
    mixed = 0
    for seed in range(300):
        rng = random.Random(seed)
        a, b = space.sample(rng), space.sample(rng)
        child = space.crossover(a, b, rng)
        space.validate(child, allow_fp16=False)
        assert all(c in (x, y) for c, x, y in zip(child, a, b, strict=True))
        from_a = sum(c == x != y for c, x, y in zip(child, a, b, strict=True))
        from_b = sum(c == y != x for c, x, y in zip(child, a, b, strict=True))
        mixed += from_a > 0 and from_b > 0
        again = random.Random(seed)
        assert space.crossover(space.sample(again), space.sample(again), again) == child
    assert mixed > 280  # P(all 12 genes from one parent) is about 2 / 2**12 per pair


def test_crossover_rejects_parents_of_another_length():
    with pytest.raises(ConfigError, match="units"):
        SearchSpace(3).crossover(Config.uniform(3, 4, 8), Config.uniform(2, 4, 8), random.Random(0))


# --- encode ----------------------------------------------------------------------------------


def test_encode_is_ordinal_position_in_unit_interval():
    config = Config.from_pairs([(2, 16), (4, 8)])
    assert SMALL.encode(config) == [0.0, 1.0, 0.5, 0.5]
    assert SMALL.encode(Config.from_pairs([(FP16_BITS, 0), (8, 0)])) == [1.0, 0.0, 1.0, 0.0]
    single = SearchSpace(2, bits=(4,), ranks=(8,))
    assert single.encode(Config.uniform(2, 4, 8)) == [0.0, 0.0, 0.0, 0.0]
    space = SearchSpace(5)
    for seed in range(50):
        features = space.encode(space.sample(random.Random(seed)))
        assert len(features) == 10
        assert all(0.0 <= f <= 1.0 for f in features)
    with pytest.raises(ConfigError):
        SMALL.encode(Config.from_pairs([(3, 0), (4, 0)]))


# --- repair ----------------------------------------------------------------------------------


def _additive(config: Config) -> int:
    """A synthetic, exactly additive memory: 100 B per bit and 10 B per rank per unit."""
    return sum(100 * c.bits + 10 * c.rank for c in config)


def test_repair_lowers_the_unimportant_unit_first():
    # Start 2 x (8, 16) = 1920 B, budget 1500 B. Costs (importance lost per byte saved), by hand:
    #   unit 0 bits 8->4: 1.0 * 0.5 / 400 = 1.25e-3   unit 0 rank 16->8: 1.0 * 0.5 / 80 = 6.25e-3
    #   unit 1 bits 8->4: 0.1 * 0.5 / 400 = 1.25e-4   unit 1 rank 16->8: 0.1 * 0.5 / 80 = 6.25e-4
    # -> unit 1 to 4 bits (1520 B); then unit 1 bits 4->2 costs 0.05 / 200 = 2.5e-4, still the
    # cheapest -> 1320 B, which fits.
    start = Config.uniform(2, 8, 16)
    assert repair(start, SMALL, _additive, 1500, importance=[1.0, 0.1]) == Config.from_pairs(
        [(8, 16), (2, 16)]
    )
    assert repair(start, SMALL, _additive, 1500, importance=[0.1, 1.0]) == Config.from_pairs(
        [(2, 16), (8, 16)]
    )
    # Equal importance: step 1 ties (unit 0 wins, lowest index), step 2 goes to unit 1 because
    # unit 0's next bits step (4->2) costs twice as much per byte.
    assert repair(start, SMALL, _additive, 1500) == Config.uniform(2, 4, 16)


def test_repair_breaks_a_bits_rank_tie_towards_bits():
    space = SearchSpace(1, bits=(4, 8), ranks=(8, 16))

    def memory(config: Config) -> int:
        # bits 8->4 and rank 16->8 both lose half their value and both save 400 B.
        return sum(100 * c.bits + 50 * c.rank for c in config)

    assert repair(Config.uniform(1, 8, 16), space, memory, 1500) == Config.uniform(1, 4, 16)


def test_repair_returns_a_fitting_config_unchanged_without_walking():
    calls = []

    def memory(config: Config) -> int:
        calls.append(config)
        return _additive(config)

    start = Config.uniform(2, 8, 16)
    assert repair(start, SMALL, memory, _additive(start)) is start
    assert calls == [start]


def test_repair_raises_budget_error_below_the_smallest_config():
    floor = Config.uniform(2, 2, 0)
    with pytest.raises(BudgetError) as info:
        repair(
            Config.uniform(2, 8, 16), SMALL, lambda c: _additive(c) << 20, _additive(floor) << 19
        )
    message = str(info.value)
    # Budget 200 MiB; the floor (2 units x 200 B, scaled by 2**20) needs 400 MiB.
    assert "budget of 0.20 GiB" in message and "needs 0.39 GiB" in message
    assert "--budget-gb" in message and "bit" in message
    # Exactly the floor fits.
    assert repair(Config.uniform(2, 8, 16), SMALL, _additive, _additive(floor)) == floor


def test_repair_skips_steps_that_save_nothing():
    # Rank costs nothing here, so lowering it is useless: only bits may move.
    space = SearchSpace(2, bits=(2, 4, 8), ranks=(0, 8))
    memory = lambda c: sum(100 * b for b in c.bits)  # noqa: E731
    result = repair(Config.uniform(2, 8, 8), space, memory, 1200)
    assert result.ranks == (8, 8)
    assert memory(result) <= 1200


@pytest.fixture(scope="module")
def real_memory():
    """The product's memory model on a tiny 6-layer llama and a real device profile."""
    spec = ModelSpec.from_model(tiny_model("llama", num_hidden_layers=6))
    profile = load_profile("jetson-orin-nano-8gb")  # mode "both", checkpointing on

    def memory(config: Config) -> int:
        return estimate_for_profile(spec, config, profile).total

    return spec, memory


def test_repair_property_with_the_real_memory_model(real_memory):
    spec, memory = real_memory
    space = SearchSpace(spec.n_units)
    low = memory(Config.uniform(spec.n_units, space.bits[0], space.ranks[0]))
    high = memory(Config.uniform(spec.n_units, FP16_BITS, space.ranks[-1]))
    span = high - low
    rng = random.Random(7)
    outcomes = {"unchanged": 0, "repaired": 0, "impossible": 0}
    for _ in range(250):
        config = space.sample(rng)
        if rng.random() < 0.2:  # some FP16 units (outside Q) to be brought down into Q
            choices = list(config.choices)
            choices[rng.randrange(len(choices))] = Choice(FP16_BITS, rng.choice(space.ranks))
            config = Config(tuple(choices))
        budget = rng.randint(low - span // 10, high)
        importance = [rng.random() for _ in range(spec.n_units)] if rng.random() < 0.5 else None
        if budget < low:
            with pytest.raises(BudgetError):
                repair(config, space, memory, budget, importance)
            outcomes["impossible"] += 1
            continue
        result = repair(config, space, memory, budget, importance)
        space.validate(result)
        assert memory(result) <= budget
        if memory(config) <= budget:
            assert result is config
            outcomes["unchanged"] += 1
        else:
            outcomes["repaired"] += 1
            # Repair only ever lowers: every unit at or below where it started.
            for old, new in zip(config, result, strict=True):
                assert new.bits <= old.bits and new.rank <= old.rank
    assert min(outcomes.values()) >= 15, outcomes


# --- fill (the mirror of repair) -----------------------------------------------------------------


def _no_up_step_fits(config: Config, space: SearchSpace, memory, budget: int, fields) -> bool:
    """True when raising any one unit's bits or rank one step would leave the budget."""
    for index, choice in enumerate(config):
        for name, delta in space._moves(choice):
            if delta > 0 and name in fields:
                choices = list(config.choices)
                choices[index] = space._step(choice, name, delta)
                if memory(Config(tuple(choices))) <= budget:
                    return False
    return True


def test_rank_only_repair_keeps_every_units_bits_and_drops_the_unimportant_adapter(real_memory):
    spec, memory = real_memory
    space = SearchSpace(spec.n_units)
    start = Config.uniform(spec.n_units, 8, 8)
    dropped = Config((*start.choices[:-1], Choice(8, 0)))
    budget = memory(dropped)  # room for 8 bits everywhere only with one adapter fewer
    importance = [1.0] * (spec.n_units - 1) + [0.01]
    result = repair(start, space, memory, budget, importance, fields=("rank",))
    assert result.bits == start.bits
    assert memory(result) <= budget
    assert result.ranks[-1] < 8 and result.ranks[:-1] == start.ranks[:-1]
    # The plain repair may lower bits instead; the rank-only one cannot go below ranks 0.
    floor = Config.uniform(spec.n_units, 8, 0)
    with pytest.raises(BudgetError):
        repair(start, space, memory, memory(floor) - 1, importance, fields=("rank",))


def test_fill_raises_the_important_unit_first():
    # 2 x (2, 4) = 2 * 240 = 480 B; budget 700 B. Gains per byte, by hand:
    #   unit 0 bits 2->3: 1.0 * 1/3 / 100     unit 0 rank 4->8: 1.0 * 0.5 / 40
    #   unit 1 bits 2->3: 0.1 * 1/3 / 100     unit 1 rank 4->8: 0.1 * 0.5 / 40
    # -> unit 0 rank 4->8 (520 B), then unit 0 rank 8->16 (0.5/80: 600 B), then unit 0 bits
    # 2->3 (1/300 > 0.5/160 for rank 16->32 -> 700 B): nothing more fits.
    start = Config.uniform(2, 2, 4)
    space = SearchSpace(2, bits=(2, 3, 4, 8), ranks=(4, 8, 16, 32))
    got = fill(start, space, _additive, 700, importance=[1.0, 0.1])
    assert got == Config.from_pairs([(3, 16), (2, 4)])
    assert _additive(got) <= 700
    assert _no_up_step_fits(got, space, _additive, 700, ("bits", "rank"))


def test_fill_bits_only_is_a_knapsack_over_bits():
    space = SearchSpace(3, bits=(2, 3, 4, 8), ranks=(8,))
    start = Config.uniform(3, 2, 8)
    got = fill(
        start, space, _additive, 3 * 100 * 4 + 240, importance=[0.2, 1.0, 0.5], fields=("bits",)
    )
    assert got.ranks == (8, 8, 8)
    assert _no_up_step_fits(got, space, _additive, 3 * 400 + 240, ("bits",))
    assert got[1].bits >= got[2].bits >= got[0].bits  # bytes go to the sensitive units first


def test_fill_leaves_an_over_budget_config_alone_and_is_idempotent():
    space = SearchSpace(2, bits=(2, 4, 8), ranks=(0, 8))
    over = Config.uniform(2, 8, 8)
    assert fill(over, space, _additive, 100) is over
    once = fill(Config.uniform(2, 2, 0), space, _additive, 1300)
    assert fill(once, space, _additive, 1300) == once


def test_fill_property_with_the_real_memory_model(real_memory):
    """No filled config leaves room for one more up step, and filling never lowers a unit."""
    spec, memory = real_memory
    space = SearchSpace(spec.n_units)
    low = memory(Config.uniform(spec.n_units, space.bits[0], space.ranks[0]))
    high = memory(Config.uniform(spec.n_units, space.bits[-1], space.ranks[-1]))
    rng = random.Random(3)
    for _ in range(12):
        budget = rng.randint(low, high)
        config = repair(space.sample(rng), space, memory, budget)
        importance = [rng.random() for _ in range(spec.n_units)]
        got = fill(config, space, memory, budget, importance)
        assert memory(got) <= budget
        assert _no_up_step_fits(got, space, memory, budget, ("bits", "rank"))
        for old, new in zip(config, got, strict=True):
            assert new.bits >= old.bits and new.rank >= old.rank


# --- config strings checked against the model before it loads ------------------------------


@pytest.fixture
def unloadable_gguf(tmp_path, monkeypatch):
    """A 3-layer GGUF header whose model must never load: loading it fails the test."""
    import edgeqra.models

    def load(*args, **kwargs):
        raise AssertionError("the model was loaded before the config was checked")

    monkeypatch.setenv("EDGEQRA_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(edgeqra.models, "_dense_copy_of_gguf", load)
    return write_gguf(tmp_path / "tiny.gguf", n_layers=3)


@pytest.mark.parametrize(
    "spec, needle",
    [
        ("4/8,3/16", "config has 2 units but the model has 3"),
        ("4/8,5/8,4/8", "unit 1 has bit-width 5, not in the allowed set [2, 3, 4, 8]"),
        ("4/8,4/8,4/7", "unit 2 has rank 7, not in the allowed set [0, 4, 8, 16, 32]"),
        ("4/8,4-8,4/8", "config spec item 1 `4-8` is not `BITS/RANK`"),
    ],
)
def test_space_from_model_rejects_a_bad_config_without_loading(unloadable_gguf, spec, needle):
    space = SearchSpace.from_model(unloadable_gguf)
    assert space.n_units == 3
    with pytest.raises(ConfigError, match=re.escape(needle)):
        space.parse(spec)


def test_space_from_model_parses_a_good_config_and_allows_fp16(unloadable_gguf, tmp_path):
    space = SearchSpace.from_model(unloadable_gguf, bits=(2, 4), ranks=(0, 8))
    assert space.parse("4/8,2/0,16/8") == Config.from_pairs([(4, 8), (2, 0), (16, 8)])
    with pytest.raises(ConfigError, match="bit-width 16"):
        space.parse("4/8,2/0,16/8", allow_fp16=False)
    assert not (tmp_path / "cache").exists()


# The CLI checks `--config` with SearchSpace.from_model before resolve_model (issue 19).


@pytest.mark.parametrize(
    "spec, needle",
    [("4/8,3/16", "config has 2 units but the model has 3"), ("5/8,5/8,5/8", "bit-width 5")],
)
def test_evaluate_rejects_a_bad_config_before_the_model_loads(
    unloadable_gguf, capsys, spec, needle
):
    code = main(["evaluate", "--model", str(unloadable_gguf), "--config", spec, "--steps", "1"])
    assert code == 2, capsys.readouterr().err
    assert needle in capsys.readouterr().err


@pytest.mark.parametrize(
    "spec, needle",
    [("4/8,3/16", "config has 2 units but the model has 3"), ("5/8,5/8,5/8", "bit-width 5")],
)
def test_plan_rejects_a_bad_config_before_the_model_loads(unloadable_gguf, capsys, spec, needle):
    argv = ["plan", "--profile", "t4-16gb", "--model", str(unloadable_gguf), "--measure"]
    code = main([*argv, "--config", spec])
    assert code == 2, capsys.readouterr().err
    assert needle in capsys.readouterr().err
