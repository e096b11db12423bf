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
  forked from a ``forkserver`` that imported the job's module (the pipeline: torch and
  edgeqra) once (it never touches CUDA, so forking it is safe), so a replaced worker costs a
  model load, not an interpreter start.
* ``ray``: an actor per worker (``num_gpus=1``, or a share of a GPU when there are more
  workers than GPUs; ``num_cpus`` on CPU), on a local Ray runtime or on the cluster at
  ``ray_address``. Ray is imported only here, when asked for (``pip install 'edgeqra[ray]'``).

Each worker builds its evaluate function once from a picklable job and keeps it for every
task. The executors know only the :class:`WorkerJob` protocol; the pipeline's job
(``edgeqra.pipeline.EvalWorkerJob``: model, data, tuning settings) lives beside the pipeline.
The GPTQ bank is built once by the driver and reached by workers through its cache folder on
disk: a worker checks that the bank is complete there and has the key of its own model and
calibration data, and refuses to start otherwise (it never runs GPTQ). On a multi-node
cluster that folder (``EDGEQRA_CACHE``) must be on a filesystem every node sees.

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

Fault injection lives with the tests, not here: ``tests/test_executors.py`` wraps a job in
a ``FaultyJob`` whose evaluate function raises or calls ``os._exit`` for one (config,
fidelity) on its first attempts, and hands that job to the executor like any other.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from edgeqra.search.executors.base import (
    Done,
    Executor,
    ExecutorError,
    ExecutorKind,
    ExecutorSettings,
    LocalExecutor,
    Running,
    Task,
    WorkerInfo,
    WorkerJob,
)
from edgeqra.search.executors.processes import ProcessExecutor, visible_gpus
from edgeqra.search.executors.ray import RayExecutor, import_ray

if TYPE_CHECKING:
    from edgeqra.result import Result
    from edgeqra.space import Config

__all__ = [
    "Done",
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

# ----------------------------------------------------------------------------- factory


def check_available(settings: ExecutorSettings) -> None:
    """Fail fast, before minutes of model loading, when the executor cannot run here."""
    if settings.kind is ExecutorKind.RAY:
        import_ray()


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
