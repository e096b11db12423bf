"""The append-only journal of evaluations: one JSON line per (config, fidelity), fsynced.

A search writes every result here as it arrives (only the driver writes, whatever executor ran
the evaluation), so a killed run loses at most the evaluations in flight; ``--resume`` reads
the journal back and answers every recorded (config, fidelity) from it instead of tuning
again. A half-written last line (the process died mid-write) is ignored and overwritten.

Lines carry the worker that ran the evaluation (``worker``: host, pid, device) and its wall
time seen by the driver (``wall``, queueing and transfer included; ``seconds`` is the
evaluation's own time). An evaluation that failed on every attempt is a line with
``"status": "failed"`` and the ``error``: it is kept apart from the results (:meth:`Journal.get`
never returns it), so a resumed search knows it failed and does not run it again. A reader
from before failures existed refuses such a line as corrupt rather than misreading it.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from pathlib import Path

from edgeqra.errors import ConfigError
from edgeqra.result import Result

__all__ = ["Entry", "Failure", "Journal"]

log = logging.getLogger(__name__)
_RESULT_FIELDS = {f.name for f in dataclasses.fields(Result)}


@dataclasses.dataclass(frozen=True)
class Entry:
    """One journal line: the evaluation's result, the stage that asked for it, when it ended."""

    result: Result
    stage: str
    finished: float  # unix time
    worker: dict[str, object] | None = None  # host, pid, device of the worker that ran it
    wall: float | None = None  # seconds from dispatch to result, seen by the driver

    def to_json(self) -> dict[str, object]:
        """Flat JSON: the result's fields plus ``stage``, ``finished``, ``worker``, ``wall``."""
        out = {**self.result.to_json(), "stage": self.stage, "finished": self.finished}
        if self.worker is not None:
            out["worker"] = self.worker
        if self.wall is not None:
            out["wall"] = self.wall
        return out

    @classmethod
    def from_json(cls, data: dict[str, object]) -> Entry:
        """Inverse of :meth:`to_json`; unknown keys (newer versions) are ignored."""
        result = Result(**{k: v for k, v in data.items() if k in _RESULT_FIELDS})
        wall = data.get("wall")
        return cls(
            result,
            str(data.get("stage", "")),
            float(data.get("finished", 0.0)),
            data.get("worker"),  # type: ignore[arg-type]
            None if wall is None else float(wall),  # type: ignore[arg-type]
        )


@dataclasses.dataclass(frozen=True)
class Failure:
    """One journal line for an evaluation that failed on every attempt (no result)."""

    config: str
    fidelity: int
    error: str  # the last attempt's error
    attempts: int
    stage: str
    finished: float  # unix time
    worker: dict[str, object] | None = None  # the worker of the last attempt
    wall: float | None = None

    def to_json(self) -> dict[str, object]:
        """Flat JSON marked ``"status": "failed"`` (no score: nothing can read it as a result)."""
        return {"status": "failed", **dataclasses.asdict(self)}

    @classmethod
    def from_json(cls, data: dict[str, object]) -> Failure:
        """Inverse of :meth:`to_json`."""
        fields = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in fields})  # type: ignore[arg-type]


class Journal:
    """Append-only JSONL of :class:`Entry`, indexed by (config string, fidelity)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.entries: list[Entry] = []
        self.failures: list[Failure] = []
        self._index: dict[tuple[str, int], Entry] = {}
        self._failed: dict[tuple[str, int], Failure] = {}
        if self.path.exists():
            self._load()

    def _load(self) -> None:
        """Read existing lines; drop a truncated tail so the next append starts a clean line."""
        raw = self.path.read_bytes()
        good = 0
        for line_end, line in _lines(raw):
            try:
                data = json.loads(line)
                failed = data.get("status") == "failed"
                entry = Failure.from_json(data) if failed else Entry.from_json(data)
            except (json.JSONDecodeError, TypeError, AttributeError) as exc:
                if line_end == len(raw) or not raw[line_end:].strip():
                    log.warning("journal %s: dropping a half-written last line", self.path)
                    break
                raise ConfigError(
                    f"journal `{self.path}` has a corrupt line ({exc}); restore it or start a "
                    "new run directory"
                ) from exc
            self._remember(entry)
            good = line_end
        if good != len(raw):
            with self.path.open("r+b") as fh:
                fh.truncate(good)
        elif raw and not raw.endswith(b"\n"):  # a complete last line that lost its newline
            with self.path.open("ab") as fh:
                fh.write(b"\n")

    def _remember(self, entry: Entry | Failure) -> None:
        if isinstance(entry, Failure):
            self.failures.append(entry)
            self._failed[(entry.config, entry.fidelity)] = entry
            return
        self.entries.append(entry)
        self._index[(entry.result.config, entry.result.fidelity)] = entry

    def __len__(self) -> int:
        """Number of results (failures not counted)."""
        return len(self.entries)

    def search_steps(self) -> int:
        """Tuning steps of every search evaluation recorded (the reference baselines aside):
        a search's whole cost, also when it was resumed across processes."""
        return sum(e.result.fidelity for e in self.entries if e.stage != "baseline")

    def get(self, config: str, fidelity: int) -> Result | None:
        """The recorded result of ``config`` (its string form) at ``fidelity``, if any."""
        entry = self._index.get((str(config), int(fidelity)))
        return None if entry is None else entry.result

    def failure(self, config: str, fidelity: int) -> Failure | None:
        """The recorded failure of ``config`` at ``fidelity``, if it failed and has no result."""
        if self.get(config, fidelity) is not None:
            return None
        return self._failed.get((str(config), int(fidelity)))

    def append(
        self,
        result: Result,
        *,
        stage: str,
        worker: dict[str, object] | None = None,
        wall: float | None = None,
    ) -> Entry:
        """Record one evaluation durably (flush + fsync) before the caller goes on."""
        entry = Entry(result, stage, time.time(), worker, wall)
        self._write(entry.to_json())
        self._remember(entry)
        return entry

    def append_failure(
        self,
        config: str,
        fidelity: int,
        error: str,
        *,
        attempts: int,
        stage: str,
        worker: dict[str, object] | None = None,
        wall: float | None = None,
    ) -> Failure:
        """Record an evaluation that failed on every attempt, durably."""
        failure = Failure(
            str(config), int(fidelity), error, attempts, stage, time.time(), worker, wall
        )
        self._write(failure.to_json())
        self._remember(failure)
        return failure

    def _write(self, data: dict[str, object]) -> None:
        """Append one JSON line, flushed and fsynced."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(data, sort_keys=True) + "\n")
            fh.flush()
            os.fsync(fh.fileno())

    def results(self, fidelity: int | None = None) -> list[Result]:
        """All results in journal order, optionally only those at one fidelity."""
        return [e.result for e in self.entries if fidelity is None or e.result.fidelity == fidelity]


def _lines(raw: bytes):
    """(end offset including the newline, line) for each non-empty line of ``raw``."""
    start = 0
    while start < len(raw):
        end = raw.find(b"\n", start)
        end = len(raw) if end < 0 else end + 1
        line = raw[start:end].strip()
        if line:
            yield end, line
        start = end
