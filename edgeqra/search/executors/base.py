"""The executor's vocabulary: settings, tasks, outcomes, the worker-job protocol, and the
in-process executor (see the package docstring for the design)."""

from __future__ import annotations

import abc
import dataclasses
import os
import socket
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING, Protocol

from edgeqra.errors import ConfigError, EdgeQRAError
from edgeqra.settings import setting

if TYPE_CHECKING:
    from edgeqra.result import Result
    from edgeqra.space import Config


class ExecutorKind(str, Enum):
    """Where evaluations run."""

    LOCAL = "local"
    PROCESSES = "processes"
    RAY = "ray"


@dataclass(frozen=True)
class ExecutorSettings:
    """Which executor, how many workers, where the Ray cluster is, how often to retry."""

    kind: ExecutorKind = setting(
        ExecutorKind.LOCAL,
        help="where evaluations run: in process (local), worker processes (one per GPU, or N "
        "on CPU), or Ray (`pip install 'edgeqra[ray]'`); the answers are the same",
        key="search.executor",
    )
    workers: int | None = setting(  # None: one per visible GPU, else 2 CPU workers (local: 1)
        None, help="parallel workers (default: one per visible GPU, 2 on CPU)",
        key="search.workers",
    )  # fmt: skip
    ray_address: str | None = setting(  # None: start a local Ray runtime
        None,
        help="join this Ray cluster (e.g. `auto` or `ray://head:10001`) instead of starting one",
        key="search.ray_address",
        metavar="ADDR",
    )
    attempts: int = setting(
        3, help="tries per evaluation before it is journaled failed", key="search.attempts"
    )

    def __post_init__(self) -> None:
        try:
            object.__setattr__(self, "kind", ExecutorKind(self.kind))
        except ValueError:
            raise ConfigError(
                f"`executor` {self.kind!r} is not one of "
                f"{[k.value for k in ExecutorKind]}; use `local`, `processes` or `ray`"
            ) from None
        if self.workers is not None and (isinstance(self.workers, bool) or self.workers < 1):
            raise ConfigError(f"`workers` must be >= 1, got {self.workers!r}")
        if self.attempts < 1:
            raise ConfigError(f"`attempts` must be >= 1, got {self.attempts}")
        if self.ray_address is not None and self.kind is not ExecutorKind.RAY:
            raise ConfigError(
                f"`ray_address` {self.ray_address!r} needs `executor` ray, got `{self.kind.value}`"
            )
        if self.kind is ExecutorKind.LOCAL and self.workers not in (None, 1):
            raise ConfigError(
                f"the local executor runs one evaluation at a time, got `workers` "
                f"{self.workers}; use `--executor processes` or `ray` for more"
            )


class ExecutorError(EdgeQRAError):
    """A worker could not start, or the executor cannot be set up (message says the fix)."""


@dataclass(frozen=True)
class Task:
    """One evaluation to run: the ``index``-th request of a batch, on its ``attempt``-th try."""

    index: int
    config: Config
    fidelity: int
    attempt: int = 1


@dataclass(frozen=True)
class WorkerInfo:
    """Who ran an evaluation (recorded in the journal)."""

    slot: int  # the executor's worker number, stable across restarts
    host: str
    pid: int
    device: str  # "cpu", or "cuda:<physical GPU ids>"

    @property
    def label(self) -> str:
        """Short name for progress lines, e.g. ``w1 cuda:1``."""
        return f"w{self.slot} {self.device}"

    def to_json(self) -> dict[str, object]:
        """JSON-ready dict."""
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class Running:
    """An evaluation in flight on a worker."""

    worker: str  # WorkerInfo.label, or "w<slot>" before the worker reported
    config: Config
    fidelity: int
    attempt: int
    since: float  # time.monotonic() at dispatch


@dataclass(frozen=True)
class Done:
    """A finished task: its result, or (after the last attempt) the error."""

    task: Task
    result: Result | None
    error: str | None
    worker: WorkerInfo
    wall: float  # seconds from dispatch to outcome, seen by the driver


class WorkerJob(Protocol):
    """What a worker builds its evaluate function from, once (picklable)."""

    def build(self, slot: int) -> tuple[Callable[[Config, int], Result], str]:
        """(evaluate, device label) for the worker in ``slot``."""
        ...


# ----------------------------------------------------------------------------- executors


class Executor(abc.ABC):
    """Runs batches of tasks; ``run`` yields each outcome as it completes."""

    width: int = 1  # evaluations in flight at most

    @abc.abstractmethod
    def run(
        self,
        tasks: Sequence[Task],
        *,
        admit: Callable[[], bool] = lambda: True,
        on_change: Callable[[], None] | None = None,
        on_retry: Callable[[Task, str, WorkerInfo], None] | None = None,
    ) -> Iterator[Done]:
        """Run ``tasks`` (dispatched in order; ``admit()`` is asked before each start and a
        False stops dispatching), yielding outcomes in completion order."""

    def in_flight(self) -> tuple[Running, ...]:
        """What each worker is running now."""
        return ()

    def close(self) -> None:  # noqa: B027 - optional hook: the local executor has no workers
        """Stop the workers (idempotent)."""

    def __enter__(self) -> Executor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class LocalExecutor(Executor):
    """The driver's evaluator, in process, one task at a time; exceptions propagate."""

    width = 1

    def __init__(self, evaluate: Callable[[Config, int], Result], device: str = "cpu") -> None:
        self._evaluate = evaluate
        self.info = WorkerInfo(0, socket.gethostname(), os.getpid(), device)
        self._running: tuple[Running, ...] = ()

    def run(self, tasks, *, admit=lambda: True, on_change=None, on_retry=None):
        """Evaluate each task in order (no retries: there is no worker to lose)."""
        for task in tasks:
            if not admit():
                return
            start = time.perf_counter()
            self._running = (
                Running(self.info.label, task.config, task.fidelity, 1, time.monotonic()),
            )
            try:
                result = self._evaluate(task.config, task.fidelity)
            finally:
                self._running = ()
            yield Done(task, result, None, self.info, time.perf_counter() - start)

    def in_flight(self) -> tuple[Running, ...]:
        return self._running
