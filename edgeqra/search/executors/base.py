"""Where candidate evaluations run: in this process, in worker processes, or on Ray.

The search hands an executor a batch of (config, fidelity) tasks and reads the outcomes back
in completion order (:meth:`Executor.run`); the driver alone writes the journal, so a killed
driver resumes from it as a sequential run does. Three executors:

* ``local``: the driver's own evaluator, one task at a time, exceptions propagate (today's
  behaviour, no isolation).
* ``processes``: one worker process per visible GPU (``CUDA_VISIBLE_DEVICES`` set per
  worker), or N CPU processes that share the cores. Hand-written on ``multiprocessing``
  because ``concurrent.futures.ProcessPoolExecutor`` marks the whole pool broken when one
  worker dies (every in-flight future fails) and cannot pin a worker to a GPU. Workers are
  forked from a ``forkserver`` that imported torch and edgeqra once (it never touches CUDA,
  so forking it is safe), so a replaced worker costs a model load, not an interpreter start.
* ``ray``: an actor per worker (``num_gpus=1``, or a share of a GPU when there are more
  workers than GPUs; ``num_cpus`` on CPU), on a local Ray runtime or on the cluster at
  ``ray_address``. Ray is imported only here, when asked for (``pip install 'edgeqra[ray]'``).

Each worker builds the evaluator once from the job (:class:`EvalWorkerJob`: model, data,
tuning settings) and keeps it for every task. The GPTQ bank is built once by the driver and
reached by workers through its cache folder on disk: a worker checks that the bank is
complete there and has the key of its own model and calibration data, and refuses to start
otherwise (it never runs GPTQ). On a multi-node cluster that folder (``EDGEQRA_CACHE``) must
be on a filesystem every node sees.

Faults: a worker that raises or dies mid-evaluation is replaced by a fresh one (a worker whose
evaluation raised may hold half-attached adapters, so it is not reused) and the task is
retried on another worker, up to ``attempts`` times; then it comes back as failed and the
driver journals it as such. A worker that cannot start (bad model path, no bank) stops the
search with its error.

Same answers. ``Evaluator.evaluate`` is a pure function of (job, config, fidelity): seeded
LoRA initialisation, fixed data order. The search asks for a batch only where the sequential
search would not look at any result before asking for the next: one successive-halving rung
(the anchors, the initial population, each generation's children and their promotions) and
the uniform baselines. The driver puts a batch's results back in request order before the
search reads them, and the evaluation budget is counted in request order, so every proposal,
promotion and nevergrad ``tell`` is the sequential run's, and the journal equals it as a set
of (config, fidelity, score). Where the trajectory may legitimately diverge:

* a time limit (``time_limit``): what is started before the deadline depends on speed;
* a candidate that failed on every attempt is dropped from the search (a local run would
  have crashed instead);
* floating point: a worker may run with another thread count or on another GPU model than
  the driver, and if a score moves in its last bits a promotion tie can flip. Workers on
  one machine type with fixed threads give bit-identical scores (the tests check equality).

What stays sequential: stage 3 (Bayesian refinement) proposes one config at a time from a GP
updated with every result, so it has one evaluation in flight on any executor; a batch
proposal (q-EI, constant liar) would change its trajectory and is not done. nevergrad's
optimizer keeps ``num_workers=1`` whatever the executor: a generation's asks all come before
its tells already, and tying ``num_workers`` to the machine would tie the answers to it.
So the speed-up is bounded by the batch widths: with ``eta`` 4 a generation's rungs hold
``children``, ``children/4``, ``children/16`` configs, the slowest candidate of a rung holds
back the next (synchronous halving), and stage 3 runs one at a time.

Fault injection (tests, drills): ``EDGEQRA_FAULT`` in the driver's environment holds JSON
``{"mode": "exit"|"raise", "config": SPEC, "fidelity": N, "attempts": K}``; a worker given
that task on attempt <= K calls ``os._exit(3)`` or raises. ``local`` ignores it.
"""

from __future__ import annotations

