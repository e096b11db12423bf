"""Attach LoRA with one rank per unit and train it for N steps (N = the fidelity).

Step 2 of "Evaluation of one candidate" (METHOD.md). The plan is keyed by exact module
names (STYLE.md rule 4): ``target_modules`` is a full-match regex of the ``re.escape``'d
names of the targeted linears, the most common rank is ``r`` and every other rank goes into
``rank_pattern``/``alpha_pattern`` under its ``re.escape``'d full name. PEFT matches those keys
as ``(.*\\.)?(KEY)$`` (``get_pattern_key`` in peft ``utils/other.py``), so an escaped full name
only matches that module: ``model.layers.1.mlp.up_proj`` cannot catch
``model.layers.11.mlp.up_proj``. After attaching, every adapter's ``lora_A.weight.shape[0]``
is checked against the plan.

Schedule: linear warmup over ``warmup_steps``, then a constant learning rate. A constant
tail makes the run at fidelity N an exact prefix of the run at 2N (same data order, same
learning rates), so successive-halving rungs compare like with like; a cosine schedule
would change every step's learning rate with N.

Only module names are used to find the linears, so models whose projections are
GPTQModel ``QuantLinear`` layers work as PEFT supports them (its ``GPTQLoraLinear``).
:mod:`edgeqra.quantized_tune` builds such a model from a config: a real mixed-precision GPTQ
base (GPTQModel kernels, per-unit ``dynamic`` bits) with the per-unit adapters on top.
"""

from __future__ import annotations

import logging
import math
import re
import time
import warnings
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from edgeqra.device import model_device
from edgeqra.errors import ConfigError, DataError, ModelError
from edgeqra.gptq import import_gptqmodel
from edgeqra.models import Unit
from edgeqra.settings import setting
from edgeqra.space import Config

if TYPE_CHECKING:
    from peft import LoraConfig

__all__ = [
    "TARGETS",
    "TrainBatches",
    "TrainLog",
    "TuneSettings",
    "adapter_ranks",
    "attach_lora",
    "detach_lora",
    "lora_config",
    "train",
    "tune",
]

log = logging.getLogger(__name__)

TARGETS: tuple[str, ...] = (
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
)
"""Short names of the linears that get an adapter (attention and MLP projections)."""

IGNORE_INDEX = -100
_ADAPTER = "default"


def _is_int(value: object) -> bool:
    """A real int (bool excluded)."""
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value: object) -> bool:
    """A finite int or float (bool excluded)."""
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


@dataclass(frozen=True)
class TuneSettings:
    """How one candidate's adapters are trained; ``steps`` is the fidelity N."""

    steps: int = 0  # the fidelity N (0 = no training): set per evaluation, not a user setting
    lr: float = setting(2e-4, help="AdamW learning rate", key="tuning.lr")
    batch_size: int = setting(4, help="training micro-batch", key="tuning.batch_size")
    alpha_ratio: float = (
        2.0  # lora_alpha = alpha_ratio * rank: the scale alpha/r is equal on all units
    )
    dropout: float = 0.0
    weight_decay: float = 0.0
    warmup_steps: int = 0
    max_grad_norm: float = 1.0  # math.inf turns clipping off
    gradient_checkpointing: bool = setting(
        False,
        help="recompute activations in the backward pass (less memory, slower)",
        key="tuning.gradient_checkpointing",
    )
    seed: int = setting(
        0,
        help="seed of every random choice: data order, adapter init, calibration rows, search",
        key="seed",
    )

    def __post_init__(self) -> None:
        if not _is_int(self.steps) or self.steps < 0:
            raise ConfigError(
                f"`steps` must be an integer >= 0 (0 = no training), got {self.steps!r}"
            )
        if not _is_real(self.lr) or self.lr <= 0:
            raise ConfigError(f"`lr` must be a finite number > 0, got {self.lr!r}; try 2e-4")
        if not _is_int(self.batch_size) or self.batch_size < 1:
            raise ConfigError(f"`batch_size` must be an integer >= 1, got {self.batch_size!r}")
        if not _is_real(self.alpha_ratio) or self.alpha_ratio <= 0:
            raise ConfigError(
                f"`alpha_ratio` must be a finite number > 0 (lora_alpha = alpha_ratio * rank), "
                f"got {self.alpha_ratio!r}; try 2.0"
            )
        if not _is_real(self.dropout) or not 0 <= self.dropout < 1:
            raise ConfigError(f"`dropout` must be in [0, 1), got {self.dropout!r}")
        if not _is_real(self.weight_decay) or self.weight_decay < 0:
            raise ConfigError(
                f"`weight_decay` must be a finite number >= 0, got {self.weight_decay!r}"
            )
        if not _is_int(self.warmup_steps) or self.warmup_steps < 0:
            raise ConfigError(f"`warmup_steps` must be an integer >= 0, got {self.warmup_steps!r}")
        grad_norm_ok = isinstance(self.max_grad_norm, int | float) and not isinstance(
            self.max_grad_norm, bool
        )
        if not grad_norm_ok or math.isnan(self.max_grad_norm) or self.max_grad_norm <= 0:
            raise ConfigError(
                f"`max_grad_norm` must be > 0 (math.inf turns clipping off), got {self.max_grad_norm!r}"
            )
        if not isinstance(self.gradient_checkpointing, bool):
            raise ConfigError(
                f"`gradient_checkpointing` must be True or False, got {self.gradient_checkpointing!r}"
            )
        if not _is_int(self.seed) or self.seed < 0:
            raise ConfigError(f"`seed` must be an integer >= 0, got {self.seed!r}")
        if 0 < self.steps <= self.warmup_steps:
            warnings.warn(
                f"`warmup_steps`={self.warmup_steps} >= `steps`={self.steps}: the learning rate "
                "never reaches `lr`; lower `warmup_steps`",
                UserWarning,
                stacklevel=3,
            )


