"""Job files: one TOML file that fixes a whole compression run, for CI and for the TUI.

``edgeqra run JOB.toml`` and the TUI's "save job" meet here: both go through
:class:`JobSpec`, which is a :class:`~edgeqra.jobs.SearchJob` plus where the run goes
and what to export. The file's keys are the CLI's option names grouped in tables::

    profile = "jetson-orin-nano-8gb"   # required: the hard memory budget
    model = "smollm2"                  # `smollm2`, a HF folder or a .gguf file
    task = "arc_easy"
    out = "runs/quickstart"            # the run directory (relative: to the working directory)
    seed = 0

    [search]
    evals = 16

    [prune]                            # optional: prune first (edgeqra.prune), then search
    ratio = 0.2

    [merge]                            # optional: how `export = [...]` merges (edgeqra export's)
    hessian_rows = 8

Every key is optional except ``profile`` (and ``ratio`` once there is a ``[prune]`` table).
The keys, their types and defaults (the CLI's) are the settings' own (:mod:`edgeqra.settings`
walks :class:`JobSpec` and the dataclasses it holds); ``edgeqra search --help`` lists them
under their flags. Validation names the bad key and the fix: an unknown key (with the nearest
known one), a wrong type, a value the settings' ``__post_init__`` rejects. Parsing is
tomllib's; writing is tomli-w's.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tomli_w

from edgeqra import settings as schema
from edgeqra.errors import ConfigError
from edgeqra.exporters.merge import MergeSettings
from edgeqra.jobs import SearchJob
from edgeqra.prune import PruneSettings
from edgeqra.settings import setting

__all__ = [
    "EXPORT_FORMATS",
    "JobSpec",
    "default_mapping",
    "from_mapping",
    "load_job",
    "save_job",
    "to_mapping",
    "with_out",
]

# Export formats a job may ask for (`edgeqra.exporters`); one this installation cannot write
# (onnx without its writer module) is refused up front (exit 2), not after minutes of search.
EXPORT_FORMATS: tuple[str, ...] = ("gptq", "adapter", "onnx")


@dataclass(frozen=True)
class JobSpec:
    """A search job plus where its run directory goes and what to export afterwards."""

    search: SearchJob
    # Taken as the CLI's --out is (relative to where edgeqra runs), so the same job file
    # works from a repository root in CI and from the TUI.
    out: Path = setting(
        Path("runs/job"),
        help="the run directory (relative: to the working directory)",
        key="out",
        flag=None,
    )
    export: tuple[str, ...] = setting(
        (),
        help="package formats written after the search (gptq, adapter, onnx)",
        key="export",
        flag=None,
        choices=EXPORT_FORMATS,
    )
    prune: PruneSettings | None = None  # [prune]: prune the model into RUN_DIR/pruned first
    merge: MergeSettings = dataclasses.field(default_factory=MergeSettings)  # [merge]: exports

    def __post_init__(self) -> None:
        from edgeqra.exporters import available_formats

        for fmt in self.export:
            if fmt not in EXPORT_FORMATS:
                raise ConfigError(
                    f"`export` format {fmt!r} is unknown; use some of {list(EXPORT_FORMATS)}"
                )
            if fmt not in available_formats():
                raise ConfigError(
                    f"`export` format {fmt!r} is not available in this installation "
                    "(edgeqra.exporters.onnx is missing); drop it from `export`"
                )
        if len(set(self.export)) != len(self.export):
            raise ConfigError(f"`export` lists a format twice: {list(self.export)}; list each once")


def from_mapping(data: Mapping[str, Any]) -> JobSpec:
    """Validate a parsed job file and build the JobSpec."""
    flat = schema.flatten(data, schema.settings_of(JobSpec))
    if "profile" not in flat:
        raise ConfigError('the job file has no `profile`; add e.g. `profile = "t4-16gb"`')
    if any(k.startswith("prune.") for k in flat) and "prune.ratio" not in flat:
        raise ConfigError("`[prune]` needs `ratio` (0 to 0.7), e.g. `ratio = 0.2`")
    return schema.build(JobSpec, flat)


def load_job(path: str | Path) -> JobSpec:
    """Read and validate a job file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"job file `{path}` does not exist; pass the path of a .toml job file")
    try:
        data = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"`{path}` is not valid TOML ({exc}); fix the syntax") from None
    try:
        return from_mapping(data)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None


def _profile_first(data: dict[str, Any]) -> dict[str, Any]:
    return {k: data[k] for k in sorted(data, key=lambda k: k != "profile")}


def to_mapping(spec: JobSpec) -> dict[str, object]:
    """The job file's content for ``spec`` (inverse of :func:`from_mapping`); ``None``s left out."""
    return _profile_first(schema.to_mapping(spec, JobSpec))


def default_mapping() -> dict[str, Any]:
    """Every setting's default as a job mapping, without ``profile`` and ``[prune]`` (a draft)."""
    return schema.defaults_mapping(JobSpec)


def save_job(spec: JobSpec, path: str | Path) -> Path:
    """Write ``spec`` as a job file atomically (temp file, then rename); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = tomli_w.dumps(to_mapping(spec))
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
    return path


def with_out(spec: JobSpec, out: Path) -> JobSpec:
    """The same job writing to another run directory."""
    return dataclasses.replace(spec, out=out)
