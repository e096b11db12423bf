"""Runs the stages for one job, in order; the only module that knows that order.

``prepare``: model -> data -> calibration -> bank -> Evaluator (``edgeqra evaluate``, the
benchmarks). A job with a ``[prune]`` table is pruned first (:func:`prune_stage`, called by
:func:`open_run_dir`): the run directory gets ``pruned/`` and its job names that folder as
the model, so every later stage (bank, search, export, resume) sees an ordinary model. ``run_search_job``: prepare -> sensitivity (stage 1) -> evolution and Bayesian
refinement (stages 2-3, :mod:`edgeqra.search`) -> full-length tuning of the chosen config ->
summary, all inside one run directory whose journal makes the whole job resumable.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import random
import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from edgeqra import settings as schema
from edgeqra.bank import Bank, BankSpec, bank_key, build_bank
from edgeqra.data import calibration_batches, load_task
from edgeqra.device import resolve_device
from edgeqra.errors import BudgetError, ConfigError
from edgeqra.evaluate import EvalSettings, Evaluator
from edgeqra.memory import ModelSpec, estimate, estimate_for_profile
from edgeqra.models import LoadedModel, cache_dir, load_model, resolve_model
from edgeqra.plan import budget_for_bits
from edgeqra.profiles import BudgetMode, DeviceProfile, FinetuneWorkload, load_profile
from edgeqra.prune import PruneSettings
from edgeqra.result import Result
from edgeqra.search.driver import (
    Evaluations,
    SearchEvent,
    SearchOutcome,
    SearchSettings,
    run_search,
)
from edgeqra.search.executors import (
    Executor,
    ExecutorSettings,
    check_available,
    make_executor,
)
from edgeqra.search.journal import Journal
from edgeqra.sensitivity import initial_population, measure_sensitivity, seed_config
from edgeqra.settings import setting
from edgeqra.space import (
    DEFAULT_BITS,
    DEFAULT_RANKS,
    FP16_BITS,
    Config,
    SearchSpace,
    fill,
    repair,
)
from edgeqra.tune import TuneSettings

__all__ = [
    "EvalJob",
    "EvalWorkerJob",
    "PRUNED_DIR",
    "Prepared",
    "SearchJob",
    "baseline_configs",
    "check_budget",
    "open_run_dir",
    "prepare",
    "prune_stage",
    "resolve_device",
    "run_search_job",
    "write_json",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EvalJob:
    """Everything that fixes an evaluation: model, data, bank and tuning settings."""

    model: str = setting(
        "smollm2", help="`smollm2` (embedded), a HF folder or a .gguf file", key="model"
    )
    task: str = setting(
        "arc_easy",
        help="arc_easy, arc_challenge, boolq, piqa, hellaswag, winogrande, openbookqa, c4, "
        "wiki, … or a .txt/.jsonl file",
        key="task",
    )
    bits: tuple[int, ...] = setting(  # the search space Q (the bank is built for what is used)
        DEFAULT_BITS, help="allowed bit-widths Q", key="space.bits"
    )
    ranks: tuple[int, ...] = setting(DEFAULT_RANKS, help="allowed ranks R", key="space.ranks")
    group_size: int = setting(
        64, help="GPTQ group size (-1: one group per row)", key="data.group_size"
    )
    calibration: str = "c4"
    calib_samples: int = setting(  # GPTQModel wants >= 256 for best quality; 32 keeps CPU short
        32, help="GPTQ calibration rows of 256 tokens", key="data.calib_samples"
    )
    calib_seq_len: int = 256
    tune: TuneSettings = field(default_factory=TuneSettings)
    eval: EvalSettings = field(default_factory=EvalSettings)
    device: str = setting("auto", help="auto, cpu or cuda[:N]", key="device")
    profile: str | None = setting(
        None,
        help="device profile name or .toml path: the hard memory budget (evaluate: checked)",
        key="profile",
    )
    trust_remote_code: bool = setting(
        False, help="allow the model's custom code", key="trust_remote_code"
    )

    def __post_init__(self) -> None:
        SearchSpace(1, self.bits, self.ranks)  # the bit and rank sets, before any model loads
        gs = self.group_size
        if isinstance(gs, bool) or not isinstance(gs, int) or not (gs == -1 or gs >= 1):
            raise ConfigError(
                f"`group_size` must be a positive integer (or -1 for one group per row), got "
                f"{gs!r}; GPTQ's usual sizes are 32, 64 and 128"
            )
        n = self.calib_samples
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ConfigError(f"`calib_samples` must be an integer >= 1, got {n!r}")


@dataclass(frozen=True)
class Prepared:
    """A ready evaluator plus what the CLI and benchmarks report next to its results."""

    evaluator: Evaluator
    loaded: LoadedModel
    spec: ModelSpec
    space: SearchSpace
    bank: Bank | None
    profile: DeviceProfile | None
    device: str
    calibration: torch.Tensor | None  # the bank's calibration rows (None without a bank)
    budget_bytes: int | None  # the profile's budget, or the user's override


def baseline_configs(n_units: int, bits: tuple[int, ...], rank: int) -> dict[str, Config]:
    """FP16 LoRA and uniform b-bit GPTQ (QLoRA-style) at one rank, by label."""
    out = {"FP16 LoRA": Config.uniform(n_units, FP16_BITS, rank)}
    out.update(
        {f"GPTQ {b}-bit": Config.uniform(n_units, b, rank) for b in sorted(bits, reverse=True)}
    )
    return out


def _memory_fn(
    spec: ModelSpec, job: EvalJob, profile: DeviceProfile | None, budget_bytes: int | None
):
    """Predicted bytes (and fit) of a config: the profile's budget, else the tuning workload."""
    if profile is not None:
        budget = profile.budget_bytes if budget_bytes is None else budget_bytes

        def with_profile(config: Config) -> tuple[int, bool | None]:
            b = estimate_for_profile(spec, config, profile, group_size=job.group_size)
            return b.total, b.fits(budget)

        return with_profile
    work = FinetuneWorkload(job.tune.batch_size, job.eval.seq_len, job.tune.gradient_checkpointing)

    def without_profile(config: Config) -> tuple[int, bool | None]:
        return estimate(
            spec, config, mode=BudgetMode.FINETUNE, finetune=work, group_size=job.group_size
        ).total, None

    return without_profile