@dataclass(frozen=True, eq=False)
class TrainBatches:
    """Tokenised training rows; ``TrainBatches(*data.tokenize_examples(...))`` builds one.

    Args:
        input_ids: LongTensor (n, seq).
        labels: LongTensor (n, seq); the input id on completion tokens, -100 elsewhere
            (unshifted, as Hugging Face models take them).
        attention_mask: LongTensor (n, seq); 1 on real tokens, 0 on padding.
    """

    input_ids: torch.Tensor
    labels: torch.Tensor
    attention_mask: torch.Tensor

    def __post_init__(self) -> None:
        tensors = {
            "input_ids": self.input_ids,
            "labels": self.labels,
            "attention_mask": self.attention_mask,
        }
        for name, tensor in tensors.items():
            if (
                not isinstance(tensor, torch.Tensor)
                or tensor.dtype != torch.long
                or tensor.dim() != 2
            ):
                got = (
                    f"{tensor.dtype} tensor of shape {tuple(tensor.shape)}"
                    if isinstance(tensor, torch.Tensor)
                    else type(tensor).__name__
                )
                raise DataError(f"`{name}` must be a 2-D LongTensor (n, seq), got {got}")
        shapes = {name: tuple(t.shape) for name, t in tensors.items()}
        if len(set(shapes.values())) != 1:
            raise DataError(
                f"`input_ids`, `labels` and `attention_mask` must share one shape, got {shapes}"
            )
        n, seq = self.input_ids.shape
        if n == 0 or seq < 2:
            raise DataError(f"training batches need >= 1 row of >= 2 tokens, got shape {(n, seq)}")
        # A token is only predicted from position >= 1, hence labels[:, 1:].
        empty = (self.labels[:, 1:] == IGNORE_INDEX).all(dim=1).nonzero().flatten().tolist()
        if empty:
            raise DataError(
                f"training rows {empty[:10]} have no completion token to learn (labels all -100 "
                "after the first position); drop examples with an empty completion or raise `seq_len`"
            )

    def __len__(self) -> int:
        return self.input_ids.shape[0]


@dataclass(frozen=True)
class TrainLog:
    """What one training run did: the loss of every step, wall time, trainable parameters."""

    losses: tuple[float, ...]
    seconds: float
    trainable_params: int

    @property
    def diverged(self) -> bool:
        """True when a step's loss was not finite (training stopped there)."""
        return any(not math.isfinite(loss) for loss in self.losses)


# ---------------------------------------------------------------- the per-unit plan


