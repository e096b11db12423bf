"""Stage 2: NSGA-II over (score, memory), driven through nevergrad's ask/tell, multi-fidelity.

nevergrad holds the candidates: an ``ng.p.Tuple`` of per-unit ``(TransitionChoice(Q),
TransitionChoice(R))`` genes, one optimizer told every low-fidelity measurement as the two
losses ``(-score, memory / budget)``; its ``pareto_front()`` is the front of what it was told.
A share of each generation's children is asked from that optimizer (its own discrete
mutation, default ``DiscreteLenglerOnePlusOne``). The rest come from our operators, because
nevergrad's optimizers express neither a *layer-wise* crossover (a (bits, rank) pair
inherited whole: its crossovers act on flat arrays) nor an importance-weighted one-step
(proximity) mutation; those are ``SearchSpace.crossover`` / ``SearchSpace.mutate``, parents
picked by NSGA-II rank and crowding (``pareto.select``), and they reach the optimizer through
``tell`` of a spawned child. Every child is repaired to the budget before anything sees it.

Each generation: make a pool of children → the ridge surrogate keeps the most promising →
score at the lowest fidelity → successive halving promotes the best to longer tuning →
NSGA-II survivor selection on the low-fidelity objectives (every member has them). Stops on
hypervolume stagnation, after ``generations``, or when the evaluation/time budget ends.
"""

from __future__ import annotations

import logging
import random
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import nevergrad as ng

from edgeqra.errors import ConfigError
from edgeqra.result import Result
from edgeqra.search.fidelity import Schedule, promote
from edgeqra.search.pareto import crowding_distance, hypervolume_2d, non_dominated_sort, select
from edgeqra.search.surrogate import Surrogate
from edgeqra.settings import setting
from edgeqra.space import Config, SearchSpace

__all__ = ["EvolutionSettings", "config_value", "evolve", "parametrization_for", "run_rungs"]

log = logging.getLogger(__name__)

Evaluate = Callable[[Config, int, str], Result | None]  # (config, fidelity, stage) -> Result


@dataclass(frozen=True)
class EvolutionSettings:
    """NSGA-II settings; the paper ranges are population 5–20 and 5–10 generations."""

    population: int = setting(8, help="NSGA-II population", key="search.population")
    children: int = setting(8, help="children per generation", key="search.children")
    generations: int = setting(6, help="at most this many generations", key="search.generations")
    crossover_rate: float = 0.9
    mutation_rate: float = 0.1
    native_fraction: float = 0.25  # share of children asked from the nevergrad optimizer
    screen_factor: int = 3  # the surrogate picks `children` out of screen_factor × children
    patience: int = 2  # generations without hypervolume gain before stopping
    hv_tolerance: float = 1e-3  # relative gain below which a generation counts as stagnant
    optimizer: str = "DiscreteLenglerOnePlusOne"
    front: bool = setting(  # False: memory under the budget is no merit
        False,
        help="rank candidates on score and memory (the whole front), not on score under the "
        "budget (implied by --alpha)",
        key="search.front",
    )

    def __post_init__(self) -> None:
        if self.population < 2 or self.children < 1:
            raise ConfigError(
                f"`population` must be >= 2 and `children` >= 1; got {self.population}, "
                f"{self.children}"
            )
        if not 0.0 <= self.native_fraction <= 1.0:
            raise ConfigError(f"`native_fraction` must be in [0, 1], got {self.native_fraction}")
        if self.optimizer not in ng.optimizers.registry:
            raise ConfigError(
                f"`optimizer` {self.optimizer!r} is not a nevergrad optimizer; try "
                "DiscreteLenglerOnePlusOne, DiscreteOnePlusOne or NGOpt"
            )


def parametrization_for(space: SearchSpace, seed: int) -> ng.p.Tuple:
    """One (bits, rank) gene per unit; ordered choices so a mutation step is ±1 position."""
    param = ng.p.Tuple(
        *[
            ng.p.Tuple(ng.p.TransitionChoice(space.bits), ng.p.TransitionChoice(space.ranks))
            for _ in range(space.n_units)
        ]
    )
    param.random_state.seed(seed)
    return param


