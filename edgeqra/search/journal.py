"""The append-only journal of evaluations: one JSON line per (config, fidelity), fsynced.

A search writes every result here before it starts the next evaluation, so a killed run loses
at most the evaluation in flight; ``--resume`` reads the journal back and answers every
recorded (config, fidelity) from it instead of tuning again. A half-written last line (the
process died mid-write) is ignored and overwritten.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from pathlib import Path

from edgeqra.errors import ConfigError
from edgeqra.evaluate import Result

__all__ = ["Entry", "Journal"]

log = logging.getLogger(__name__)
_RESULT_FIELDS = {f.name for f in dataclasses.fields(Result)}


@dataclasses.dataclass(frozen=True)
class Entry:
    """One journal line: the evaluation's result, the stage that asked for it, when it ended."""

    result: Result
    stage: str
    finished: float  # unix time

    def to_json(self) -> dict[str, object]:
        """Flat JSON: the result's fields plus ``stage`` and ``finished``."""
        return {**self.result.to_json(), "stage": self.stage, "finished": self.finished}

    @classmethod
    def from_json(cls, data: dict[str, object]) -> Entry:
        """Inverse of :meth:`to_json`; unknown keys (newer versions) are ignored."""
        result = Result(**{k: v for k, v in data.items() if k in _RESULT_FIELDS})
        return cls(result, str(data.get("stage", "")), float(data.get("finished", 0.0)))


class Journal:
    """Append-only JSONL of :class:`Entry`, indexed by (config string, fidelity)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.entries: list[Entry] = []
        self._index: dict[tuple[str, int], Entry] = {}
        if self.path.exists():
            self._load()

    def _load(self) -> None:
        """Read existing lines; drop a truncated tail so the next append starts a clean line."""
        raw = self.path.read_bytes()
        good = 0
        for line_end, line in _lines(raw):
            try:
                entry = Entry.from_json(json.loads(line))
            except (json.JSONDecodeError, TypeError) as exc:
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

    def _remember(self, entry: Entry) -> None:
        self.entries.append(entry)
        self._index[(entry.result.config, entry.result.fidelity)] = entry

    def __len__(self) -> int:
        return len(self.entries)

    def get(self, config: str, fidelity: int) -> Result | None:
        """The recorded result of ``config`` (its string form) at ``fidelity``, if any."""
        entry = self._index.get((str(config), int(fidelity)))
        return None if entry is None else entry.result

    def append(self, result: Result, *, stage: str) -> Entry:
        """Record one evaluation durably (flush + fsync) before the caller goes on."""
        entry = Entry(result, stage, time.time())
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(entry.to_json(), sort_keys=True) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        self._remember(entry)
        return entry

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
