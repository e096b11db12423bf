"""Worker pools: the scheduling they share (dispatch in order, retry elsewhere, restart) and
what runs inside a worker (:class:`WorkerCore`)."""

from __future__ import annotations

import abc
import contextlib
import dataclasses
import logging
import os
import socket
import time
import traceback
from typing import Any

from edgeqra.errors import EdgeQRAError
from edgeqra.search.executors.base import (
    Done,
    Executor,
    ExecutorError,
    Running,
    Task,
    WorkerInfo,
    WorkerJob,
)

__all__ = ["PoolExecutor", "WorkerCore", "describe_error"]

log = logging.getLogger(__name__)


class PoolExecutor(Executor):
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


class WorkerCore:
    """What runs inside a worker: the evaluator built once, then one task per call."""

    def __init__(self, job: WorkerJob, slot: int, threads: int | None) -> None:
        if threads:
            import torch

            torch.set_num_threads(threads)
        self.evaluate, device = job.build(slot)
        self.info = WorkerInfo(slot, socket.gethostname(), os.getpid(), device)

    def describe(self) -> WorkerInfo:
        return self.info

    def run(self, task: Task) -> tuple[str, Any]:
        """("done", Result) or ("error", text); exceptions never escape."""
        try:
            return "done", self.evaluate(task.config, task.fidelity)
        except Exception as exc:  # noqa: BLE001 - reported to the driver, which retries
            return "error", f"{type(exc).__name__}: {exc}"


def describe_error(exc: BaseException) -> str:
    """One line for a user error, the traceback's tail for anything else."""
    if isinstance(exc, EdgeQRAError):
        return str(exc)
    tail = "".join(traceback.format_exception(exc)).strip().splitlines()[-6:]
    return f"{type(exc).__name__}: {exc} | " + " | ".join(line.strip() for line in tail)