def _plan(units: Sequence[Unit], config: Config) -> dict[str, int]:
    """Exact full module name -> rank for every targeted linear of every unit with rank > 0."""
    if len(config) != len(units):
        raise ConfigError(
            f"config has {len(config)} units but the model has {len(units)}; "
            f"give one `bits/rank` per decoder layer ({len(units)} items)"
        )
    plan: dict[str, int] = {}
    for unit, choice in zip(units, config, strict=True):
        if choice.rank < 0:
            raise ConfigError(f"unit {unit.index} has rank {choice.rank}; ranks must be >= 0")
        if choice.rank == 0:
            continue
        names = [lin.name for lin in unit.linears if lin.name.rsplit(".", 1)[-1] in TARGETS]
        if not names:
            raise ConfigError(
                f"unit {unit.index} (`{unit.name}`) has rank {choice.rank} but none of its linears "
                f"is named one of {list(TARGETS)}; give it rank 0"
            )
        plan.update(dict.fromkeys(names, choice.rank))
    return plan


def lora_config(units: Sequence[Unit], config: Config, settings: TuneSettings) -> LoraConfig | None:
    """PEFT ``LoraConfig`` for a config's per-unit ranks; None when every rank is 0.

    Args:
        units: the model's units (``models.find_units``), in config order.
        config: one (bits, rank) per unit; only ranks are read.
        settings: alpha ratio and dropout.
    """
    from peft import LoraConfig

    plan = _plan(units, config)
    if not plan:
        return None
    counts = Counter(plan.values())
    # Most common rank is `r` (fewest pattern entries); ties go to the larger rank.
    r = max(counts, key=lambda rank: (counts[rank], rank))
    others = {name: rank for name, rank in plan.items() if rank != r}
    return LoraConfig(
        r=r,
        lora_alpha=settings.alpha_ratio * r,
        lora_dropout=settings.dropout,
        target_modules="(?:" + "|".join(re.escape(name) for name in plan) + ")",
        rank_pattern={re.escape(name): rank for name, rank in others.items()},
        alpha_pattern={
            re.escape(name): settings.alpha_ratio * rank for name, rank in others.items()
        },
        bias="none",
        task_type="CAUSAL_LM",
    )


@contextmanager
def _seeded(device: torch.device, seed: int) -> Iterator[None]:
    """Seed the CPU RNG (and the model's GPU's) inside a fork; global state is restored after."""
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.random.default_generator.manual_seed(seed)
        for index in devices:  # only the model's GPU, not every visible one
            torch.cuda.default_generators[index].manual_seed(seed)
        yield


def attach_lora(
    model: nn.Module, units: Sequence[Unit], config: Config, settings: TuneSettings
) -> nn.Module:
    """Wrap ``model`` in a PeftModel with the config's per-unit ranks; freeze everything else.

    The adapters' random init is seeded by ``settings.seed`` inside a forked RNG, so the
    global RNG state is untouched. When every rank is 0 the model comes back unwrapped,
    with all its parameters frozen. The model is modified in place (PEFT swaps its linears);
    ``detach_lora`` restores it.

    Args:
        model: a causal LM whose linears are ``nn.Linear`` or GPTQModel ``QuantLinear``.
        units: its units (``models.find_units`` of the dense model: names are what matters).
        config: one (bits, rank) per unit.
        settings: seed, alpha ratio, dropout.
    """
    import_gptqmodel()
    from peft import get_peft_model

    peft_config = lora_config(units, config, settings)
    if peft_config is None:
        model.requires_grad_(False)
        log.debug("every rank is 0: no adapter attached")
        return model
    plan = _plan(units, config)
    with _seeded(model_device(model), settings.seed):
        with warnings.catch_warnings():
            # peft 0.21 reads transformers' deprecated `is_gradient_checkpointing`.
            warnings.filterwarnings("ignore", ".*is_gradient_checkpointing", FutureWarning)
            # autocast_adapter_dtype (the default) keeps adapters fp32 on a bf16/fp16 base.
            try:
                peft_model = get_peft_model(model, peft_config, autocast_adapter_dtype=True)
            except ValueError as exc:  # e.g. "Target modules ... not found in the base model"
                raise ModelError(
                    f"cannot attach LoRA: {exc}; check that the units were found on this very model"
                ) from exc
    got = adapter_ranks(peft_model)
    if got != plan:
        peft_model.unload()  # leave the caller's model as it was
        wrong = sorted(
            f"{name}: wanted {plan.get(name, 0)}, got {got.get(name, 0)}"
            for name in set(plan) | set(got)
            if plan.get(name, 0) != got.get(name, 0)
        )
        raise ModelError(
            f"PEFT attached adapters that differ from the plan ({len(wrong)} modules): "
            f"{wrong[:5]}; check that the units were found on this very model"
        )
    return peft_model


