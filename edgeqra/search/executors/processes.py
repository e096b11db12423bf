"""The ``processes`` executor: one worker process per GPU (or N CPU processes), forked from a
forkserver that imported the worker job's module once."""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
from collections.abc import Sequence
from multiprocessing.connection import Connection, wait
from typing import Any

from edgeqra.search.executors.base import Task, WorkerJob
from edgeqra.search.executors.pool import PoolExecutor, WorkerCore, describe_error

__all__ = ["ProcessExecutor", "visible_gpus"]


def _process_main(
    conn: Connection,
    job: WorkerJob,
    slot: int,
    threads: int | None,
    gpu: str | None,
) -> None:
    """A worker process: build once, then answer tasks until the driver goes away."""
    if gpu is not None:  # before anything initialises CUDA (torch does it lazily)
        os.environ["CUDA_VISIBLE_DEVICES"] = gpu
    try:
        core = WorkerCore(job, slot, threads)
    except BaseException as exc:  # noqa: BLE001 - the driver shows it and stops
        with contextlib.suppress(OSError):
            conn.send(("fatal", describe_error(exc)))
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


class ProcessExecutor(PoolExecutor):
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
        if "forkserver" in mp.get_all_start_methods():  # CUDA cannot be forked from the driver
            self._ctx = mp.get_context("forkserver")
            # The job's own module (the pipeline, with torch) is imported once there, so a
            # replaced worker costs a model load, not an interpreter start.
            self._ctx.set_forkserver_preload([type(job).__module__])
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
            args=(child, self._job, slot, self._threads, gpu),
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
