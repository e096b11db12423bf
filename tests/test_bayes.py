"""Stage 3: expected improvement, the trust region, and refinement on a synthetic objective."""

from __future__ import annotations

import random

import numpy as np
import pytest
from scipy.stats import norm

from edgeqra.errors import EdgeQRAError
from edgeqra.search.bayes import (
    BayesSettings,
    TrustRegion,
    expected_improvement,
    propose,
    refine,
)
from edgeqra.space import Config, SearchSpace, repair

SPACE = SearchSpace(6, (2, 3, 4, 8), (0, 4, 8, 16))
BYTES = {2: 2, 3: 3, 4: 4, 8: 8}


def _memory(config: Config) -> int:
    return sum(BYTES[c.bits] * 10 + c.rank for c in config)


BUDGET = _memory(Config.uniform(6, 4, 8))  # binds: 8-bit everywhere does not fit


def _feasible(config: Config) -> bool:
    return _memory(config) <= BUDGET


def _score(config: Config) -> float:
    """Separable and monotone in bits and rank, with later units worth more."""
    return (
        sum(
            (i + 1) * (SPACE.bits.index(c.bits) + 0.5 * SPACE.ranks.index(c.rank))
            for i, c in enumerate(config)
        )
        / 100.0
    )


def _start(n: int, seed: int) -> list[tuple[Config, float]]:
    rng, out = random.Random(seed), []
    while len(out) < n:
        c = SPACE.sample(rng)
        if _feasible(c) and c not in {x for x, _ in out}:
            out.append((c, _score(c)))
    return out


def test_expected_improvement_matches_closed_form():
    mu, sigma, best = np.array([0.2, 0.5, 0.5, 0.7]), np.array([0.1, 0.0, 0.3, 0.0]), 0.5
    ei = expected_improvement(mu, sigma, best)
    z = (0.2 - 0.5) / 0.1
    assert ei[0] == pytest.approx((0.2 - 0.5) * norm.cdf(z) + 0.1 * norm.pdf(z))
    assert ei[1] == 0.0  # no uncertainty, no gain
    assert ei[2] == pytest.approx(0.3 * norm.pdf(0.0))  # at the incumbent: σφ(0)
    assert ei[3] == pytest.approx(0.2)  # certain gain
    assert np.all(ei >= 0)


def test_expected_improvement_grows_with_mean_and_uncertainty():
    mus = expected_improvement(np.array([0.1, 0.2, 0.3]), np.full(3, 0.1), 0.25)
    sigmas = expected_improvement(np.full(3, 0.1), np.array([0.05, 0.1, 0.2]), 0.25)
    assert np.all(np.diff(mus) > 0) and np.all(np.diff(sigmas) > 0)


def test_trust_region_grows_on_successes_and_shrinks_on_failures():
    s = BayesSettings(initial_radius=4, min_radius=1, max_radius=8)
    region = TrustRegion(4)
    region.update(True, s)
    assert region.radius == 4
    region.update(True, s)
    assert region.radius == 8
    region.update(True, s), region.update(True, s)
    assert region.radius == 8  # clamped at max_radius
    for _ in range(3):
        region.update(False, s)
    assert region.radius == 4
    region.update(True, s)  # a success resets the failure count
    for _ in range(2):
        region.update(False, s)
    assert region.radius == 4
    for _ in range(20):
        region.update(False, s)
    assert region.radius == 1  # clamped at min_radius


def test_propose_stays_feasible_unseen_and_inside_the_region():
    history = _start(10, seed=1)
    incumbent = max(history, key=lambda x: x[1])[0]
    rng = random.Random(0)
    for radius in (1, 2, 4):
        config, ei = propose(
            history, SPACE, _feasible, TrustRegion(radius), rng, BayesSettings(candidates=32)
        )
        steps = sum(
            abs(SPACE.bits.index(a.bits) - SPACE.bits.index(b.bits))
            + abs(SPACE.ranks.index(a.rank) - SPACE.ranks.index(b.rank))
            for a, b in zip(config, incumbent, strict=True)
        )
        assert _feasible(config) and config not in {c for c, _ in history}
        assert 1 <= steps <= radius
        assert ei >= 0