def config_value(config: Config) -> tuple[tuple[int, int], ...]:
    return tuple((c.bits, c.rank) for c in config)


def _batch(evaluate: Evaluate, requests: list[tuple[Config, int]], stage: str):
    """One rung's results in request order: through ``evaluate.many`` (a parallel executor
    may run them at once) when it has one, else one call each."""
    many = getattr(evaluate, "many", None)
    if many is not None:
        return many(requests, stage)
    return [evaluate(c, f, stage) for c, f in requests]


def run_rungs(
    configs: Sequence[Config], evaluate: Evaluate, schedule: Schedule, stage: str
) -> dict[Config, Result]:
    """Successive halving over ``configs``: all at the lowest rung, the best 1/eta promoted.

    A rung's evaluations are independent of each other, so each rung is one batch. Returns
    each config's result at the *lowest* rung (the screening objective); a config whose
    evaluation failed (``None``) is left out and never promoted.
    """
    low: dict[Config, Result] = {}
    alive = list(dict.fromkeys(configs))
    for level, fidelity in enumerate(schedule.rungs):
        answers = _batch(evaluate, [(c, fidelity) for c in alive], stage)
        measured = [(c, r) for c, r in zip(alive, answers, strict=True) if r is not None]
        if level == 0:
            low = dict(measured)
        if level + 1 < len(schedule.rungs):
            scores = [r.score for _, r in measured]
            alive = [measured[i][0] for i in promote(scores, schedule.eta)]
    return low


class _Population:
    """Configs with their low-fidelity objectives ``(-score, memory / budget)``.

    Without ``front`` the memory objective is clipped at the budget: every feasible config
    gets 1.0, so NSGA-II ranks by score alone (a hard budget is a constraint, and bytes left
    unused below it buy the user nothing); with ``front`` it is the real memory, for users who
    want the whole score–memory trade-off (``--front`` / ``--alpha``).
    """

    def __init__(self, budget: int, front: bool = False) -> None:
        self.budget = budget
        self.front = front
        self.members: list[Config] = []
        self.seen: dict[Config, Result] = {}

    def objectives(self, configs: Sequence[Config]) -> list[tuple[float, float]]:
        out = []
        for c in configs:
            memory = (self.seen[c].memory_bytes or 0) / self.budget
            out.append((-self.seen[c].score, memory if self.front else max(memory, 1.0)))
        return out


def _tournament(pop: _Population, rng: random.Random) -> Config:
    """Binary tournament on (front rank, crowding distance), as NSGA-II selects parents."""
    points = pop.objectives(pop.members)
    rank = {i: r for r, front in enumerate(non_dominated_sort(points)) for i in front}
    crowd: dict[int, float] = {}
    for front in non_dominated_sort(points):
        crowd.update(crowding_distance(points, front))
    a, b = rng.randrange(len(pop.members)), rng.randrange(len(pop.members))
    best = min((a, b), key=lambda i: (rank[i], -crowd[i], i))
    return pop.members[best]