def prepare(
    job: EvalJob,
    *,
    needed_bits: tuple[int, ...] | None = None,
    budget_gb: float | None = None,
    progress: bool = True,
    cached_bank: Path | None = None,
) -> Prepared:
    """Load the model and data, build (or reuse) the bank for ``needed_bits``, make the evaluator.

    Args:
        job: the evaluation settings.
        needed_bits: bit-widths the bank must hold (default: all of ``job.bits``); an
            FP16-only evaluation passes ``()`` and builds no bank.
        budget_gb: overrides the profile's usable budget (GiB).
        progress: rich progress bars for the bank build.
        cached_bank: a bank folder the driver built (search workers): it must be complete
            and have this model's and calibration's key; it is used, never built.
    """
    device = resolve_device(job.device)
    profile = load_profile(job.profile) if job.profile else None
    if budget_gb is not None and budget_gb <= 0:
        raise ConfigError(f"`budget_gb` must be positive, got {budget_gb}")
    budget_bytes = (
        int(budget_gb * 2**30)
        if budget_gb is not None
        else (profile.budget_bytes if profile is not None else None)
    )
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    loaded = load_model(
        job.model, dtype=dtype, device=device, trust_remote_code=job.trust_remote_code
    )
    space = SearchSpace(len(loaded.units), job.bits, job.ranks)
    task = load_task(job.task, seed=job.tune.seed, n_train=job.eval.n_train, n_eval=job.eval.n_eval)
    bits = tuple(sorted(set(job.bits if needed_bits is None else needed_bits)))
    bank = calibration = None
    if bits:
        calibration = calibration_batches(
            loaded.tokenizer,
            job.calibration,
            n_samples=job.calib_samples,
            seq_len=job.calib_seq_len,
            seed=job.tune.seed,
        )
        bank_spec = BankSpec(bits=bits, group_size=job.group_size, seed=job.tune.seed)
        if cached_bank is not None:
            bank = Bank(Path(cached_bank), loaded.units, bank_spec)
            key = bank_key(loaded.path, calibration, bank_spec)
            if not bank.complete or Path(cached_bank).name != key:
                raise ConfigError(
                    f"worker: the bank at `{cached_bank}` is incomplete or was built from other "
                    f"weights/calibration (key {key}); workers must share the driver's "
                    "EDGEQRA_CACHE folder (a shared filesystem on a cluster)"
                )
        else:
            bank = build_bank(
                loaded.path, loaded.units, calibration, bank_spec, progress=progress, device=device
            )
    spec = ModelSpec.from_model(loaded.model)
    evaluator = Evaluator(
        loaded,
        task,
        bank,
        job.tune,
        job.eval,
        memory=_memory_fn(spec, job, profile, budget_bytes),
        progress=progress,
        max_rank=max(max(job.ranks), 1),  # the engine pads every adapter to this rank
    )
    return Prepared(
        evaluator, loaded, spec, space, bank, profile, device, calibration, budget_bytes
    )


