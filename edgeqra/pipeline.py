"""Runs the stages for one job, in order; the only module that knows that order.

``prepare``: model -> data -> calibration -> bank -> Evaluator (``edgeqra evaluate``, the
benchmarks). A job with a ``[prune]`` table is pruned first (:func:`prune_stage`, called by
:func:`open_run_dir`): the run directory gets ``pruned/`` and its job names that folder as
the model, so every later stage (bank, search, export, resume) sees an ordinary model.
``run_search_job``: prepare -> sensitivity (stage 1) -> evolution and Bayesian refinement
(stages 2-3, :mod:`edgeqra.search`) -> full-length tuning of the chosen config -> summary,
all inside one run directory whose journal makes the whole job resumable.

The jobs themselves (:class:`EvalJob`, :class:`SearchJob`) live in :mod:`edgeqra.jobs` and
the run directory's files in :mod:`edgeqra.rundir`, which this module writes through; both
are re-exported here, as is :func:`write_json`.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from edgeqra.bank import Bank, BankSpec, bank_key, build_bank
from edgeqra.data import calibration_batches, load_task
from edgeqra.device import resolve_device
from edgeqra.errors import BudgetError, ConfigError
from edgeqra.evaluate import Evaluator
from edgeqra.jobs import EvalJob, SearchJob
from edgeqra.memory import ModelSpec, config_bytes, estimate, estimate_for_profile
from edgeqra.models import LoadedModel, cache_dir, load_model, resolve_model
from edgeqra.plan import budget_for_bits
from edgeqra.profiles import BudgetMode, DeviceProfile, FinetuneWorkload, load_profile
from edgeqra.prune import PruneSettings
from edgeqra.result import Result
from edgeqra.rundir import ADAPTER, SUMMARY_VERSION, RunFiles, write_json
from edgeqra.search.driver import Evaluations, SearchEvent, SearchOutcome, run_search
from edgeqra.search.executors import Executor, check_available, make_executor
from edgeqra.search.journal import Journal
from edgeqra.sensitivity import initial_population, measure_sensitivity, seed_config
from edgeqra.space import FP16_BITS, Config, SearchSpace, fill, repair

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
    files = RunFiles(out)
    if resume:
        return files.read_job()
    if job is None:
        raise ConfigError("internal error: a new run needs a job")
    files.check_new()
    if prune is not None:  # before anything is written: a bad [prune] leaves no run directory
        folder = prune_stage(
            job.eval.model, prune, out / PRUNED_DIR, device=job.eval.device,
            trust_remote_code=job.eval.trust_remote_code,
        )  # fmt: skip
        job = dataclasses.replace(job, eval=dataclasses.replace(job.eval, model=str(folder)))
    RunFiles.create(out, job)
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

    memory = config_bytes(spec, profile, group_size=group)
    importance: tuple[float, ...] | None = None
    if settings.sensitivity and prepared.bank is not None:
        sens = measure_sensitivity(
            prepared.loaded,
            prepared.bank,
            prepared.calibration,
            cache_dir=cache_dir() / "sensitivity",
            progress=progress,
        )
        RunFiles(out).write_sensitivity(sens.to_json())
        importance = sens.importance()

    def fix(config: Config) -> Config:
        fitted = repair(config, space, memory, budget, importance)
        return fill(fitted, space, memory, budget, importance) if settings.fill else fitted

    rng = random.Random(job.eval.tune.seed)
    baselines = baseline_configs(space.n_units, space.bits, job.baseline_rank)
    fitting_all = [c for c in baselines.values() if memory(c) <= budget]
    fitting = [c for c in fitting_all if c.bits[0] in space.bits]  # seeds must lie in the space
    seeds = _ceiling_seeds(baselines, space, memory, budget, importance, settings.fill)
    seeds = [*seeds, *sorted(fitting, key=lambda c: -c.bits[0])] if settings.seed_baselines else []
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

    journal = RunFiles(out).open_journal()
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


def _ceiling_seeds(
    baselines: dict[str, Config],
    space: SearchSpace,
    memory: Callable[[Config], int],
    budget: int,
    importance: Sequence[float] | None,
    fill_up: bool,
) -> list[Config]:
    """Each uniform baseline over the budget, brought into it by dropping adapters only.

    Keeps every unit's bits and lowers the ranks of the least important units until the
    config fits (then fills what is left): the joint space's own trade, bits bought with
    adapters. On SmolLM2 at the Orin Nano's workload an adapter costs more memory (its fp32
    input copy saved for backward) than a layer's step from 4 to 8 bits, so at a 3.5-bit
    budget 8-bit everywhere with a few adapter-free layers fits; the plain repair, which may
    also lower bits, reaches 2-bit layers first (issue 20). Most bits first; a baseline
    that does not fit even without any adapter is left out.
    """
    out = []
    over = [c for c in baselines.values() if c.bits[0] in space.bits and memory(c) > budget]
    for config in sorted(over, key=lambda c: -c.bits[0]):
        try:
            fitted = repair(config, space, memory, budget, importance, fields=("rank",))
        except BudgetError:
            continue
        out.append(fill(fitted, space, memory, budget, importance) if fill_up else fitted)
    return out


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
    files = RunFiles(out)
    files.write_front(outcome.front)

    chosen = _chosen(outcome, job.alpha)
    config = Config.parse(chosen.config)
    breakdown = estimate_for_profile(spec, config, profile, group_size=group)
    files.write_chosen(
        {
            "config": config.to_json(),
            "spec": str(config),
            "short": config.short(),
            "average_bits": config.average_bits(spec.unit_params),
            "predicted_memory": breakdown.to_json(),
            "budget_bytes": budget,
            "search_score": chosen.score,
        }
    )

    final_steps = settings.steps if job.final_steps is None else job.final_steps
    if on_event is not None:
        evaluations.emit("final", message=f"{config.short()} for {final_steps} steps")
    staging = files.adapter_staging()
    final = prepared.evaluator.evaluate(config, final_steps, save_adapter=staging)
    adapter = files.install_adapter()

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
        "schema_version": SUMMARY_VERSION,
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
            "adapter": None if adapter is None else ADAPTER,
        },
        "baselines": reference,
        "search": {
            **outcome.to_json(),
            # The whole search's cost: a resumed run's journal holds the steps run before the
            # interruption too (counting only this process's steps undercounted issue 20's
            # resumed searches, 0.03 epochs for a 0.44-epoch search).
            "epochs": journal.search_steps() * job.eval.tune.batch_size / max(1, n_train),
        },
    }
    files.write_summary(summary)
    return summary
