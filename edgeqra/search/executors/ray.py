"""The ``ray`` executor: one Ray actor per worker; Ray is imported only when asked for."""

from __future__ import annotations

import contextlib
import math
from typing import Any

from edgeqra.search.executors.base import ExecutorError, Task, WorkerJob
from edgeqra.search.executors.pool import PoolExecutor, WorkerCore, describe_error

__all__ = ["RayExecutor", "import_ray"]

_RAY_HINT = "pip install 'edgeqra[ray]'"


def import_ray():
    """Ray, or a clear error saying how to install it."""
    try:
        import ray
    except ImportError:
        raise ExecutorError(
            f"`--executor ray` needs Ray, which is not installed; {_RAY_HINT}"
        ) from None
    return ray


class RayExecutor(PoolExecutor):
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
        ray = self._ray = import_ray()
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
        self._actor_class = ray.remote(max_restarts=0, **options)(WorkerCore)
        self._job_ref = ray.put(job)
        self._actors: dict[int, Any] = {}
        self._pending: dict[Any, tuple[int, str]] = {}  # object ref -> (slot, "ready"|"run")
        for slot in range(workers):
            self._start(slot)

    def _start(self, slot: int) -> None:
        actor = self._actor_class.remote(self._job_ref, slot, self._threads)
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
                    return slot, "fatal", describe_error(cause) if cause is not exc else str(exc)
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
