"""The search machinery: NSGA-II ranking, hypervolume, fidelity rungs, journal, whole runs.

Whole-search tests use a synthetic objective (a pure function of the config, so a resumed run
must reproduce an uninterrupted one exactly) and an additive memory model with a binding
budget; the model-backed end-to-end run lives in tests/test_cli_search.py.
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
import zlib

import pytest

from edgeqra.errors import ConfigError
from edgeqra.evaluate import Result
from edgeqra.search.bayes import BayesSettings
from edgeqra.search.driver import Evaluations, SearchSettings, pareto_front, run_search
from edgeqra.search.evolution import EvolutionSettings
from edgeqra.search.fidelity import Schedule, promote
from edgeqra.search.journal import Journal
from edgeqra.search.pareto import (
    crowding_distance,
    dominates,
    hypervolume_2d,
    non_dominated_sort,
    select,
)
from edgeqra.search.surrogate import Surrogate
from edgeqra.space import Config, SearchSpace, repair

# ----------------------------------------------------------------------------- pareto


def test_dominance_and_fronts_hand_checked():
    points = [(1, 5), (2, 3), (3, 4), (4, 1), (5, 5), (2, 3)]
    assert dominates((1, 1), (1, 2)) and not dominates((1, 2), (2, 1))
    assert not dominates((2, 3), (2, 3))  # equal points do not dominate each other
    # (2,3) twice and (1,5), (4,1) are non-dominated; (3,4) is dominated by (2,3); (5,5) by all.
    assert non_dominated_sort(points) == [[0, 1, 3, 5], [2], [4]]


def test_crowding_distance_hand_checked():
    points = [(0.0, 4.0), (1.0, 2.0), (2.0, 1.0), (4.0, 0.0)]
    d = crowding_distance(points, [0, 1, 2, 3])
    assert d[0] == d[3] == math.inf
    # point 1: neighbours (0,4) and (2,1): (2-0)/4 + (4-1)/4 = 1.25
    assert d[1] == pytest.approx(1.25)
    # point 2: neighbours (1,2) and (4,0): (4-1)/4 + (2-0)/4 = 1.25
    assert d[2] == pytest.approx(1.25)
    assert crowding_distance(points, [1, 2]) == {1: math.inf, 2: math.inf}


def test_select_keeps_whole_fronts_then_cuts_by_crowding():
    points = [(0.0, 4.0), (1.0, 2.0), (1.1, 1.9), (4.0, 0.0), (5.0, 5.0)]
    # Front 0 has four points; k=3 keeps both extremes and the less crowded middle one.
    chosen = select(points, 3)
    assert set(chosen) == {0, 1, 3} or set(chosen) == {0, 2, 3}
    assert 4 not in select(points, 4) and 4 in select(points, 5)


def test_hypervolume_2d_hand_checked():
    ref = (10.0, 10.0)
    assert hypervolume_2d([(2.0, 3.0)], ref) == pytest.approx(8 * 7)
    # Two staircase points: 8*7 + (10-5)*(3-1) = 56 + 10
    assert hypervolume_2d([(2.0, 3.0), (5.0, 1.0)], ref) == pytest.approx(66.0)
    # A dominated point and a point outside the reference add nothing.
    assert hypervolume_2d([(2.0, 3.0), (5.0, 1.0), (6.0, 4.0), (11.0, 0.0)], ref) == 66.0
    assert hypervolume_2d([], ref) == 0.0


# ----------------------------------------------------------------------------- fidelity


def test_schedule_rungs_and_promotion():
    assert Schedule(64).rungs == (4, 16, 64)
    assert Schedule(8, eta=2, n_rungs=4).rungs == (1, 2, 4, 8)
    assert Schedule(3).rungs == (1, 3)  # clipped at one step, duplicates merged
    assert Schedule(0).rungs == (0,)
    assert promote([0.1, 0.9, 0.5, 0.9, 0.2], 2) == [1, 3, 2]  # ceil(5/2), ties by index
    assert promote([], 4) == []


# ----------------------------------------------------------------------------- journal


def _result(config: Config, fidelity: int, score: float, memory: int) -> Result:
    return Result(
        config=str(config),
        fidelity=fidelity,
        score=score,
        metric="acc",
        loss=1.0 - score,
        perplexity=math.exp(1.0 - score),
        accuracy=score,
        accuracy_norm=None,
        train_loss=None,
        memory_bytes=memory,
        fits=True,
        seconds=0.0,
        seed=0,
    )


def test_journal_round_trip_and_truncated_tail(tmp_path):
    path = tmp_path / "journal.jsonl"
    a, b = Config.uniform(3, 4, 8), Config.uniform(3, 2, 0)
    journal = Journal(path)
    journal.append(_result(a, 4, 0.25, 100), stage="evolution")
    journal.append(_result(b, 16, 0.5, 50), stage="bayes")
    again = Journal(path)
    assert len(again) == 2 and again.get(str(a), 4) == journal.get(str(a), 4)
    assert again.get(str(a), 16) is None and again.entries[1].stage == "bayes"
    # A kill in the middle of a write leaves half a line: it is dropped and overwritten.
    with path.open("a") as fh:
        fh.write('{"config": "4/8,4/8')
    recovered = Journal(path)
    assert len(recovered) == 2
    recovered.append(_result(b, 4, 0.125, 50), stage="evolution")
    lines = path.read_text().splitlines()
    assert len(lines) == 3 and all(json.loads(line) for line in lines)


def test_journal_corrupt_middle_line_is_an_error(tmp_path):
    path = tmp_path / "journal.jsonl"
    journal = Journal(path)
    journal.append(_result(Config.uniform(2, 4, 8), 4, 0.5, 1), stage="x")
    path.write_text("not json\n" + path.read_text())
    with pytest.raises(Exception, match="corrupt line"):
        Journal(path)


# ----------------------------------------------------------------------------- surrogate


def test_surrogate_learns_a_linear_objective():
    space = SearchSpace(6)
    rng = random.Random(0)
    train = [space.sample(rng) for _ in range(40)]
    test = [space.sample(rng) for _ in range(40)]

    def score(c: Config) -> float:
        return sum(space.encode(c)) + 0.01 * rng.random()

    surrogate = Surrogate(space)
    assert not surrogate.fit(train[:3], [score(c) for c in train[:3]])  # too few points
    assert surrogate.fit(train, [score(c) for c in train])
    assert surrogate.rank_correlation(test, [score(c) for c in test]) > 0.9


# ----------------------------------------------------------------------------- whole search


class Synthetic:
    """A deterministic objective: more bits and rank help, late units matter more; noise by fidelity."""

    def __init__(self, space: SearchSpace) -> None:
        self.space = space
        self.calls: list[tuple[str, int]] = []

    def memory(self, config: Config) -> int:
        return sum(c.bits * 100 + c.rank * 10 for c in config)

    def evaluate(self, config: Config, fidelity: int) -> Result:
        self.calls.append((str(config), fidelity))
        n = len(config)
        quality = sum(
            (1 + i / n) * (math.log2(c.bits) + 0.3 * math.log2(1 + c.rank))
            for i, c in enumerate(config)
        )
        wobble = (zlib.crc32(f"{config}@{fidelity}".encode()) % 1000) / 1e6  # seeded 'noise'
        return _result(
            config, fidelity, quality * (1 - 1 / (1 + fidelity)) + wobble, self.memory(config)
        )


def _search(
    tmp_path,
    settings: SearchSettings,
    synthetic: Synthetic,
    budget: int,
    *,
    fail_after=None,
    anchors=(),
):
    space = synthetic.space
    journal = Journal(tmp_path / "journal.jsonl")
    evaluate = synthetic.evaluate
    if fail_after is not None:
        done = [0]

        def evaluate(config, fidelity):  # noqa: F811 - a killable wrapper
            if done[0] >= fail_after:
                raise KeyboardInterrupt  # the user (or the OOM killer) stops the run
            done[0] += 1
            return synthetic.evaluate(config, fidelity)

    evaluations = Evaluations(evaluate, journal, lambda c: synthetic.memory(c) <= budget, settings)

    def fix(c):
        return repair(c, space, synthetic.memory, budget)

    rng = random.Random(SEED)
    initial = list(dict.fromkeys(fix(space.sample(rng)) for _ in range(6)))
    outcome = run_search(evaluations, space, initial, fix, budget, anchors=anchors, seed=SEED)
    return outcome, evaluations


SEED = 3  # the job's one seed (run_search passes it to the evolution and the refinement)
SETTINGS = SearchSettings(
    steps=8,
    eta=2,
    rungs=3,
    evals=70,
    evolution=EvolutionSettings(population=6, children=6, generations=4, patience=10),
    bayes=BayesSettings(max_rounds=4, candidates=64),
)


def test_search_respects_budget_and_evaluation_count(tmp_path):
    space = SearchSpace(8, ranks=(0, 4, 8, 16))
    synthetic = Synthetic(space)
    budget = 8 * (
        400 + 80
    )  # uniform 4-bit rank 8 fits exactly; 8-bit anywhere costs rank/bits elsewhere
    outcome, evaluations = _search(tmp_path, SETTINGS, synthetic, budget)
    assert synthetic.calls, "nothing was evaluated"
    assert all(synthetic.memory(Config.parse(c)) <= budget for c, _ in synthetic.calls)
    assert len(synthetic.calls) == len(set(synthetic.calls)) == evaluations.fresh
    assert evaluations.count <= SETTINGS.evals
    assert all(r.fidelity == SETTINGS.steps for r in outcome.front)
    assert outcome.best.score == max(r.score for r in outcome.front)
    assert outcome.best.memory_bytes <= budget
    # The front is non-dominated and sorted by memory.
    mems = [r.memory_bytes for r in outcome.front]
    assert mems == sorted(mems)
    assert pareto_front(list(outcome.front)) == list(outcome.front)
    # Every stage ran: initial population, evolution and the Bayesian refinement.
    stages = {e.stage for e in evaluations.journal.entries}
    assert {"initial population", "evolution", "bayes"} <= stages, stages


def test_the_evolution_leaves_stage_3_its_share_of_the_evaluations(tmp_path):
    space = SearchSpace(8, ranks=(0, 4, 8, 16))
    budget = 8 * (400 + 80)
    settings = dataclasses.replace(  # an evolution that would spend every evaluation
        SETTINGS,
        evals=40,
        bayes_share=0.25,
        evolution=EvolutionSettings(population=6, children=6, generations=50, patience=50),
    )
    _, evaluations = _search(tmp_path, settings, Synthetic(space), budget)
    stages = [e.stage for e in evaluations.journal.entries]
    assert stages.count("initial population") + stages.count("evolution") <= 30
    assert stages.count("bayes") >= 1 and evaluations.count <= 40
    without = dataclasses.replace(settings, bayes_share=0.0)
    (tmp_path / "no-share").mkdir()
    _, evaluations = _search(tmp_path / "no-share", without, Synthetic(space), budget)
    assert "bayes" not in {e.stage for e in evaluations.journal.entries}  # no evaluation left
    with pytest.raises(ConfigError, match="bayes_share"):
        dataclasses.replace(settings, bayes_share=1.0)


class Deceptive(Synthetic):
    """Uniform 4-bit rank 8 is the best config at full length but looks worst when screened."""

    ANCHOR = "4/8,4/8,4/8,4/8,4/8,4/8"

    def evaluate(self, config: Config, fidelity: int) -> Result:
        result = super().evaluate(config, fidelity)
        if str(config) == self.ANCHOR:
            score = 1e3 if fidelity == SETTINGS.steps else -1e3
            return _result(config, fidelity, score, self.memory(config))
        return result


def test_anchor_is_evaluated_at_full_length_and_never_lost(tmp_path):
    space = SearchSpace(6, ranks=(0, 4, 8, 16))
    budget = 6 * (400 + 80)
    anchor = Config.parse(Deceptive.ANCHOR)
    plain = Deceptive(space)
    outcome, _ = _search(tmp_path / "plain", SETTINGS, plain, budget)
    assert (Deceptive.ANCHOR, SETTINGS.steps) not in plain.calls  # never measured at full length
    assert outcome.best.score < 1e3
    anchored = Deceptive(space)
    outcome, _ = _search(tmp_path / "anchored", SETTINGS, anchored, budget, anchors=[anchor])
    assert anchored.calls[0] == (Deceptive.ANCHOR, SETTINGS.steps)
    assert outcome.best.config == Deceptive.ANCHOR and outcome.best.score == 1e3


def test_search_is_deterministic_for_a_seed(tmp_path):
    space = SearchSpace(6)
    budget = 6 * (400 + 80)
    first = Synthetic(space)
    _search(tmp_path / "a", SETTINGS, first, budget)
    second = Synthetic(space)
    _search(tmp_path / "b", SETTINGS, second, budget)
    assert first.calls == second.calls


def test_killed_search_resumes_without_reevaluating(tmp_path):
    space = SearchSpace(6)
    budget = 6 * (400 + 80)
    planned = Synthetic(space)
    full, _ = _search(tmp_path / "whole", SETTINGS, planned, budget)

    killed = Synthetic(space)
    with pytest.raises(KeyboardInterrupt):
        _search(tmp_path / "run", SETTINGS, killed, budget, fail_after=17)
    assert len(killed.calls) == 17
    resumed = Synthetic(space)
    outcome, evaluations = _search(tmp_path / "run", SETTINGS, resumed, budget)
    # Nothing recorded was evaluated again, and together they did exactly the planned work.
    assert not set(killed.calls) & set(resumed.calls)
    assert killed.calls + resumed.calls == planned.calls
    assert evaluations.count == full.evaluations
    assert outcome.best == full.best


def test_population_clips_memory_at_the_budget_unless_the_front_is_asked():
    """Under a hard budget, bytes left unused are no merit: ranking is by score alone."""
    from edgeqra.evaluate import Result
    from edgeqra.search.evolution import _Population, _reference

    def result(score: float, memory: int) -> Result:
        return Result("c", 4, score, "acc", 1.0, 2.7, score, score, None, memory, True, 0.0, 0)

    a, b = Config.uniform(2, 4, 8), Config.uniform(2, 2, 8)
    for front, expected in (
        (False, [(-0.5, 1.0), (-0.4, 1.0)]),
        (True, [(-0.5, 0.9), (-0.4, 0.5)]),
    ):
        pop = _Population(100, front)
        pop.seen = {a: result(0.5, 90), b: result(0.4, 50)}
        assert pop.objectives([a, b]) == expected
        assert _reference(pop)[1] == (1.0 if front else 2.0)
