"""A run directory: the files a search writes and the exporters, the report and the TUI read.

``edgeqra search --out RUN`` / ``edgeqra run`` leave::

    RUN/job.json          the SearchJob (settings; resume checks them)
    RUN/journal.jsonl     one Result per evaluation (resume replays it)
    RUN/sensitivity.json  the stage-1 profile (when run)
    RUN/front.json        the measured Pareto front
    RUN/chosen.json       the chosen config and its predicted memory (schemas/chosen.schema.json)
    RUN/adapter/          the final tuning's PEFT adapter (absent when every rank is 0)
    RUN/summary.json      everything above in one record (schemas/summary.schema.json)

This module is the one place that knows those names and formats. :class:`RunFiles` is a run
directory finished or not (a search in progress, a killed one): each entry's path, its atomic
writer (temp file, then rename: a killed run never leaves half a file) and a reader;
:mod:`edgeqra.pipeline` writes through it. :class:`RunDir` is the checked reading of a
finished run (the exporters'), whose one error names everything that is missing. summary.json
and chosen.json are checked against their JSON Schemas both when written and when read.

The job types are imported only where a job is built (:meth:`RunFiles.read_job`,
:meth:`RunDir.open`): they pull in torch through their tuning settings, and the report and the
TUI read a run without it.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, fields
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgeqra.errors import EdgeQRAError
from edgeqra.json_schema import problems
from edgeqra.result import Result
from edgeqra.search.journal import Entry, Failure, Journal
from edgeqra.space import Config

if TYPE_CHECKING:
    from edgeqra.jobs import SearchJob

__all__ = [
    "ADAPTER",
    "CHOSEN",
    "FRONT",
    "JOB",
    "JOURNAL",
    "SENSITIVITY",
    "SUMMARY",
    "SUMMARY_VERSION",
    "RunDir",
    "RunDirError",
    "RunFiles",
    "chosen_schema",
    "read_json",
    "summary_schema",
    "write_json",
]

JOB = "job.json"
JOURNAL = "journal.jsonl"
SENSITIVITY = "sensitivity.json"
FRONT = "front.json"
CHOSEN = "chosen.json"
ADAPTER = "adapter"
SUMMARY = "summary.json"
SUMMARY_VERSION = 1  # summary.schema.json's `schema_version` (bump both on a change)
_STAGING = ".adapter.tmp"  # the final tuning saves here; moved to ADAPTER when complete


class RunDirError(EdgeQRAError):
    """A run directory is missing, incomplete or holds a file that does not parse."""


def write_json(path: Path, data: object) -> None:
    """Atomic JSON write: a temp file in the same folder, then rename."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, path)


def read_json(path: Path) -> Any:
    """A JSON file, or a RunDirError naming it."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise RunDirError(f"cannot read `{path}` ({exc}); is the run directory intact?") from None


@cache
def summary_schema() -> dict[str, Any]:
    """``edgeqra/schemas/summary.schema.json`` (shipped as package data)."""
    return json.loads((Path(__file__).parent / "schemas" / "summary.schema.json").read_text())


@cache
def chosen_schema() -> dict[str, Any]:
    """``edgeqra/schemas/chosen.schema.json`` (shipped as package data)."""
    return json.loads((Path(__file__).parent / "schemas" / "chosen.schema.json").read_text())


def _write_checked(path: Path, data: Mapping[str, Any], schema: dict[str, Any], what: str) -> None:
    """Atomic write of a record the pipeline built; one breaking its schema is a bug here,
    not the user's."""
    found = problems(dict(data), schema)
    if found:
        raise ValueError(f"internal error: {what} breaks its schema: {'; '.join(found)}")
    write_json(path, dict(data))


def _schema_error(path: Path, found: list[str], run: Path) -> RunDirError:
    """A file of a run that breaks its schema: the first problem, how many more, the fix."""
    more = f" (and {len(found) - 1} more)" if len(found) > 1 else ""
    return RunDirError(
        f"`{path}`: {found[0]}{more}; rewrite it by finishing the run again with "
        f"`edgeqra search --resume {run}`"
    )


def _upgrade_summary(summary: object) -> object:
    """A summary of any edgeqra version as today's: those written before the schema existed
    lack only ``schema_version``."""
    if isinstance(summary, dict) and "schema_version" not in summary:
        return {"schema_version": SUMMARY_VERSION, **summary}
    return summary


def _result(data: object, where: str) -> Result:
    """A Result from its JSON (unknown keys of newer versions ignored), or a RunDirError."""
    known = {f.name for f in fields(Result)}
    try:
        return Result(**{k: v for k, v in data.items() if k in known})  # type: ignore[union-attr]
    except (AttributeError, TypeError) as exc:
        raise RunDirError(
            f"{where} is not a result ({exc}); is the run directory intact?"
        ) from None


