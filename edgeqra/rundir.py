"""A run directory: the files a search writes and the exporters, the report and the TUI read.

``edgeqra search --out RUN`` / ``edgeqra run`` leave::

    RUN/job.json          the SearchJob (settings; resume checks them)
    RUN/journal.jsonl     one Result per evaluation (resume replays it)
    RUN/sensitivity.json  the stage-1 profile (when run)
    RUN/front.json        the measured Pareto front
    RUN/chosen.json       the chosen config and its predicted memory
    RUN/adapter/          the final tuning's PEFT adapter (absent when every rank is 0)
    RUN/summary.json      everything above in one record (schemas/summary.schema.json)

:mod:`edgeqra.pipeline` writes them (:func:`write_json`: temp file, then rename, re-exported
here for updates of a finished run such as the exports' entry in summary.json); this module
is the reading side, above the pipeline: :class:`RunDir` reads a finished run and says in
one error what is missing.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgeqra.errors import EdgeQRAError
from edgeqra.pipeline import SearchJob, write_json
from edgeqra.space import Config

__all__ = [
    "ADAPTER",
    "CHOSEN",
    "JOB",
    "JOURNAL",
    "SUMMARY",
    "RunDir",
    "RunDirError",
    "read_json",
    "write_json",
]

JOB = "job.json"
JOURNAL = "journal.jsonl"
CHOSEN = "chosen.json"
ADAPTER = "adapter"
SUMMARY = "summary.json"


class RunDirError(EdgeQRAError):
    """A run directory is missing, incomplete or holds a file that does not parse."""


def read_json(path: Path) -> Any:
    """A JSON file, or a RunDirError naming it."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise RunDirError(f"cannot read `{path}` ({exc}); is the run directory intact?") from None


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
        path = Path(path)
        if not path.is_dir():
            raise RunDirError(
                f"run directory `{path}` does not exist; pass the `--out` of a search"
            )
        missing = [n for n in (JOB, CHOSEN, SUMMARY) if not (path / n).is_file()]
        chosen = read_json(path / CHOSEN) if (path / CHOSEN).is_file() else None
        config = Config.parse(chosen["spec"]) if chosen else None
        needs_adapter = config is None or any(c.rank for c in config)
        adapter = path / ADAPTER
        if needs_adapter and not (adapter / "adapter_config.json").is_file():
            missing.append(f"{ADAPTER}/adapter_config.json")
        if needs_adapter and not any(adapter.glob("adapter_model.*")):
            missing.append(f"{ADAPTER}/adapter_model.safetensors")
        if missing:
            raise RunDirError(
                f"run directory `{path}` is incomplete: missing {', '.join(missing)}; the search "
                f"did not finish its final tuning (`edgeqra search --resume {path}` completes it)"
            )
        job = SearchJob.from_json(read_json(path / JOB))
        return cls(
            path,
            job,
            chosen,  # type: ignore[arg-type]
            read_json(path / SUMMARY),
            config,  # type: ignore[arg-type]
            adapter if needs_adapter else None,
        )