import abc
import contextlib
import dataclasses
import json
import logging
import math
import multiprocessing as mp
import os
import socket
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from enum import Enum
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from edgeqra.errors import ConfigError, EdgeQRAError

if TYPE_CHECKING:
    from edgeqra.evaluate import Result
    from edgeqra.pipeline import EvalJob
    from edgeqra.space import Config

__all__ = [
    "Done",
    "EvalWorkerJob",
    "Executor",
    "ExecutorError",
    "ExecutorKind",
    "ExecutorSettings",
    "LocalExecutor",
    "ProcessExecutor",
    "RayExecutor",
    "Running",
    "Task",
    "WorkerInfo",
    "WorkerJob",
    "check_available",
    "make_executor",
    "visible_gpus",
]

log = logging.getLogger(__name__)

FAULT_ENV = "EDGEQRA_FAULT"
_RAY_HINT = "pip install 'edgeqra[ray]'"


class ExecutorKind(str, Enum):
    """Where evaluations run."""

    LOCAL = "local"
    PROCESSES = "processes"
    RAY = "ray"


@dataclass(frozen=True)
class ExecutorSettings:
    """Which executor, how many workers, where the Ray cluster is, how often to retry."""

    kind: ExecutorKind = ExecutorKind.LOCAL
    workers: int | None = None  # None: one per visible GPU, else 2 CPU workers (local: 1)
    ray_address: str | None = None  # None: start a local Ray runtime
    attempts: int = 3  # tries per evaluation before it is journaled as failed

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


@dataclass(frozen=True)
class EvalWorkerJob:
    """The pipeline's evaluation job as a worker rebuilds it: model, data, tuning, bank path."""

    eval: EvalJob
    budget_gb: float | None
    bank: str | None  # the driver's bank folder (a cache hit is required), None without a bank
    cache: str  # the driver's EDGEQRA_CACHE (models and banks), shared with the workers

    def build(self, slot: int) -> tuple[Callable[[Config, int], Result], str]:
        """Prepare the evaluator against the driver's bank (never rebuilt)."""
        os.environ["EDGEQRA_CACHE"] = self.cache
        from edgeqra.pipeline import prepare

        prepared = prepare(
            self.eval,
            budget_gb=self.budget_gb,
            progress=False,
            cached_bank=None if self.bank is None else Path(self.bank),
        )
        device = prepared.device
        if device.startswith("cuda"):
            device = f"cuda:{os.environ.get('CUDA_VISIBLE_DEVICES', device.partition(':')[2] or 0)}"
        return prepared.evaluator.evaluate, device


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


