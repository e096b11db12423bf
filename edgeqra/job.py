"""Job files: one TOML file that fixes a whole compression run, for CI and for the TUI.

``edgeqra run JOB.toml`` and the TUI's "save job" meet here: both go through
:class:`JobSpec`, which is a :class:`~edgeqra.pipeline.SearchJob` plus where the run goes
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

Every key is optional except ``profile`` (and ``ratio`` once there is a ``[prune]`` table);
:data:`KEYS` lists them with their types and defaults (the CLI's defaults). Validation names
the bad key and the fix: an unknown key (with the nearest known one), a wrong type, a value
the pipeline rejects. Parsing is tomllib's; writing is tomli-w's.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tomli_w

from edgeqra.errors import ConfigError
from edgeqra.evaluate import EvalSettings
from edgeqra.pipeline import EvalJob, SearchJob
from edgeqra.prune import PruneSettings
from edgeqra.search.bayes import BayesSettings
from edgeqra.search.driver import SearchSettings
from edgeqra.search.evolution import EvolutionSettings
from edgeqra.search.executors import ExecutorSettings
from edgeqra.tune import TuneSettings

# Export formats a job may ask for (`edgeqra.exporters`); one this installation cannot write
# (onnx without its writer module) is refused up front (exit 2), not after minutes of search.
EXPORT_FORMATS: tuple[str, ...] = ("gptq", "adapter", "onnx")

_INT, _FLOAT, _STR, _BOOL = int, float, str, bool
_INTS, _STRS = "list[int]", "list[str]"

# key -> (type, default); None as default means "not set" (the pipeline's own default).
KEYS: dict[str, tuple[object, object]] = {
    "profile": (_STR, None),
    "model": (_STR, "smollm2"),
    "task": (_STR, "arc_easy"),
    "out": (_STR, "runs/job"),
    "seed": (_INT, 0),
    "device": (_STR, "auto"),
    "budget_gb": (_FLOAT, None),
    "budget_bits": (_FLOAT, None),
    "trust_remote_code": (_BOOL, False),
    "export": (_STRS, []),
    "space.bits": (_INTS, [2, 3, 4, 8]),
    "space.ranks": (_INTS, [0, 4, 8, 16, 32]),
    "data.n_train": (_INT, 512),
    "data.n_eval": (_INT, 200),
    "data.seq_len": (_INT, 256),
    "data.metric": (_STR, "auto"),
    "data.calib_samples": (_INT, 32),
    "data.group_size": (_INT, 64),
    "tuning.steps": (_INT, 64),
    "tuning.final_steps": (_INT, None),
    "tuning.batch_size": (_INT, 4),
    "tuning.lr": (_FLOAT, 2e-4),
    "tuning.gradient_checkpointing": (_BOOL, False),
    "search.evals": (_INT, 60),
    "search.time_limit": (_FLOAT, None),
    "search.eta": (_INT, 4),
    "search.rungs": (_INT, 3),
    "search.population": (_INT, 8),
    "search.children": (_INT, 8),
    "search.generations": (_INT, 6),
    "search.sensitivity": (_BOOL, True),
    "search.evolution": (_BOOL, True),
    "search.bayes": (_BOOL, True),
    "search.alpha": (_FLOAT, None),
    "search.fill": (_BOOL, True),
    "search.front": (_BOOL, False),
    "search.stage3": (_STR, "gp"),
    "search.baseline_rank": (_INT, 8),
    "search.baselines": (_BOOL, True),
    "search.executor": (_STR, "local"),
    "search.workers": (_INT, None),
    "search.ray_address": (_STR, None),
    "search.attempts": (_INT, 3),
    # [prune]: present = prune the model first (PruneSettings; its seed is the job's `seed`).
    "prune.ratio": (_FLOAT, None),
    "prune.importance": (_STR, "taylor"),
    "prune.layout": (_STR, "uniform"),
    "prune.calib_samples": (_INT, 32),
    "prune.calib_seq_len": (_INT, 256),
    "prune.calibration": (_STR, "c4"),
    "prune.heads": (_INT, None),
    "prune.round_to": (_INT, 32),
}
_PRUNE_KEYS = [k for k in KEYS if k.startswith("prune.")]
_TABLES = sorted({k.split(".")[0] for k in KEYS if "." in k})


@dataclass(frozen=True)
class JobSpec:
    """A search job plus where its run directory goes and what to export afterwards."""

    search: SearchJob
    out: Path
    export: tuple[str, ...] = ()
    prune: PruneSettings | None = None  # prune the model into RUN_DIR/pruned first


def _type_name(kind: object) -> str:
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(
        kind,
        f"a list ({kind})",  # type: ignore[arg-type]
    )


def _check_type(key: str, value: object, kind: object) -> object:
    """The value if it has the key's type (ints pass as floats), else a ConfigError."""
    ok = {
        _BOOL: isinstance(value, bool),
        _INT: isinstance(value, int) and not isinstance(value, bool),
        _FLOAT: isinstance(value, int | float) and not isinstance(value, bool),
        _STR: isinstance(value, str),
        _INTS: isinstance(value, list)
        and all(isinstance(v, int) and not isinstance(v, bool) for v in value),
        _STRS: isinstance(value, list) and all(isinstance(v, str) for v in value),
    }[kind]
    if not ok:
        raise ConfigError(
            f"`{key}` must be {_type_name(kind)}, got {value!r}; fix it in the job file"
        )
    return float(value) if kind is _FLOAT else value  # type: ignore[arg-type]