@dataclass(frozen=True)
class EvalWorkerJob:
    """The pipeline's evaluation job as a worker rebuilds it: model, data, tuning, bank path.

    The driver resolved the cache already: ``model`` is the dense folder it loaded (for a GGUF
    source, its copy in the cache) and ``bank`` the bank folder it built, so a worker reads
    both by path and needs no cache root (nor ``$EDGEQRA_CACHE``) of its own; on a cluster
    both must be on a filesystem every node sees.
    """

    eval: EvalJob
    budget_gb: float | None
    bank: str | None  # the driver's bank folder (a cache hit is required), None without a bank
    model: str  # the driver's resolved model folder (LoadedModel.path)

    def build(self, slot: int) -> tuple[Callable[[Config, int], Result], str]:
        """Prepare the evaluator against the driver's model folder and bank (never rebuilt)."""
        prepared = prepare(
            dataclasses.replace(self.eval, model=self.model),
            budget_gb=self.budget_gb,
            progress=False,
            cached_bank=None if self.bank is None else Path(self.bank),
        )
        device = prepared.device
        if device.startswith("cuda"):
            device = f"cuda:{os.environ.get('CUDA_VISIBLE_DEVICES', device.partition(':')[2] or 0)}"
        return prepared.evaluator.evaluate, device


# ----------------------------------------------------------------------------- search job