class _PoolExecutor(Executor):
    """The scheduling shared by worker pools: dispatch in order, retry elsewhere, restart.

    Subclasses start workers (``_start``), send a task (``_send``), wait for the next
    message (``_wait``: ("ready", WorkerInfo), ("done", Result), ("error", text), ("died",
    text) or ("fatal", text)) and stop workers (``_stop``).
    """

    def __init__(self, width: int, attempts: int) -> None:
        self.width = width
        self.attempts = attempts
        self._info: dict[int, WorkerInfo] = {}
        self._busy: dict[int, tuple[Task, float, float]] = {}  # slot -> task, perf, monotonic
        self._stale: set[int] = set()  # slots whose worker was stopped mid-task
        self._closed = False

    @abc.abstractmethod
    def _start(self, slot: int) -> None: ...

    @abc.abstractmethod
    def _send(self, slot: int, task: Task) -> None: ...

    @abc.abstractmethod
    def _wait(self) -> tuple[int, str, Any]: ...

    @abc.abstractmethod
    def _stop(self, slot: int) -> None: ...

    def _worker(self, slot: int) -> WorkerInfo:
        return self._info.get(slot) or WorkerInfo(slot, "?", -1, "?")

    def _restart(self, slot: int) -> None:
        """Replace the worker in ``slot`` by a fresh one (its evaluator is built again)."""
        self._stop(slot)
        self._info.pop(slot, None)
        self._start(slot)

    def in_flight(self) -> tuple[Running, ...]:
        return tuple(
            Running(
                self._info[slot].label if slot in self._info else f"w{slot}",
                task.config,
                task.fidelity,
                task.attempt,
                since,
            )
            for slot, (task, _, since) in sorted(self._busy.items())
        )

    @staticmethod
    def _pick(queue: list[Task], slot: int, failed_on: dict[int, set[int]], width: int):
        """The first queued task this slot may take: one that has not failed on it, unless it
        failed on every slot already (then anywhere)."""
        for task in queue:
            tried = failed_on.get(task.index, set())
            if slot not in tried or len(tried) >= width:
                return task
        return None

    def run(self, tasks, *, admit=lambda: True, on_change=None, on_retry=None):
        """Dispatch to idle workers, collect in completion order, retry failures elsewhere."""
        queue = list(tasks)
        failed_on: dict[int, set[int]] = {}
        notify = on_change or (lambda: None)
        for slot in sorted(self._stale):
            self._start(slot)
        self._stale.clear()
        try:
            while queue or self._busy:
                stop = False
                for slot in range(self.width):
                    if slot in self._busy or not queue:
                        continue
                    task = self._pick(queue, slot, failed_on, self.width)
                    if task is None:
                        continue
                    if not admit():
                        queue.clear()
                        stop = True
                        break
                    queue.remove(task)
                    self._busy[slot] = (task, time.perf_counter(), time.monotonic())
                    self._send(slot, task)
                    notify()
                if not self._busy:
                    if stop or not queue:
                        break
                    raise RuntimeError("internal error: tasks queued but none dispatchable")
                slot, kind, payload = self._wait()
                if kind == "ready":
                    self._info[slot] = payload
                    notify()
                    continue
                if kind == "fatal":  # starting it again would fail the same way
                    self._busy.clear()
                    raise ExecutorError(f"worker {slot} could not start: {payload}")
                if slot not in self._busy:  # an idle worker died: replace it quietly
                    log.warning("idle worker %d went away (%s); restarting it", slot, payload)
                    self._restart(slot)
                    continue
                task, start, _ = self._busy.pop(slot)
                worker = self._worker(slot)
                wall = time.perf_counter() - start
                if kind == "done":
                    notify()
                    yield Done(task, payload, None, worker, wall)
                    continue
                log.info(  # the driver's SearchEvent reports it to the user
                    "worker %s: %s@%d attempt %d/%d failed: %s",
                    worker.label,
                    task.config.short(),
                    task.fidelity,
                    task.attempt,
                    self.attempts,
                    payload,
                )
                self._restart(slot)  # a worker that raised may hold half-attached adapters
                failed_on.setdefault(task.index, set()).add(slot)
                if task.attempt < self.attempts:
                    queue.insert(0, dataclasses.replace(task, attempt=task.attempt + 1))
                    if on_retry is not None:
                        on_retry(task, str(payload), worker)
                    notify()
                else:
                    notify()
                    yield Done(task, None, str(payload), worker, wall)
        finally:
            # Left early (the consumer raised or stopped): a worker still busy would answer a
            # later batch with a stale result, so it is stopped now and replaced on next use.
            for slot in list(self._busy):
                self._busy.pop(slot)
                self._stop(slot)
                self._info.pop(slot, None)
                self._stale.add(slot)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for slot in range(self.width):
            with contextlib.suppress(Exception):
                self._stop(slot)


# ----------------------------------------------------------------------------- processes