def evolve(
    initial: Sequence[Config],
    evaluate: Evaluate,
    space: SearchSpace,
    repair: Callable[[Config], Config],
    budget: int,
    schedule: Schedule,
    settings: EvolutionSettings,
    *,
    importance: Sequence[float] | None = None,
    seed: int = 0,
    on_generation: Callable[[int, float], None] | None = None,
) -> str:
    """Run the evolution; every measurement goes through ``evaluate`` (which journals it).

    Args:
        initial: the starting population, already feasible (stage 1's seed, perturbations,
            the uniform baselines that fit).
        evaluate: ``(config, fidelity, stage) -> Result``; raises to stop the search when
            the evaluation or time budget is spent.
        repair: maps any config into the budget (``space.repair`` bound to the profile).
        budget: the profile's budget in bytes (normalises the memory objective).
        schedule: the fidelity rungs.
        importance: per-unit weights for importance-guided mutation (stage 1).
        on_generation: called with (generation, hypervolume) after each generation.

    Returns:
        Why it stopped: ``"generations"`` or ``"hypervolume stagnation"``.
    """
    rng = random.Random(seed)
    optimizer = ng.optimizers.registry[settings.optimizer](
        parametrization=parametrization_for(space, seed), num_workers=1
    )
    pop = _Population(budget, settings.front)
    surrogate = Surrogate(space)

    def measure(configs: Sequence[Config], stage: str) -> None:
        fresh = [c for c in dict.fromkeys(configs) if c not in pop.seen]
        for config, result in run_rungs(fresh, evaluate, schedule, stage).items():
            pop.seen[config] = result
            child = optimizer.parametrization.spawn_child(new_value=config_value(config))
            with warnings.catch_warnings():
                # nevergrad scalarises multi-objective losses by hypervolume and gives a
                # dominated point an infinite loss, warning each time: expected here.
                warnings.simplefilter("ignore", ng.errors.BadLossWarning)
                optimizer.tell(child, list(pop.objectives([config])[0]))

    measure(initial, "initial population")
    pop.members = [c for c in dict.fromkeys(initial) if c in pop.seen]  # failed ones dropped
    if not pop.seen:
        raise ConfigError(
            "every evaluation of the initial population failed; the journal's `error` "
            "fields say why"
        )
    reference = _reference(pop)
    best_hv = hypervolume_2d(pop.objectives(list(pop.seen)), reference)
    stagnant = 0
    for generation in range(1, settings.generations + 1):
        children = _children(pop, optimizer, space, repair, settings, importance, rng)
        if surrogate.fit(list(pop.seen), [r.score for r in pop.seen.values()]):
            predicted = surrogate.predict(children)
            order = sorted(range(len(children)), key=lambda i: (-predicted[i], i))
            children = [children[i] for i in order]
        children = children[: settings.children]
        measure(children, "evolution")
        pool = [c for c in dict.fromkeys(pop.members + children) if c in pop.seen]
        pop.members = [pool[i] for i in select(pop.objectives(pool), settings.population)]
        hv = hypervolume_2d(pop.objectives(list(pop.seen)), reference)
        log.info("generation %d: hypervolume %.5f (front %d)", generation, hv, len(pool))
        if on_generation is not None:
            on_generation(generation, hv)
        stagnant = stagnant + 1 if hv <= best_hv * (1 + settings.hv_tolerance) else 0
        best_hv = max(best_hv, hv)
        if stagnant >= settings.patience:
            return "hypervolume stagnation"
    return "generations"


def _reference(pop: _Population) -> tuple[float, float]:
    """Hypervolume reference point, fixed after the initial population so values compare.

    Worst initial score minus 10 % of the initial score range (at least 0.01), and the budget
    (twice the budget when memory is clipped at it: every point then sits at 1.0 and the
    hypervolume is the best score's gain over the reference, a single-objective progress).
    """
    scores = [r.score for r in pop.seen.values()]
    span = max(max(scores) - min(scores), 0.01)
    return (-(min(scores) - 0.1 * span), 1.0 if pop.front else 2.0)


def _children(
    pop: _Population,
    optimizer: ng.optimization.Optimizer,
    space: SearchSpace,
    repair: Callable[[Config], Config],
    settings: EvolutionSettings,
    importance: Sequence[float] | None,
    rng: random.Random,
) -> list[Config]:
    """A pool of new feasible configs: nevergrad's own asks, then crossover + proximity mutation."""
    target = settings.children * max(1, settings.screen_factor)
    n_native = round(settings.native_fraction * settings.children)
    pool: dict[Config, None] = {}
    for _ in range(4 * n_native):  # asks may repeat or repair onto seen configs
        if sum(1 for _ in pool) >= n_native:
            break
        config = repair(Config.from_pairs(optimizer.ask().value))
        if config not in pop.seen:
            pool[config] = None
    for _ in range(8 * target):
        if len(pool) >= target:
            break
        first = _tournament(pop, rng)
        child = first
        if rng.random() < settings.crossover_rate:
            child = space.crossover(first, _tournament(pop, rng), rng)
        child = repair(space.mutate(child, rng, rate=settings.mutation_rate, weights=importance))
        if child not in pop.seen:
            pool[child] = None
    configs = list(pool)
    native, ours = configs[:n_native], configs[n_native:]
    return native + ours  # natives first: the surrogate reorders, ties keep this order