@dataclass(frozen=True)
class SearchJob:
    """A whole search: what to evaluate, how to search, where the run directory goes."""

    eval: EvalJob
    search: SearchSettings = field(default_factory=SearchSettings)
    budget_gb: float | None = setting(
        None, help="override the profile's usable budget (GiB)", key="budget_gb"
    )
    budget_bits: float | None = setting(
        None,
        help="budget = the predicted memory of a rank-8 config averaging B bits (e.g. 3.5)",
        key="budget_bits",
        metavar="B",
    )
    baseline_rank: int = setting(  # seeded and reported
        8, help="rank of the uniform baselines", key="search.baseline_rank"
    )
    final_steps: int | None = setting(  # None = search.steps
        None, help="tuning steps of the chosen config (default: --steps)", key="tuning.final_steps"
    )
    alpha: float | None = setting(  # α·norm(score) − (1−α)·norm(memory); None = best score
        None, help="pick the front's trade-off point α·score−(1−α)·memory", key="search.alpha"
    )
    baselines: bool = setting(  # at full length
        True, help="score the uniform baselines that fit, for the summary", key="search.baselines"
    )
    executor: ExecutorSettings = field(default_factory=ExecutorSettings)  # where evaluations run

    def __post_init__(self) -> None:
        if self.eval.profile is None:
            raise ConfigError("a search needs a device profile; pass `--profile NAME`")
        if self.alpha is not None and not 0.0 <= self.alpha <= 1.0:
            raise ConfigError(f"`alpha` must be in [0, 1], got {self.alpha}")
        if self.budget_gb is not None and self.budget_bits is not None:
            raise ConfigError(
                "give the budget once: `budget_gb` or `budget_bits`, not both; drop one of them"
            )
        if self.budget_bits is not None:
            ladder = sorted({*self.eval.bits, FP16_BITS})
            ok = isinstance(self.budget_bits, int | float) and not isinstance(
                self.budget_bits, bool
            )
            if not ok or not ladder[0] <= self.budget_bits <= FP16_BITS:
                raise ConfigError(
                    f"`budget_bits` {self.budget_bits!r} must be a number in [{ladder[0]}, "
                    f"{FP16_BITS}] (the bit set {list(self.eval.bits)} up to unquantized), e.g. 3.5"
                )
        if self.budget_gb is not None and not self.budget_gb > 0:
            raise ConfigError(f"`budget_gb` must be positive, got {self.budget_gb}")
        if self.baseline_rank not in self.eval.ranks:
            raise ConfigError(
                f"`baseline_rank` {self.baseline_rank} is not in the rank set "
                f"{list(self.eval.ranks)}; pick one of those"
            )

        if self.final_steps is not None and (
            isinstance(self.final_steps, bool) or not isinstance(self.final_steps, int)
            or self.final_steps < 0
        ):  # fmt: skip
            raise ConfigError(f"`final_steps` must be an integer >= 0, got {self.final_steps!r}")

    @classmethod
    def from_values(cls, values: Mapping[str, object]) -> SearchJob:
        """Build from setting values by key (a job file's, the CLI's; :mod:`edgeqra.settings`).

        A trade-off point (``search.alpha``) needs the whole front, so it implies
        ``search.front``.
        """
        values = dict(values)
        if values.get("search.alpha") is not None:
            values["search.front"] = True
        return schema.build(cls, values)

    def to_json(self) -> dict[str, object]:
        """JSON-ready (the run directory's job.json; ``from_json`` reads it back)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> SearchJob:
        """Rebuild from :meth:`to_json` output, also one written before issue 19 (old names)."""
        return schema.from_tree(cls, _upgrade_job_json(data))


# job.json before issue 19: renamed search settings, and the seed and steps stored more than
# once (search.seed, search.bayes.seed, eval.tune.steps: now one `seed` and `search.steps`).
_RENAMED = {"max_evals": "evals", "n_rungs": "rungs", "use_sensitivity": "sensitivity"}


def _upgrade_job_json(data: dict) -> dict:
    """A job.json of any edgeqra version in today's field names (a copy)."""
    data = json.loads(json.dumps(data))
    search = data.get("search", {})
    for old, new in _RENAMED.items():
        if old in search:
            search[new] = search.pop(old)
    search.pop("seed", None)
    search.get("bayes", {}).pop("seed", None)
    data.get("eval", {}).get("tune", {}).pop("steps", None)  # set per evaluation
    return data


def write_json(path: Path, data: object) -> None:
    """Atomic JSON write: a temp file in the same folder, then rename."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, path)


def _chosen(outcome: SearchOutcome, alpha: float | None) -> Result:
    """Best score within the budget, or the front's best α-scalarised trade-off point."""
    if alpha is None:
        return outcome.best
    front = list(outcome.front)
    scores = [r.score for r in front]
    mems = [float(r.memory_bytes or 0) for r in front]

    def norm(v: float, lo: float, hi: float) -> float:
        return 0.0 if hi == lo else (v - lo) / (hi - lo)

    return max(
        front,
        key=lambda r: (
            alpha * norm(r.score, min(scores), max(scores))
            - (1 - alpha) * norm(float(r.memory_bytes or 0), min(mems), max(mems))
        ),
    )