@dataclass(frozen=True)
class _Fault:
    """An injected failure for tests (see the module docstring)."""

    mode: str
    config: str | None
    fidelity: int | None
    attempts: int

    @classmethod
    def from_env(cls, text: str | None) -> _Fault | None:
        if not text:
            return None
        try:
            data = json.loads(text)
            fault = cls(
                str(data["mode"]),
                data.get("config"),
                data.get("fidelity"),
                int(data.get("attempts", 1)),
            )
        except (ValueError, KeyError, TypeError) as exc:
            raise ConfigError(f"`{FAULT_ENV}` is not valid fault JSON ({exc}): {text!r}") from None
        if fault.mode not in ("exit", "raise"):
            raise ConfigError(f"`{FAULT_ENV}` mode {fault.mode!r} must be `exit` or `raise`")
        return fault

    def fire(self, task: Task) -> None:
        """Fail ``task`` if it is the targeted one on an early enough attempt."""
        if self.config is not None and str(task.config) != self.config:
            return
        if self.fidelity is not None and task.fidelity != self.fidelity:
            return
        if task.attempt > self.attempts:
            return
        if self.mode == "exit":
            os._exit(3)  # a hard death: no exception, no cleanup, as an OOM kill
        raise RuntimeError(f"injected fault on attempt {task.attempt}")


class _WorkerCore:
    """What runs inside a worker: the evaluator built once, then one task per call."""

    def __init__(self, job: WorkerJob, slot: int, threads: int | None, fault: str | None) -> None:
        if threads:
            import torch

            torch.set_num_threads(threads)
        self.evaluate, device = job.build(slot)
        self.fault = _Fault.from_env(fault)
        self.info = WorkerInfo(slot, socket.gethostname(), os.getpid(), device)

    def describe(self) -> WorkerInfo:
        return self.info

    def run(self, task: Task) -> tuple[str, Any]:
        """("done", Result) or ("error", text); exceptions never escape."""
        try:
            if self.fault is not None:
                self.fault.fire(task)
            return "done", self.evaluate(task.config, task.fidelity)
        except Exception as exc:  # noqa: BLE001 - reported to the driver, which retries
            return "error", f"{type(exc).__name__}: {exc}"


def _describe(exc: BaseException) -> str:
    """One line for a user error, the traceback's tail for anything else."""
    if isinstance(exc, EdgeQRAError):
        return str(exc)
    tail = "".join(traceback.format_exception(exc)).strip().splitlines()[-6:]
    return f"{type(exc).__name__}: {exc} | " + " | ".join(line.strip() for line in tail)


def _process_main(
    conn: Connection,
    job: WorkerJob,
    slot: int,
    threads: int | None,
    fault: str | None,
    gpu: str | None,
) -> None:
    """A worker process: build once, then answer tasks until the driver goes away."""
    if gpu is not None:  # before anything initialises CUDA (torch does it lazily)
        os.environ["CUDA_VISIBLE_DEVICES"] = gpu
    try:
        core = _WorkerCore(job, slot, threads, fault)
    except BaseException as exc:  # noqa: BLE001 - the driver shows it and stops
        with contextlib.suppress(OSError):
            conn.send(("fatal", _describe(exc)))
        return
    conn.send(("ready", core.info))
    while True:
        try:
            task = conn.recv()
        except (EOFError, OSError):  # the driver is gone (killed): nothing to answer
            return
        if task is None:
            return
        kind, payload = core.run(task)
        try:
            conn.send((kind, payload))
        except (BrokenPipeError, OSError):
            return
        if kind == "error":  # not reused: the driver starts a fresh worker
            return


def visible_gpus() -> list[str]:
    """The GPU ids this process may use (``CUDA_VISIBLE_DEVICES`` order), empty without CUDA."""
    import torch

    if not torch.cuda.is_available():
        return []
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env:
        return [g.strip() for g in env.split(",") if g.strip()]
    return [str(i) for i in range(torch.cuda.device_count())]


