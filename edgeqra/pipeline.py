"""Runs the stages for one job, in order; the only module that knows that order.

Today: model -> data -> calibration -> bank -> Evaluator, for ``edgeqra evaluate`` and the
benchmarks. The search stages (issue: joint search) plug in after ``prepare``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from edgeqra.bank import Bank, BankSpec, build_bank
from edgeqra.data import calibration_batches, load_task
from edgeqra.errors import ConfigError
from edgeqra.evaluate import EvalSettings, Evaluator
from edgeqra.memory import ModelSpec, estimate, estimate_for_profile
from edgeqra.models import LoadedModel, load_model
from edgeqra.profiles import BudgetMode, DeviceProfile, FinetuneWorkload, load_profile
from edgeqra.space import DEFAULT_BITS, DEFAULT_RANKS, FP16_BITS, Config, SearchSpace
from edgeqra.tune import TuneSettings

__all__ = ["EvalJob", "Prepared", "baseline_configs", "prepare", "resolve_device"]

log = logging.getLogger(__name__)


def resolve_device(device: str) -> str:
    """``auto`` -> cuda when available, else cpu; anything else is checked."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"`device` is {device!r} but no CUDA GPU is visible; use `cpu` or `auto`")
    if device != "cpu" and not device.startswith("cuda"):
        raise ConfigError(f"`device` {device!r} is not one of auto, cpu, cuda[:N]")
    return device


@dataclass(frozen=True)
class EvalJob:
    """Everything that fixes an evaluation: model, data, bank and tuning settings."""

    model: str = "smollm2"
    task: str = "arc_easy"
    bits: tuple[int, ...] = DEFAULT_BITS  # the search space Q (the bank is built for what is used)
    ranks: tuple[int, ...] = DEFAULT_RANKS
    group_size: int = 64
    calibration: str = "c4"
    calib_samples: int = 32  # GPTQModel wants >= 256 for best quality; 32 keeps CPU builds short
    calib_seq_len: int = 256
    tune: TuneSettings = field(default_factory=lambda: TuneSettings(steps=0))
    eval: EvalSettings = field(default_factory=EvalSettings)
    device: str = "auto"
    profile: str | None = None
    trust_remote_code: bool = False


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


def baseline_configs(n_units: int, bits: tuple[int, ...], rank: int) -> dict[str, Config]:
    """FP16 LoRA and uniform b-bit GPTQ (QLoRA-style) at one rank, by label."""
    out = {"FP16 LoRA": Config.uniform(n_units, FP16_BITS, rank)}
    out.update(
        {f"GPTQ {b}-bit": Config.uniform(n_units, b, rank) for b in sorted(bits, reverse=True)}
    )
    return out


def _memory_fn(spec: ModelSpec, job: EvalJob, profile: DeviceProfile | None):
    """Predicted bytes (and fit) of a config: the profile's budget, else the tuning workload."""
    if profile is not None:

        def with_profile(config: Config) -> tuple[int, bool | None]:
            b = estimate_for_profile(spec, config, profile, group_size=job.group_size)
            return b.total, b.fits(profile.budget_bytes)

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
    progress: bool = True,
) -> Prepared:
    """Load the model and data, build (or reuse) the bank for ``needed_bits``, make the evaluator.

    Args:
        job: the evaluation settings.
        needed_bits: bit-widths the bank must hold (default: all of ``job.bits``); an
            FP16-only evaluation passes ``()`` and builds no bank.
        progress: rich progress bars for the bank build.
    """
    device = resolve_device(job.device)
    profile = load_profile(job.profile) if job.profile else None
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    loaded = load_model(
        job.model, dtype=dtype, device=device, trust_remote_code=job.trust_remote_code
    )
    space = SearchSpace(len(loaded.units), job.bits, job.ranks)
    task = load_task(job.task, seed=job.tune.seed, n_train=job.eval.n_train, n_eval=job.eval.n_eval)
    bits = tuple(sorted(set(job.bits if needed_bits is None else needed_bits)))
    bank = None
    if bits:
        calibration = calibration_batches(
            loaded.tokenizer,
            job.calibration,
            n_samples=job.calib_samples,
            seq_len=job.calib_seq_len,
            seed=job.tune.seed,
        )
        bank = build_bank(
            loaded.path,
            loaded.units,
            calibration,
            BankSpec(bits=bits, group_size=job.group_size, seed=job.tune.seed),
            progress=progress,
            device=device,
        )
    spec = ModelSpec.from_model(loaded.model)
    evaluator = Evaluator(
        loaded,
        task,
        bank,
        job.tune,
        job.eval,
        memory=_memory_fn(spec, job, profile),
        progress=progress,
    )
    return Prepared(evaluator, loaded, spec, space, bank, profile, device)