PRUNED_DIR = "pruned"  # the run directory's pruned model, when the job prunes


def prune_stage(
    model: str, settings: PruneSettings, folder: Path, *, device: str = "auto",
    trust_remote_code: bool = False,
) -> Path:  # fmt: skip
    """Prune ``model`` into ``folder`` once; a folder already pruned with these settings is reused.

    Returns the folder (absolute), which then stands for the model in every later stage.
    """
    from edgeqra.prune import prune_folder, read_record

    folder = Path(folder).resolve()
    if folder.exists():
        record = read_record(folder)
        same = record is not None and record["settings"] == settings.to_json()
        if same and record["source"] == str(model):
            log.info("reusing the pruned model in %s", folder)
            return folder
        raise ConfigError(
            f"`{folder}` exists but was not pruned from `{model}` with these [prune] settings; "
            "remove it or pick another `out`"
        )
    prune_folder(
        model, folder, settings, device=resolve_device(device),
        trust_remote_code=trust_remote_code,
    )  # fmt: skip
    return folder


def open_run_dir(
    out: Path, job: SearchJob | None, *, resume: bool, prune: PruneSettings | None = None
) -> SearchJob:
    """Create ``out`` for a new run (refusing to clobber one), or read its job to resume.

    With ``prune`` (the job file's ``[prune]`` table) a new run first prunes ``job``'s model
    into ``out/pruned`` and records that folder as the run's model in ``job.json``.
    """
    job_file = out / "job.json"
    if resume:
        if not job_file.is_file():
            raise ConfigError(
                f"`{out}` is not a run directory (no job.json); pass the folder a search wrote"
            )
        return SearchJob.from_json(json.loads(job_file.read_text()))
    if job is None:
        raise ConfigError("internal error: a new run needs a job")
    if job_file.exists():
        raise ConfigError(
            f"`{out}` already holds a run; pass `--resume {out}` to continue it or another `--out`"
        )
    if prune is not None:  # before anything is written: a bad [prune] leaves no run directory
        folder = prune_stage(
            job.eval.model, prune, out / PRUNED_DIR, device=job.eval.device,
            trust_remote_code=job.eval.trust_remote_code,
        )  # fmt: skip
        job = dataclasses.replace(job, eval=dataclasses.replace(job.eval, model=str(folder)))
    out.mkdir(parents=True, exist_ok=True)
    write_json(job_file, job.to_json())
    return job


def _arch_spec(job: SearchJob) -> ModelSpec:
    """The model's shapes from its config alone (meta tensors, seconds)."""
    from transformers import AutoConfig

    path = resolve_model(job.eval.model)
    return ModelSpec.from_config(
        AutoConfig.from_pretrained(
            path, local_files_only=True, trust_remote_code=job.eval.trust_remote_code
        )
    )


def budget_gb_of(job: SearchJob) -> float | None:
    """The job's budget override in GiB: ``budget_gb``, or the bytes ``budget_bits`` means.

    bytes / 2**30 is exact in a float, so ``int(gb * 2**30)`` gives the bytes back exactly
    (a budget equal to uniform 4-bit's memory still admits uniform 4-bit).
    """
    if job.budget_bits is None:
        return job.budget_gb
    profile = load_profile(job.eval.profile or "")
    budget = budget_for_bits(
        _arch_spec(job), profile, job.budget_bits, job.eval.bits, group_size=job.eval.group_size
    )
    return budget / 2**30