def _flatten(data: Mapping[str, Any]) -> dict[str, object]:
    """``{"search": {"evals": 8}}`` -> ``{"search.evals": 8}``, naming unknown keys."""
    flat: dict[str, object] = {}
    for name, value in data.items():
        if name in _TABLES:
            if not isinstance(value, dict):
                raise ConfigError(f"`{name}` must be a table (`[{name}]`), got {value!r}")
            for sub, v in value.items():
                flat[f"{name}.{sub}"] = v
        elif isinstance(value, dict):
            near = difflib.get_close_matches(name, _TABLES, n=1)
            hint = f"did you mean `[{near[0]}]`?" if near else f"tables: {', '.join(_TABLES)}"
            raise ConfigError(f"unknown table `[{name}]` in the job file; {hint}")
        else:
            flat[name] = value
    for key in flat:
        if key not in KEYS:
            near = difflib.get_close_matches(key, list(KEYS), n=1)
            hint = f"did you mean `{near[0]}`?" if near else f"known keys: {', '.join(KEYS)}"
            raise ConfigError(f"unknown key `{key}` in the job file; {hint}")
    return flat


def from_mapping(data: Mapping[str, Any]) -> JobSpec:
    """Validate a parsed job file and build the JobSpec."""
    flat = _flatten(data)
    if "profile" not in flat:
        raise ConfigError('the job file has no `profile`; add e.g. `profile = "t4-16gb"`')
    v = {k: default for k, (_, default) in KEYS.items()}
    for key, value in flat.items():
        v[key] = _check_type(key, value, KEYS[key][0])
    export = tuple(v["export"])  # type: ignore[arg-type]
    from edgeqra.exporters import available_formats

    for fmt in export:
        if fmt not in EXPORT_FORMATS:
            raise ConfigError(
                f"`export` format {fmt!r} is unknown; use some of {list(EXPORT_FORMATS)}"
            )
        if fmt not in available_formats():
            raise ConfigError(
                f"`export` format {fmt!r} is not available in this installation "
                "(edgeqra.exporters.onnx is missing); drop it from `export`"
            )
    if len(set(export)) != len(export):
        raise ConfigError(f"`export` lists a format twice: {list(export)}; list each once")
    seed = v["seed"]
    steps = v["tuning.steps"]
    ev = EvalJob(
        model=v["model"],
        task=v["task"],
        bits=tuple(v["space.bits"]),
        ranks=tuple(v["space.ranks"]),
        group_size=v["data.group_size"],
        calib_samples=v["data.calib_samples"],
        tune=TuneSettings(
            steps=steps,
            lr=v["tuning.lr"],
            batch_size=v["tuning.batch_size"],
            seed=seed,
            gradient_checkpointing=v["tuning.gradient_checkpointing"],
        ),
        eval=EvalSettings(
            n_train=v["data.n_train"],
            n_eval=v["data.n_eval"],
            seq_len=v["data.seq_len"],
            metric=v["data.metric"],
        ),
        device=v["device"],
        profile=v["profile"],
        trust_remote_code=v["trust_remote_code"],
    )  # type: ignore[arg-type]
    search = SearchSettings(
        steps=steps,
        eta=v["search.eta"],
        n_rungs=v["search.rungs"],
        max_evals=v["search.evals"],
        time_limit=v["search.time_limit"],
        seed=seed,
        use_sensitivity=v["search.sensitivity"],
        use_evolution=v["search.evolution"],
        use_bayes=v["search.bayes"],
        fill=v["search.fill"],
        evolution=EvolutionSettings(
            population=v["search.population"],
            children=v["search.children"],
            generations=v["search.generations"],
            front=v["search.front"] or v["search.alpha"] is not None,  # a trade-off needs a front
        ),
        bayes=BayesSettings(seed=seed, method=v["search.stage3"]),
    )  # type: ignore[arg-type]
    job = SearchJob(
        eval=ev,
        search=search,
        budget_gb=v["budget_gb"],
        budget_bits=v["budget_bits"],
        baseline_rank=v["search.baseline_rank"],
        final_steps=v["tuning.final_steps"],
        alpha=v["search.alpha"],
        baselines=v["search.baselines"],
        executor=ExecutorSettings(
            kind=v["search.executor"],
            workers=v["search.workers"],
            ray_address=v["search.ray_address"],
            attempts=v["search.attempts"],
        ),
    )  # type: ignore[arg-type]
    prune = None
    if any(k in flat for k in _PRUNE_KEYS):
        if v["prune.ratio"] is None:
            raise ConfigError("`[prune]` needs `ratio` (0 to 0.7), e.g. `ratio = 0.2`")
        prune = PruneSettings(
            seed=seed,
            **{k.split(".", 1)[1]: v[k] for k in _PRUNE_KEYS},  # type: ignore[arg-type]
        )
    # `out` is taken as the CLI's --out is (relative to where edgeqra runs), so the same job
    # file works from a repository root in CI and from the TUI.
    return JobSpec(search=job, out=Path(v["out"]), export=export, prune=prune)  # type: ignore[arg-type]


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