@dataclass(frozen=True)
class RunFiles:
    """A run directory, finished or not: where each entry lies, its writer and its reader."""

    path: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", Path(self.path))

    # ------------------------------------------------------------------ where
    @property
    def job(self) -> Path:
        return self.path / JOB

    @property
    def journal(self) -> Path:
        return self.path / JOURNAL

    @property
    def sensitivity(self) -> Path:
        return self.path / SENSITIVITY

    @property
    def front(self) -> Path:
        return self.path / FRONT

    @property
    def chosen(self) -> Path:
        return self.path / CHOSEN

    @property
    def adapter(self) -> Path:
        return self.path / ADAPTER

    @property
    def summary(self) -> Path:
        return self.path / SUMMARY

    @property
    def finished(self) -> bool:
        """Whether the run got as far as its summary (the last file a search writes)."""
        return self.summary.is_file()

    # ------------------------------------------------------------------ job.json
    @classmethod
    def create(cls, path: Path, job: SearchJob) -> RunFiles:
        """A new run directory holding ``job``; one that already holds a run is refused."""
        files = cls(path)
        files.check_new()
        files.path.mkdir(parents=True, exist_ok=True)
        files.write_job(job)
        return files

    def check_new(self) -> None:
        """Refuse to start a run in a directory that already holds one."""
        if self.job.exists():
            raise RunDirError(
                f"`{self.path}` already holds a run; pass `--resume {self.path}` to continue it "
                "or another `--out`"
            )

    def write_job(self, job: SearchJob) -> None:
        write_json(self.job, job.to_json())

    def read_job_json(self) -> dict[str, Any]:
        """job.json as written (a JSON object), without building the job (no torch)."""
        if not self.job.is_file():
            raise RunDirError(
                f"`{self.path}` is not a run directory (no {JOB}); pass the folder that "
                "`edgeqra search --out` or `edgeqra run` wrote"
            )
        data = read_json(self.job)
        if not isinstance(data, dict):
            raise RunDirError(f"`{self.job}` is not a job (not a JSON object); start a new run")
        return data

    def read_job(self) -> SearchJob:
        """The run's job, also one written by an older edgeqra (its field names upgraded)."""
        from edgeqra.jobs import SearchJob

        return SearchJob.from_json(self.read_job_json())

    # ------------------------------------------------------------------ journal.jsonl
    def open_journal(self) -> Journal:
        """The search's journal, for appending (opening it drops a torn last line)."""
        return Journal(self.journal)

    def read_journal(self) -> tuple[list[Entry], list[Failure]]:
        """The journal's results and failures, read-only (the search's own
        :class:`~edgeqra.search.journal.Journal` repairs a torn last line in place; a reader
        must not): any unreadable line is a RunDirError naming it."""
        fix = (
            "restore the journal from a copy, or rerun the search into a new run directory "
            "(`edgeqra search --resume` drops only a half-written last line)"
        )
        try:
            raw = self.journal.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise RunDirError(
                f"`{self.journal}` is missing: every finished search writes it; pass the run "
                "directory that `edgeqra search` or `edgeqra run` wrote"
            ) from None
        except (OSError, UnicodeDecodeError) as exc:
            raise RunDirError(f"`{self.journal}` is not readable ({exc}); {fix}") from None
        entries: list[Entry] = []
        failures: list[Failure] = []
        for number, line in enumerate(raw.splitlines(), start=1):
            if not line.strip():
                continue
            where = f"`{self.journal}` line {number}"
            try:
                data = json.loads(line)
            except json.JSONDecodeError as exc:
                raise RunDirError(f"{where} is corrupt ({exc}); {fix}") from None
            if not isinstance(data, dict):
                raise RunDirError(f"{where} is corrupt (not a JSON object); {fix}")
            try:
                if data.get("status") == "failed":
                    failures.append(Failure.from_json(data))
                else:
                    entries.append(Entry.from_json(data))
            except (TypeError, ValueError) as exc:
                raise RunDirError(f"{where} is corrupt ({exc}); {fix}") from None
        return entries, failures

    # ------------------------------------------------------------------ stage files
    def write_sensitivity(self, data: Mapping[str, Any]) -> None:
        """Stage 1's profile (:meth:`edgeqra.sensitivity.Sensitivity.to_json`)."""
        write_json(self.sensitivity, dict(data))

    def read_sensitivity(self) -> dict[str, Any] | None:
        """Stage 1's profile, None when the run measured none."""
        return read_json(self.sensitivity) if self.sensitivity.is_file() else None

    def write_front(self, front: Iterable[Result]) -> None:
        write_json(self.front, [r.to_json() for r in front])

    def read_front(self) -> list[Result]:
        data = read_json(self.front)
        if not isinstance(data, list):
            raise RunDirError(f"`{self.front}` is not a list of results; is the run intact?")
        return [_result(r, f"`{self.front}` item {i}") for i, r in enumerate(data)]

    def write_chosen(self, chosen: Mapping[str, Any]) -> None:
        """The chosen config (``config``, ``spec``, ``short``, ``average_bits``,
        ``predicted_memory``, ``budget_bytes``, ``search_score``), checked against its schema."""
        _write_checked(self.chosen, chosen, chosen_schema(), "chosen.json")

    def read_chosen(self) -> dict[str, Any]:
        """The chosen config, checked against its schema (RunDirError naming the first field
        that breaks it)."""
        data = read_json(self.chosen)
        found = problems(data, chosen_schema())
        if found:
            raise _schema_error(self.chosen, found, self.path)
        return data

    # ------------------------------------------------------------------ adapter/
    def adapter_staging(self) -> Path:
        """An empty folder for the final tuning to save its adapter into (then
        :meth:`install_adapter`), so a killed save never leaves a half adapter."""
        staging = self.path / _STAGING
        shutil.rmtree(staging, ignore_errors=True)
        return staging

    def install_adapter(self) -> Path | None:
        """Replace ``adapter/`` by the staged one; None (and no adapter) when nothing was
        saved there (every rank 0)."""
        staging = self.path / _STAGING
        shutil.rmtree(self.adapter, ignore_errors=True)
        if not staging.exists():
            return None
        os.replace(staging, self.adapter)
        return self.adapter

    # ------------------------------------------------------------------ summary.json
    def write_summary(self, summary: Mapping[str, Any]) -> None:
        """The run's record, checked against its schema."""
        _write_checked(self.summary, summary, summary_schema(), "the summary")

    def record_exports(self, exports: Mapping[str, str]) -> dict[str, Any]:
        """Record the packages a job's ``export = [...]`` wrote (format -> folder relative to
        the run directory) under ``exports`` in summary.json; returns the new summary."""
        summary = {**self.read_summary(), "exports": dict(exports)}
        self.write_summary(summary)
        return summary

    def read_summary(self) -> dict[str, Any]:
        """The finished run's record, checked against its schema (RunDirError naming the
        first field that breaks it)."""
        fix = f"rewrite it by finishing the run again with `edgeqra search --resume {self.path}`"
        if not self.summary.is_file():
            raise RunDirError(
                f"`{self.summary}` is missing: the run has not finished; finish it with "
                f"`edgeqra search --resume {self.path}`"
            )
        try:
            summary = json.loads(self.summary.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            raise RunDirError(f"`{self.summary}` is not readable ({exc}); {fix}") from None
        summary = _upgrade_summary(summary)
        found = problems(summary, summary_schema())
        if found:
            raise _schema_error(self.summary, found, self.path)
        return summary  # type: ignore[return-value]


@dataclass(frozen=True)
class RunDir:
    """A finished run directory, checked: the job, the chosen config, the adapter, the summary."""

    path: Path
    job: SearchJob
    chosen: dict[str, Any]
    summary: dict[str, Any]
    config: Config
    adapter: Path | None  # None when every rank is 0 (the run saved no adapter)

    @classmethod
    def open(cls, path: Path) -> RunDir:
        """Read and check a run directory; one error names everything that is missing."""
        files = RunFiles(path)
        path = files.path
        if not path.is_dir():
            raise RunDirError(
                f"run directory `{path}` does not exist; pass the `--out` of a search"
            )
        missing = [f.name for f in (files.job, files.chosen, files.summary) if not f.is_file()]
        chosen = files.read_chosen() if files.chosen.is_file() else None
        config = Config.parse(chosen["spec"]) if chosen else None
        needs_adapter = config is None or any(c.rank for c in config)
        adapter = files.adapter
        if needs_adapter and not (adapter / "adapter_config.json").is_file():
            missing.append(f"{ADAPTER}/adapter_config.json")
        if needs_adapter and not any(adapter.glob("adapter_model.*")):
            missing.append(f"{ADAPTER}/adapter_model.safetensors")
        if missing:
            raise RunDirError(
                f"run directory `{path}` is incomplete: missing {', '.join(missing)}; the search "
                f"did not finish its final tuning (`edgeqra search --resume {path}` completes it)"
            )
        return cls(
            path,
            files.read_job(),
            chosen,  # type: ignore[arg-type]
            files.read_summary(),
            config,  # type: ignore[arg-type]
            adapter if needs_adapter else None,
        )

    @property
    def files(self) -> RunFiles:
        """The same directory's entries (paths, writers)."""
        return RunFiles(self.path)