def check_budget(job: SearchJob) -> int:
    """Fail fast when not even the smallest config (lowest bits, lowest rank) fits.

    Uses the architecture alone (meta tensors), so it costs seconds. Returns the budget.
    """
    profile = load_profile(job.eval.profile or "")
    budget_gb = budget_gb_of(job)
    budget = profile.budget_bytes if budget_gb is None else int(budget_gb * 2**30)
    spec = _arch_spec(job)
    smallest = Config.uniform(spec.n_units, min(job.eval.bits), min(job.eval.ranks))
    need = estimate_for_profile(spec, smallest, profile, group_size=job.eval.group_size).total
    if need > budget:
        raise BudgetError(
            f"nothing fits: the smallest config ({smallest.short()}) needs {need / 2**30:.2f} GiB "
            f"but the budget on `{profile.name}` is {budget / 2**30:.2f} GiB; pick a larger "
            "profile, raise `--budget-gb`, or allow fewer bits"
        )
    return budget


def run_search_job(
    job: SearchJob,
    out: Path,
    *,
    on_event: Callable[[SearchEvent], None] | None = None,
    progress: bool = True,
) -> dict[str, object]:
    """Prepare → sensitivity → search → final full-length tuning → summary, in ``out``.

    ``out`` must already hold ``job.json`` (see :func:`open_run_dir`); everything the run
    measured is journaled there, so calling this again on the same folder resumes it.
    Returns the summary (also written to ``out/summary.json``).
    """
    settings = job.search
    # Seconds, before minutes of model loading and GPTQ; bytes / 2**30 is exact in a float.
    budget_gb = check_budget(job) / 2**30
    check_available(job.executor)  # e.g. Ray not installed: say so now
    prepared = prepare(job.eval, budget_gb=budget_gb, progress=progress)
    space, spec, profile = prepared.space, prepared.spec, prepared.profile
    if profile is None or prepared.budget_bytes is None:  # SearchJob.__post_init__ checks
        raise ConfigError("a search needs a device profile; pass `--profile NAME`")
    budget = prepared.budget_bytes
    group = job.eval.group_size

    def memory(config: Config) -> int:
        return estimate_for_profile(spec, config, profile, group_size=group).total

    importance: tuple[float, ...] | None = None
    if settings.sensitivity and prepared.bank is not None:
        sens = measure_sensitivity(
            prepared.loaded,
            prepared.bank,
            prepared.calibration,
            cache_dir=cache_dir() / "sensitivity",
            progress=progress,
        )
        write_json(out / "sensitivity.json", sens.to_json())
        importance = sens.importance()

    def fix(config: Config) -> Config:
        fitted = repair(config, space, memory, budget, importance)
        return fill(fitted, space, memory, budget, importance) if settings.fill else fitted

    rng = random.Random(job.eval.tune.seed)
    baselines = baseline_configs(space.n_units, space.bits, job.baseline_rank)
    fitting_all = [c for c in baselines.values() if memory(c) <= budget]
    fitting = [c for c in fitting_all if c.bits[0] in space.bits]  # seeds must lie in the space
    seeds = fitting if settings.seed_baselines else []
    size = settings.evolution.population
    if importance is not None:
        seed = fix(seed_config(importance, space))
        initial = initial_population(
            seed, space, rng, size, repair=fix, importance=importance, extra=seeds
        )
    else:  # ablation without stage 1: uniform baselines that fit + random feasible configs
        initial = list(dict.fromkeys(seeds))
        for _ in range(50 * size):
            if len(initial) >= size:
                break
            candidate = fix(space.sample(rng))
            if candidate not in initial:
                initial.append(candidate)
    if not initial:
        raise BudgetError(
            f"no config fits {budget / 2**30:.2f} GiB on `{profile.name}`; pick a larger profile"
        )

    journal = Journal(out / "journal.jsonl")
    executor = make_executor(
        job.executor,
        local=prepared.evaluator.evaluate,
        job=lambda: EvalWorkerJob(
            job.eval,
            budget_gb,
            None if prepared.bank is None else str(prepared.bank.root),
            str(prepared.loaded.path),
        ),
        device=prepared.device,
    )
    with executor:
        summary = _search_and_tune(
            job, out, prepared, executor, journal, memory, fix, initial, importance, on_event
        )
    return summary