def test_refine_improves_never_evaluates_infeasible_and_is_deterministic():
    history = _start(8, seed=2)
    calls: list[Config] = []

    def evaluate(config: Config) -> float:
        calls.append(config)
        assert _feasible(config), config.short()
        return _score(config)

    s = BayesSettings(max_rounds=6, ei_threshold=0.0, candidates=32)
    new = refine(evaluate, history, SPACE, _feasible, s, seed=3)
    assert len(new) == len(calls) == 6
    assert len({c for c, _ in new} | {c for c, _ in history}) == len(new) + len(history)
    assert max(v for _, v in new) > max(v for _, v in history)
    again = refine(_score, history, SPACE, _feasible, s, seed=3)
    assert [c for c, _ in again] == [c for c, _ in new]


def test_repair_lets_refinement_trade_bytes_at_the_budget_edge():
    """At an incumbent on the budget's edge every upward step is infeasible; repaired walks
    trade bytes (a unit up, a cheaper one down) and so can improve, always within budget."""
    edge = Config.uniform(6, 4, 8)
    assert _memory(edge) == BUDGET
    history = [(c, v) for c, v in _start(12, seed=4) if v < _score(edge)] + [(edge, _score(edge))]
    one = dict(initial_radius=1, min_radius=1, max_radius=1)  # only single steps are walked
    s = BayesSettings(max_rounds=6, ei_threshold=0.0, candidates=64, **one)

    def fix(config: Config) -> Config:
        return repair(config, SPACE, _memory, BUDGET)

    def above_edge(config: Config) -> bool:
        return any(c.bits > 4 or c.rank > 8 for c in config)

    plain = refine(_score, history, SPACE, _feasible, s, seed=1)
    assert not any(above_edge(c) for c, _ in plain)  # single steps up never fit
    assert max(v for _, v in plain) <= _score(edge)
    calls: list[Config] = []

    def evaluate(config: Config) -> float:
        calls.append(config)
        return _score(config)

    traded = refine(evaluate, history, SPACE, _feasible, s, repair=fix, seed=1)
    assert calls and all(_feasible(c) for c in calls)
    assert any(above_edge(c) for c, _ in traded)
    assert max(v for _, v in traded) > _score(edge)


def test_refine_stops_when_expected_improvement_saturates():
    # A constant objective: once the GP has seen it, it expects no gain anywhere.
    history = [(c, 0.5) for c, _ in _start(12, seed=4)]
    s = BayesSettings(max_rounds=30, ei_threshold=1e-2, patience=2, candidates=32)
    new = refine(lambda c: 0.5, history, SPACE, _feasible, s)
    assert 2 <= len(new) < 30


def test_refine_rejects_an_empty_or_failed_history():
    with pytest.raises(EdgeQRAError, match="finite score"):
        refine(_score, [(Config.uniform(6, 4, 8), float("nan"))], SPACE, _feasible, BayesSettings())
    with pytest.raises(EdgeQRAError, match="ei_threshold"):
        BayesSettings(ei_threshold=-1.0)


def test_lengler_stage3_improves_stays_feasible_and_is_deterministic():
    history = _start(8, seed=1)
    settings = BayesSettings(max_rounds=12, method="lengler")

    def fix(config: Config) -> Config:
        return repair(config, SPACE, _memory, BUDGET)

    runs = [
        refine(_score, history, SPACE, _feasible, settings, repair=fix, seed=3) for _ in range(2)
    ]
    assert runs[0] == runs[1]  # seeded
    new = runs[0]
    assert 0 < len(new) <= 12
    assert all(_feasible(c) for c, _ in new)
    seen = {c for c, _ in history}
    assert not seen & {c for c, _ in new}  # nothing measured twice
    assert len({c for c, _ in new}) == len(new)
    assert max(s for _, s in new) > max(s for _, s in history)
    with pytest.raises(EdgeQRAError, match="stage 3"):
        BayesSettings(method="cma")