def to_mapping(spec: JobSpec) -> dict[str, object]:
    """The job file's content for ``spec`` (inverse of :func:`from_mapping`); ``None``s left out."""
    job, ev, s = spec.search, spec.search.eval, spec.search.search
    out = spec.out
    values: dict[str, object] = {
        "profile": ev.profile,
        "model": ev.model,
        "task": ev.task,
        "out": str(out),
        "seed": s.seed,
        "device": ev.device,
        "budget_gb": job.budget_gb,
        "budget_bits": job.budget_bits,
        "trust_remote_code": ev.trust_remote_code,
        "export": list(spec.export),
        "space.bits": list(ev.bits),
        "space.ranks": list(ev.ranks),
        "data.n_train": ev.eval.n_train,
        "data.n_eval": ev.eval.n_eval,
        "data.seq_len": ev.eval.seq_len,
        "data.metric": ev.eval.metric,
        "data.calib_samples": ev.calib_samples,
        "data.group_size": ev.group_size,
        "tuning.steps": s.steps,
        "tuning.final_steps": job.final_steps,
        "tuning.batch_size": ev.tune.batch_size,
        "tuning.lr": ev.tune.lr,
        "tuning.gradient_checkpointing": ev.tune.gradient_checkpointing,
        "search.evals": s.max_evals,
        "search.time_limit": s.time_limit,
        "search.eta": s.eta,
        "search.rungs": s.n_rungs,
        "search.population": s.evolution.population,
        "search.children": s.evolution.children,
        "search.generations": s.evolution.generations,
        "search.sensitivity": s.use_sensitivity,
        "search.evolution": s.use_evolution,
        "search.bayes": s.use_bayes,
        "search.alpha": job.alpha,
        "search.fill": s.fill,
        "search.front": s.evolution.front,
        "search.stage3": s.bayes.method,
        "search.baseline_rank": job.baseline_rank,
        "search.baselines": job.baselines,
        "search.executor": job.executor.kind.value,
        "search.workers": job.executor.workers,
        "search.ray_address": job.executor.ray_address,
        "search.attempts": job.executor.attempts,
    }
    prune = spec.prune.to_json() if spec.prune is not None else {}
    values.update({k: prune.get(k.split(".", 1)[1]) for k in _PRUNE_KEYS})
    if set(values) != set(KEYS):  # a key added to KEYS but not here would be dropped silently
        raise RuntimeError(f"job keys out of sync: {set(values) ^ set(KEYS)}")
    data: dict[str, Any] = {}
    for key, value in values.items():
        if value is None:
            continue
        if "." in key:
            table, sub = key.split(".")
            data.setdefault(table, {})[sub] = value
        else:
            data[key] = value
    return data


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
