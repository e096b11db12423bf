"""The search's three stages in order, behind one journal and one evaluation budget.

Stage 1 (the caller's sensitivity profile) gives the initial population and the importance
weights; stage 2 is :func:`edgeqra.search.evolution.evolve`; stage 3 is
:func:`edgeqra.search.bayes.refine` on the full-fidelity results. Every evaluation passes
through :class:`Evaluations`, which answers from the journal what it already holds (so a
resumed search replays its own trajectory without tuning anything twice), refuses an
infeasible config, and stops the search when the evaluation or wall-time budget is spent.
Batches (:meth:`Evaluations.many`) go to an executor (:mod:`edgeqra.search.executors`),
which may run them in parallel; see there why the answers stay those of a sequential run.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from edgeqra.errors import ConfigError
from edgeqra.result import Result
from edgeqra.search.bayes import BayesSettings, refine
from edgeqra.search.evolution import EvolutionSettings, evolve, run_rungs
from edgeqra.search.executors import Done, Executor, LocalExecutor, Running, Task, WorkerInfo
from edgeqra.search.fidelity import Schedule
from edgeqra.search.journal import Journal
from edgeqra.search.pareto import non_dominated_sort
from edgeqra.settings import setting
from edgeqra.space import Config, SearchSpace

__all__ = [
    "Evaluations",
    "Exhausted",
    "SearchEvent",
    "SearchOutcome",
    "SearchSettings",
    "pareto_front",
    "run_search",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SearchSettings:
    """How long and how the search runs; the stage switches exist for ablations."""

    # 16 steps, rungs 4 -> 16, 32 evaluations: issue 20's benchmark (bench/RESULTS.md, "Quality
    # at a budget in bits"): 16 steps rank configs like 64 (Spearman 0.88) and the whole search
    # costs 0.40 epochs of ARC-Easy; the chosen config's final tuning is `tuning.final_steps`.
    steps: int = setting(16, help="the search's top-rung tuning steps", key="tuning.steps")
    eta: int = setting(4, help="successive-halving ratio between rungs", key="search.eta")
    rungs: int = setting(2, help="fidelity rungs (steps / eta^k)", key="search.rungs")
    evals: int = setting(  # journal hits included
        32, help="evaluations at any fidelity", key="search.evals"
    )
    time_limit: float | None = setting(
        None, help="wall-time budget in seconds", key="search.time_limit", metavar="S"
    )
    sensitivity: bool = setting(  # off = random initial population, no importance
        True, help="run stage 1, the sensitivity warm start (turn off for ablations)",
        key="search.sensitivity",
    )  # fmt: skip
    use_evolution: bool = setting(  # off = only the initial population is measured
        True, help="run stage 2, the evolution (turn off for ablations)", key="search.evolution"
    )
    use_bayes: bool = setting(
        True, help="run stage 3, the refinement (turn off for ablations)", key="search.bayes"
    )
    bayes_share: float = setting(  # the evolution stops at evals * (1 - share) when stage 3 runs
        0.25,
        help="share of the evaluations kept for stage 3 (the evolution stops before them)",
        key="search.bayes_share",
    )
    seed_baselines: bool = True  # put the uniform baselines that fit into the initial population
    fill: bool = setting(  # space.fill
        True,
        help="raise every candidate's bits/ranks to the budget before it is evaluated",
        key="search.fill",
    )
    evolution: EvolutionSettings = field(default_factory=EvolutionSettings)
    bayes: BayesSettings = field(default_factory=BayesSettings)

    def __post_init__(self) -> None:
        for name, low in (("steps", 0), ("eta", 2), ("rungs", 1), ("evals", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ConfigError(f"`{name}` must be an integer >= {low}, got {value!r}")
        share = self.bayes_share
        if isinstance(share, bool) or not isinstance(share, int | float) or not 0 <= share < 1:
            raise ConfigError(f"`bayes_share` must be a number in [0, 1), got {share!r}")
        if self.time_limit is not None and self.time_limit <= 0:
            raise ConfigError(f"`time_limit` must be positive seconds, got {self.time_limit}")

    @property
    def schedule(self) -> Schedule:
        """The fidelity rungs."""
        return Schedule(self.steps, self.eta, self.rungs)


@dataclass(frozen=True)
class SearchEvent:
    """A progress report for the CLI/TUI: one per evaluation and per stage change; with a
    parallel executor also one per dispatch, retry and failure (``running`` says what each
    worker is evaluating)."""

    stage: str
    evaluations: int
    max_evals: int
    best_score: float | None  # best full-fidelity score so far
    front_size: int
    result: Result | None = None
    cached: bool = False
    message: str = ""
    running: tuple[Running, ...] = ()  # evaluations in flight, one per busy worker
    worker: str = ""  # the worker that produced `result` (or failed)
    failed: bool = False  # `message` is an evaluation's error (a retry, or its last attempt)


class Exhausted(Exception):
    """The evaluation or time budget is spent (control flow, never shown to the user)."""


class Evaluations:
    """The one door to ``evaluate``: journal lookups, feasibility guard, budgets, events.

    ``evaluate`` runs in process (the local executor) unless ``executor`` is given. A
    failed evaluation (a parallel executor gave up after its retries) is journaled as such
    and answered as ``None``: the search drops it.
    """

    def __init__(
        self,
        evaluate: Callable[[Config, int], Result],
        journal: Journal,
        feasible: Callable[[Config], bool],
        settings: SearchSettings,
        on_event: Callable[[SearchEvent], None] | None = None,
        *,
        executor: Executor | None = None,
    ) -> None:
        self._evaluate = evaluate
        self.executor = executor or LocalExecutor(evaluate)
        self.journal = journal
        self.feasible = feasible
        self.settings = settings
        self.on_event = on_event
        self.limit = settings.evals  # the evaluations the current stage may reach (run_search)
        self.count = 0  # evaluations this search asked for (hits and failures included)
        self.fresh = 0  # of which really run now
        self.failed = 0  # of which failed on every attempt
        self.steps = 0  # tuning steps really run now
        self.started = time.monotonic()
        self.full: dict[Config, Result] = {}  # full-fidelity results, for the front

    def __call__(self, config: Config, fidelity: int, stage: str) -> Result | None:
        """The result of ``config`` at ``fidelity``: from the journal, else evaluated now."""
        return self.many([(config, fidelity)], stage)[0]

    def many(self, requests: Sequence[tuple[Config, int]], stage: str) -> list[Result | None]:
        """Results of independent requests, in request order; misses go to the executor.

        The budget is counted in request order exactly as one call per request would count
        it (journal hits always answered, the first miss past ``evals`` stops), and
        full-fidelity results enter the front in request order, so a batch run in parallel
        leaves the search where a sequential one would. Raises :class:`Exhausted` after
        the admitted requests are done when the budget cut the batch short.
        """
        out: list[Result | None] = [None] * len(requests)
        tasks: list[Task] = []
        stop: str | None = None
        for index, (config, fidelity) in enumerate(requests):
            if not self.feasible(config):  # repair upstream makes this unreachable; guard it
                raise RuntimeError(
                    f"internal error: infeasible config {config.short()} reached evaluate"
                )
            known = self.journal.get(str(config), fidelity)
            if known is not None:
                out[index] = known
                self._record(config, known, stage, cached=True)
                continue
            failure = self.journal.failure(str(config), fidelity)
            if failure is not None:  # it failed before: a resumed search does not retry it
                self.count += 1
                self.emit(stage, message=f"failed before: {failure.error}", failed=True)
                continue
            if self.count + len(tasks) >= self.limit:
                stop = "evaluations"
                break
            tasks.append(Task(index, config, fidelity))
        if tasks:
            stop = self._run(tasks, stage, out) or stop
        if stop is not None:
            raise Exhausted(stop)
        return out

    def _admit(self) -> bool:
        limit = self.settings.time_limit
        return limit is None or time.monotonic() - self.started < limit

    def _run(self, tasks: list[Task], stage: str, out: list[Result | None]) -> str | None:
        """Run ``tasks`` on the executor, journal each outcome as it arrives."""
        parallel = self.executor.width > 1
        started: list[int] = []

        def admit() -> bool:
            ok = self._admit()
            if ok:
                started.append(1)
            return ok

        def changed() -> None:
            if parallel:
                self.emit(stage)

        def retry(task: Task, error: str, worker: WorkerInfo) -> None:
            self.emit(
                stage,
                message=f"{task.config.short()} @ {task.fidelity} steps failed on "
                f"{worker.label} (attempt {task.attempt}): {error}; retrying",
                worker=worker.label,
                failed=True,
            )

        new_full: list[tuple[int, Config]] = []
        for done in self.executor.run(tasks, admit=admit, on_change=changed, on_retry=retry):
            self._journal(done, stage)
            config = done.task.config
            if done.result is None:
                self.emit(
                    stage,
                    message=f"{config.short()} @ {done.task.fidelity} steps failed after "
                    f"{done.task.attempt} attempts: {done.error}",
                    worker=done.worker.label,
                    failed=True,
                )
                continue
            out[done.task.index] = done.result
            if done.task.fidelity == self.settings.steps and config not in self.full:
                new_full.append((done.task.index, config))
            self._record(config, done.result, stage, cached=False, worker=done.worker.label)
        # Back into request order: `best()` breaks ties by insertion order, as in a
        # sequential run.
        for _, config in sorted(new_full, key=lambda item: item[0]):
            self.full[config] = self.full.pop(config)
        return "time limit" if len(started) < len(tasks) else None

    def _journal(self, done: Done, stage: str) -> None:
        """Write one outcome (the driver is the journal's only writer)."""
        worker = done.worker.to_json()
        if done.result is None:
            self.journal.append_failure(
                str(done.task.config),
                done.task.fidelity,
                done.error or "unknown error",
                attempts=done.task.attempt,
                stage=stage,
                worker=worker,
                wall=done.wall,
            )
            self.count += 1
            self.fresh += 1
            self.failed += 1
            return
        self.journal.append(done.result, stage=stage, worker=worker, wall=done.wall)
        self.fresh += 1
        self.steps += done.task.fidelity

    def _record(
        self, config: Config, result: Result, stage: str, *, cached: bool, worker: str = ""
    ) -> None:
        self.count += 1
        if result.fidelity == self.settings.steps:
            self.full[config] = result
        self.emit(stage, result=result, cached=cached, worker=worker)

    def best(self) -> Result | None:
        """Best full-fidelity result so far; ties go to less memory (so it lies on the front)."""
        return max(
            self.full.values(), key=lambda r: (r.score, -(r.memory_bytes or 0)), default=None
        )

    def emit(
        self,
        stage: str,
        *,
        result: Result | None = None,
        cached: bool = False,
        message: str = "",
        worker: str = "",
        failed: bool = False,
    ) -> None:
        """Send a progress event (no-op without a listener)."""
        if self.on_event is None:
            return
        best = self.best()
        self.on_event(
            SearchEvent(
                stage,
                self.count,
                self.settings.evals,
                None if best is None else best.score,
                len(pareto_front(list(self.full.values()))),
                result,
                cached,
                message,
                self.executor.in_flight(),
                worker,
                failed,
            )
        )


def pareto_front(results: Sequence[Result]) -> list[Result]:
    """Non-dominated results over (score ↑, predicted memory ↓), by ascending memory."""
    if not results:
        return []
    points = [(-r.score, r.memory_bytes or 0) for r in results]
    front = [results[i] for i in non_dominated_sort(points)[0]]
    return sorted(front, key=lambda r: (r.memory_bytes or 0, -r.score))


@dataclass(frozen=True)
class SearchOutcome:
    """What a search found: the measured front and the best config within the budget."""

    best: Result
    front: tuple[Result, ...]
    evaluations: int
    fresh: int
    tuning_steps: int
    seconds: float
    stopped: str
    failed: int = 0

    def to_json(self) -> dict[str, object]:
        """JSON-ready summary."""
        return {
            "best": self.best.to_json(),
            "front": [r.to_json() for r in self.front],
            "evaluations": self.evaluations,
            "fresh_evaluations": self.fresh,
            "failed_evaluations": self.failed,
            "tuning_steps": self.tuning_steps,
            "seconds": self.seconds,
            "stopped": self.stopped,
        }


def run_search(
    evaluations: Evaluations,
    space: SearchSpace,
    initial: Sequence[Config],
    repair: Callable[[Config], Config],
    budget: int,
    *,
    importance: Sequence[float] | None = None,
    anchors: Sequence[Config] = (),
    seed: int = 0,
) -> SearchOutcome:
    """Stages 2 and 3 from a feasible initial population; returns the measured front.

    ``anchors`` (the strongest uniform baseline that fits) are evaluated at full length
    first, whatever the low rungs say: at a few tuning steps the screening score is mostly
    noise (in the CPU quick-start, 1-step scores ranked uniform 3-bit above 4-bit), and a
    search must never return a config that loses to the baseline it was meant to beat.
    ``seed`` (the job's one seed) seeds the evolution and the refinement. When stage 3 runs,
    the evolution stops at ``evals * (1 - bayes_share)`` evaluations so that the refinement
    gets the rest (issue 20, H200: with 32 evaluations the evolution spent them all and
    stage 3 never ran, so two stage-3 methods could not be compared).
    The initial population then goes through successive halving (so even with stage 2 off
    there are full-fidelity results); the evolution and the refinement run until their own
    stopping rule or until ``evaluations`` says the budget is spent.
    """
    settings = evaluations.settings
    schedule = settings.schedule
    stopped = "finished"
    try:
        evaluations.emit("initial population", message=f"{len(initial)} configs")
        evaluations.many([(a, schedule.rungs[-1]) for a in anchors], "initial population")
        if settings.use_evolution:
            evaluations.emit("evolution", message=f"rungs {list(schedule.rungs)}")
            reserve = round(settings.evals * settings.bayes_share) if settings.use_bayes else 0
            evaluations.limit = settings.evals - reserve
            try:
                stopped = evolve(
                    initial,
                    evaluations,
                    space,
                    repair,
                    budget,
                    schedule,
                    settings.evolution,
                    importance=importance,
                    seed=seed,
                    on_generation=lambda g, hv: evaluations.emit(
                        "evolution", message=f"generation {g}: hypervolume {hv:.4f}"
                    ),
                )
            except Exhausted as why:
                if not reserve or str(why) != "evaluations":
                    raise  # the whole budget (or the time limit) is spent
                stopped = f"evolution stopped at {evaluations.limit} evaluations"
            finally:
                evaluations.limit = settings.evals
        else:
            run_rungs(initial, evaluations, schedule, "initial population")
        if settings.use_bayes and evaluations.full:
            evaluations.emit("bayes", message="GP + expected improvement in a trust region")
            history = [(c, r.score) for c, r in evaluations.full.items()]

            def score(config: Config) -> float:
                result = evaluations(config, settings.steps, "bayes")
                return math.nan if result is None else result.score  # refine skips NaN

            refine(
                score,
                history,
                space,
                evaluations.feasible,
                settings.bayes,
                repair=repair,
                seed=seed,
            )
            stopped = "bayes finished"
    except Exhausted as why:
        stopped = f"budget spent ({why})"
    best = evaluations.best()
    if best is None:
        raise ConfigError(
            f"the search ended before any full-length ({settings.steps}-step) evaluation; "
            "raise `--evals` / `--time-limit` or lower `--steps`"
        )
    evaluations.emit("done", message=stopped)
    return SearchOutcome(
        best=best,
        front=tuple(pareto_front(list(evaluations.full.values()))),
        evaluations=evaluations.count,
        fresh=evaluations.fresh,
        tuning_steps=evaluations.steps,
        seconds=time.monotonic() - evaluations.started,
        stopped=stopped,
        failed=evaluations.failed,
    )