class ProcessExecutor(_PoolExecutor):
    """One spawned process per worker; worker ``i`` gets GPU ``gpus[i % len(gpus)]``."""

    def __init__(
        self,
        job: WorkerJob,
        workers: int,
        *,
        gpus: Sequence[str] = (),
        attempts: int = 3,
        threads: int | None = None,
    ) -> None:
        super().__init__(workers, attempts)
        self._job = job
        self._gpus = list(gpus)
        # CPU workers share the cores: without a cap each would start one thread per core.
        self._threads = threads or (
            None if self._gpus else max(1, (os.cpu_count() or 1) // workers)
        )
        self._fault = os.environ.get(FAULT_ENV)
        if "forkserver" in mp.get_all_start_methods():  # CUDA cannot be forked from the driver
            self._ctx = mp.get_context("forkserver")
            self._ctx.set_forkserver_preload(["edgeqra.pipeline"])
        else:
            self._ctx = mp.get_context("spawn")
        self._procs: dict[int, Any] = {}
        self._conns: dict[int, Connection] = {}
        for slot in range(workers):
            self._start(slot)

    def _start(self, slot: int) -> None:
        parent, child = self._ctx.Pipe()
        gpu = self._gpus[slot % len(self._gpus)] if self._gpus else None
        proc = self._ctx.Process(
            target=_process_main,
            args=(child, self._job, slot, self._threads, self._fault, gpu),
            name=f"edgeqra-worker-{slot}",
            daemon=True,
        )
        proc.start()
        child.close()
        self._procs[slot], self._conns[slot] = proc, parent

    def _send(self, slot: int, task: Task) -> None:
        try:
            self._conns[slot].send(task)
        except (BrokenPipeError, OSError):
            pass  # it died meanwhile: _wait reports it

    def _wait(self) -> tuple[int, str, Any]:
        by_object: dict[Any, tuple[int, str]] = {}
        for slot, conn in self._conns.items():
            by_object[conn] = (slot, "conn")
            by_object[self._procs[slot].sentinel] = (slot, "sentinel")
        while True:
            ready = wait(list(by_object))
            # Messages first: a worker may have answered and then exited (after an error).
            for obj in sorted(ready, key=lambda o: by_object[o][1] != "conn"):
                slot, what = by_object[obj]
                conn, proc = self._conns[slot], self._procs[slot]
                if what == "conn" or conn.poll():
                    try:
                        return (slot, *conn.recv())
                    except (EOFError, OSError):
                        pass
                proc.join(timeout=5)
                why = f"worker process {proc.pid} died (exit code {proc.exitcode})"
                if slot not in self._info:  # never got as far as building its evaluator
                    return slot, "fatal", f"{why} while starting; see its output above"
                return slot, "died", why

    def _stop(self, slot: int) -> None:
        proc, conn = self._procs.pop(slot, None), self._conns.pop(slot, None)
        if conn is not None:
            with contextlib.suppress(OSError, BrokenPipeError):
                conn.send(None)
            conn.close()
        if proc is not None:
            proc.join(timeout=2)
            if proc.is_alive():
                proc.kill()
                proc.join(timeout=5)


# ----------------------------------------------------------------------------- ray


def _import_ray():
    """Ray, or a clear error saying how to install it."""
    try:
        import ray
    except ImportError:
        raise ExecutorError(
            f"`--executor ray` needs Ray, which is not installed; {_RAY_HINT}"
        ) from None
    return ray


class RayExecutor(_PoolExecutor):
    """One Ray actor per worker; a dead actor is replaced, its task retried elsewhere."""

    def __init__(
        self,
        job: WorkerJob,
        workers: int | None,
        *,
        address: str | None = None,
        gpu: bool = False,
        attempts: int = 3,
        threads: int | None = None,
    ) -> None:
        ray = self._ray = _import_ray()
        self._started_ray = False
        if not ray.is_initialized():
            try:
                ray.init(address=address, include_dashboard=False, log_to_driver=False)
            except ConnectionError as exc:
                raise ExecutorError(
                    f"cannot join the Ray cluster at `ray_address` {address!r} ({exc}); "
                    "start it with `ray start --head` or leave `--ray-address` out for a "
                    "local Ray runtime"
                ) from None
            self._started_ray = True
        resources = ray.cluster_resources()
        n_gpus = int(resources.get("GPU", 0)) if gpu else 0
        if gpu and n_gpus == 0:
            raise ExecutorError(
                "the job runs on CUDA but the Ray cluster has no GPU; set `device` cpu or "
                "join a cluster with GPUs"
            )
        if workers is None:
            workers = n_gpus or 2
        super().__init__(workers, attempts)
        if n_gpus:  # one GPU per worker, or 1/k of one when k workers must share each GPU
            options = {"num_gpus": 1.0 / math.ceil(workers / n_gpus), "num_cpus": 1}
            self._threads = None
        else:
            cpus = max(1, int(resources.get("CPU", 1)) // workers)
            options = {"num_cpus": cpus}
            self._threads = threads or cpus
        self._actor_class = ray.remote(max_restarts=0, **options)(_WorkerCore)
        self._job_ref = ray.put(job)
        self._fault = os.environ.get(FAULT_ENV)
        self._actors: dict[int, Any] = {}
        self._pending: dict[Any, tuple[int, str]] = {}  # object ref -> (slot, "ready"|"run")
        for slot in range(workers):
            self._start(slot)

    def _start(self, slot: int) -> None:
        actor = self._actor_class.remote(self._job_ref, slot, self._threads, self._fault)
        self._actors[slot] = actor
        self._pending[actor.describe.remote()] = (slot, "ready")

    def _send(self, slot: int, task: Task) -> None:
        self._pending[self._actors[slot].run.remote(task)] = (slot, "run")

    def _wait(self) -> tuple[int, str, Any]:
        ray = self._ray
        while True:
            ready, _ = ray.wait(list(self._pending), num_returns=1)
            ref = ready[0]
            slot, what = self._pending.pop(ref)
            try:
                value = ray.get(ref)
            except ray.exceptions.RayActorError as exc:
                if what == "ready" or slot not in self._info:
                    cause = getattr(exc, "cause", None) or exc
                    return slot, "fatal", _describe(cause) if cause is not exc else str(exc)
                return slot, "died", f"Ray actor of worker {slot} died ({type(exc).__name__})"
            except ray.exceptions.RayError as exc:
                return slot, "error", str(exc).splitlines()[0]
            if what == "ready":
                return slot, "ready", value
            return (slot, *value)

    def _stop(self, slot: int) -> None:
        actor = self._actors.pop(slot, None)
        self._pending = {r: v for r, v in self._pending.items() if v[0] != slot}
        if actor is not None:
            with contextlib.suppress(Exception):
                self._ray.kill(actor, no_restart=True)

    def close(self) -> None:
        if self._closed:
            return
        super().close()
        if self._started_ray:
            self._ray.shutdown()


# ----------------------------------------------------------------------------- factory


def check_available(settings: ExecutorSettings) -> None:
    """Fail fast, before minutes of model loading, when the executor cannot run here."""
    if settings.kind is ExecutorKind.RAY:
        _import_ray()


def make_executor(
    settings: ExecutorSettings,
    *,
    local: Callable[[Config, int], Result],
    job: Callable[[], WorkerJob] | WorkerJob,
    device: str = "cpu",
    threads: int | None = None,
) -> Executor:
    """The executor ``settings`` asks for.

    Args:
        settings: kind, workers, Ray address, attempts.
        local: the driver's own evaluate (the local executor).
        job: what workers build their evaluator from (or a thunk making it: only pool
            executors need it).
        device: the driver's resolved device (``cpu``/``cuda``): decides GPU workers.
        threads: torch threads per CPU worker (default: the cores shared out evenly).
    """
    if settings.kind is ExecutorKind.LOCAL:
        return LocalExecutor(local, device)
    worker_job = job() if callable(job) and not hasattr(job, "build") else job
    gpu = device.startswith("cuda")
    if settings.kind is ExecutorKind.PROCESSES:
        gpus = visible_gpus() if gpu else []
        workers = settings.workers or (len(gpus) if gpus else 2)
        return ProcessExecutor(
            worker_job, workers, gpus=gpus, attempts=settings.attempts, threads=threads
        )
    return RayExecutor(
        worker_job,
        settings.workers,
        address=settings.ray_address,
        gpu=gpu,
        attempts=settings.attempts,
        threads=threads,
    )