def _search_and_tune(
    job: SearchJob,
    out: Path,
    prepared: Prepared,
    executor: Executor,
    journal: Journal,
    memory: Callable[[Config], int],
    fix: Callable[[Config], Config],
    initial: list[Config],
    importance: tuple[float, ...] | None,
    on_event: Callable[[SearchEvent], None] | None,
) -> dict[str, object]:
    """The search on ``executor``, final tuning in the driver, baselines, summary."""
    settings = job.search
    space, spec, profile = prepared.space, prepared.spec, prepared.profile
    budget = prepared.budget_bytes
    group = job.eval.group_size
    baselines = baseline_configs(space.n_units, space.bits, job.baseline_rank)
    fitting_all = [c for c in baselines.values() if memory(c) <= budget]
    fitting = [c for c in fitting_all if c.bits[0] in space.bits]  # seeds must lie in the space
    seeds = fitting if settings.seed_baselines else []
    evaluations = Evaluations(
        prepared.evaluator.evaluate,
        journal,
        lambda c: memory(c) <= budget,
        settings,
        on_event,
        executor=executor,
    )
    # The fitting baseline with the most bits (QLoRA-style uniform b-bit) anchors the
    # search at full length; see run_search.
    anchors = [max(seeds, key=lambda c: c.bits[0])] if seeds else []
    outcome = run_search(
        evaluations, space, initial, fix, budget, importance=importance, anchors=anchors,
        seed=job.eval.tune.seed,
    )  # fmt: skip
    write_json(out / "front.json", [r.to_json() for r in outcome.front])

    chosen = _chosen(outcome, job.alpha)
    config = Config.parse(chosen.config)
    breakdown = estimate_for_profile(spec, config, profile, group_size=group)
    write_json(
        out / "chosen.json",
        {
            "config": config.to_json(),
            "spec": str(config),
            "short": config.short(),
            "average_bits": config.average_bits(spec.unit_params),
            "predicted_memory": breakdown.to_json(),
            "budget_bytes": budget,
            "search_score": chosen.score,
        },
    )

    final_steps = settings.steps if job.final_steps is None else job.final_steps
    if on_event is not None:
        evaluations.emit("final", message=f"{config.short()} for {final_steps} steps")
    adapter = out / "adapter"
    staging = out / ".adapter.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    final = prepared.evaluator.evaluate(config, final_steps, save_adapter=staging)
    shutil.rmtree(adapter, ignore_errors=True)
    if staging.exists():
        os.replace(staging, adapter)

    reference: dict[str, dict[str, object]] = {}
    if job.baselines:
        unlimited = Evaluations(
            prepared.evaluator.evaluate,
            journal,
            lambda c: memory(c) <= budget,
            dataclasses.replace(settings, evals=10**9, time_limit=None),
            on_event,
            executor=executor,
        )
        labels = [label for label, base in baselines.items() if base in fitting_all]
        results = unlimited.many([(baselines[x], final_steps) for x in labels], "baseline")
        for label, result in zip(labels, results, strict=True):
            if result is None:
                log.warning("baseline %s failed on every attempt; left out of the summary", label)
            else:
                reference[label] = result.to_json()

    n_train = len(prepared.evaluator.batches)
    summary = {  # schema: edgeqra/schemas/summary.schema.json (bump the version on changes)
        "schema_version": 1,
        "profile": profile.name,
        "budget_bytes": budget,
        "budget_gib": budget / 2**30,
        "model": job.eval.model,
        "task": job.eval.task,
        "metric": final.metric,
        "device": prepared.device,
        "chosen": {
            "config": str(config),
            "short": config.short(),
            "average_bits": config.average_bits(spec.unit_params),
            "predicted_memory_bytes": breakdown.total,
            "fits": breakdown.total <= budget,
            "final": final.to_json(),
            "adapter": "adapter" if adapter.exists() else None,
        },
        "baselines": reference,
        "search": {
            **outcome.to_json(),
            "epochs": outcome.tuning_steps * job.eval.tune.batch_size / max(1, n_train),
        },
    }
    write_json(out / "summary.json", summary)
    return summary