def adapter_ranks(model: nn.Module) -> dict[str, int]:
    """Full base-module name -> LoRA rank (``lora_A.weight.shape[0]``); {} without adapters."""
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer

    base = model.get_base_model() if isinstance(model, PeftModel) else model
    ranks: dict[str, int] = {}
    for name, module in base.named_modules():
        if isinstance(module, LoraLayer) and _ADAPTER in module.lora_A:
            ranks[name] = module.lora_A[_ADAPTER].weight.shape[0]
    return ranks


def detach_lora(model: nn.Module) -> nn.Module:
    """Remove the adapters without merging and return the base model, in eval mode.

    PEFT's ``unload()`` puts the original linear modules (the very same objects) back, so
    the base gives the logits it gave before ``attach_lora``. Its parameters stay frozen.
    """
    from peft import PeftModel

    if isinstance(model, PeftModel):
        model = model.unload()
    return model.eval()


# ---------------------------------------------------------------- training


def _row_order(n_rows: int, n_needed: int, seed: int) -> torch.Tensor:
    """The first ``n_needed`` rows of a stream of seeded permutations of ``range(n_rows)``.

    Depends only on (n_rows, seed), never on the config or N: step i takes
    ``order[i*bs:(i+1)*bs]`` and a shorter run is a prefix of a longer one.
    """
    generator = torch.Generator().manual_seed(seed)
    epochs = -(-n_needed // n_rows)  # ceil
    order = torch.cat([torch.randperm(n_rows, generator=generator) for _ in range(epochs)])
    return order[:n_needed]


def _completion_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over the tokens whose label is not -100.

    Args:
        logits: (batch, seq, vocab), any float dtype (computed in fp32).
        labels: (batch, seq), unshifted.
    """
    logits = logits[:, :-1, :].float()  # (batch, seq-1, vocab): position t predicts t+1
    targets = labels[:, 1:]  # (batch, seq-1)
    total = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]),  # (batch*(seq-1), vocab)
        targets.reshape(-1),  # (batch*(seq-1),)
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )
    return total / (targets != IGNORE_INDEX).sum().clamp(min=1)


def _learning_rate(step: int, settings: TuneSettings) -> float:
    """Linear warmup from lr/warmup to lr over ``warmup_steps``, then constant."""
    if step < settings.warmup_steps:
        return settings.lr * (step + 1) / settings.warmup_steps
    return settings.lr


def _checkpointing_on(model: nn.Module) -> bool:
    """Whether activation (gradient) checkpointing is on, without deprecated accessors."""
    return any(getattr(m, "gradient_checkpointing", False) is True for m in model.modules())


def _set_checkpointing(model: nn.Module, on: bool) -> None:
    """Turn activation checkpointing on or off (transformers 5.2x renamed the methods)."""
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise ModelError(
            f"`{type(model).__name__}` does not support gradient checkpointing; "
            "set `gradient_checkpointing=False`"
        )
    # Non-reentrant checkpointing needs no input grads with a frozen embedding.
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        if on:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.activation_checkpointing_disable()
    elif on:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_disable()


def _batch_width(mask: torch.Tensor) -> int:
    """Columns a right-padded batch needs: its longest row (at least 2, for one target)."""
    return max(2, int(mask.sum(dim=1).max()))


def train(
    model: nn.Module, batches: TrainBatches, settings: TuneSettings, *, progress: bool = False
) -> TrainLog:
    """Train the model's trainable parameters for ``settings.steps`` AdamW steps.

    Runs on the model's device in ``train()`` mode and leaves it in ``eval()``. The data
    order and dropout are seeded by ``settings.seed`` inside a forked RNG (the global RNG
    is untouched). A non-finite loss stops training (``TrainLog.diverged``).

    Args:
        model: usually ``attach_lora``'s PeftModel; only parameters with requires_grad train.
        batches: rows (n, seq); step i uses rows ``order[i*bs:(i+1)*bs]`` (see ``_row_order``).
        settings: steps, optimiser and schedule.
        progress: show a rich progress bar (off for the search loop).
    """
    params = [p for p in model.parameters() if p.requires_grad]
    n_trainable = sum(p.numel() for p in params)
    if settings.steps == 0 or not params:
        if settings.steps and not params:
            log.info("no trainable parameters (every rank 0): skipping %d steps", settings.steps)
        model.eval()
        return TrainLog((), 0.0, n_trainable)

    device = model_device(model)
    bs = settings.batch_size
    order = _row_order(len(batches), settings.steps * bs, settings.seed)
    optimizer = torch.optim.AdamW(
        params, lr=settings.lr, weight_decay=settings.weight_decay, betas=(0.9, 0.999)
    )
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    switch_checkpointing = settings.gradient_checkpointing and not _checkpointing_on(base)
    if switch_checkpointing:
        _set_checkpointing(base, True)

    bar = None
    if progress:
        from rich.progress import Progress

        bar = Progress(transient=True)
        task = bar.add_task("LoRA", total=settings.steps)
        bar.start()
    losses: list[float] = []
    start = time.perf_counter()
    try:
        with _seeded(device, settings.seed):  # dropout masks
            model.train()
            for step in range(settings.steps):
                rows = order[step * bs : (step + 1) * bs]  # (bs,)
                # Trimmed to the batch's longest row: rows are right-padded and attention is
                # causal, so the columns cut carry only padding (-100 labels) and change no
                # real position's logits; on a CPU the step costs what its tokens do.
                mask = batches.attention_mask[rows]  # (bs, seq)
                width = _batch_width(mask)
                input_ids = batches.input_ids[rows, :width].to(device, non_blocking=True)
                labels = batches.labels[rows, :width].to(device, non_blocking=True)
                mask = mask[:, :width].to(device, non_blocking=True)  # (bs, width)
                for group in optimizer.param_groups:
                    group["lr"] = _learning_rate(step, settings)
                logits = model(input_ids=input_ids, attention_mask=mask, use_cache=False).logits
                loss = _completion_loss(logits, labels)
                value = float(loss.detach())
                losses.append(value)
                if not math.isfinite(value):
                    log.warning(
                        "LoRA loss is %s at step %d of %d: stopping; the quantized base may be "
                        "broken at this bit-width, or lower `lr`",
                        value,
                        step,
                        settings.steps,
                    )
                    break
                loss.backward()
                if math.isfinite(settings.max_grad_norm):
                    torch.nn.utils.clip_grad_norm_(params, settings.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                log.debug("step %d loss %.4f", step, value)
                if bar is not None:
                    bar.update(task, advance=1, description=f"LoRA loss {value:.3f}")
            if device.type == "cuda":
                torch.cuda.synchronize(device)
    finally:
        seconds = time.perf_counter() - start
        optimizer.zero_grad(set_to_none=True)
        if switch_checkpointing:
            _set_checkpointing(base, False)
        model.eval()
        if bar is not None:
            bar.stop()
    log.info(
        "trained %d steps in %.2fs (%.1f ms/step), loss %.4f -> %.4f",
        len(losses),
        seconds,
        1000 * seconds / max(len(losses), 1),
        losses[0],
        losses[-1],
    )
    return TrainLog(tuple(losses), seconds, n_trainable)


def tune(
    model: nn.Module,
    units: Sequence[Unit],
    config: Config,
    batches: TrainBatches,
    settings: TuneSettings,
    *,
    progress: bool = False,
) -> tuple[nn.Module, TrainLog]:
    """Attach the config's adapters and train them: ``attach_lora`` then ``train``.

    Returns:
        the PeftModel (or the frozen model when every rank is 0) in eval mode, and the log.
    """
    tuned = attach_lora(model, units, config, settings)
    return tuned, train(tuned, batches, settings, progress=progress)
