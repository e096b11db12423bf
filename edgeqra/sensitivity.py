"""Stage 1 of the search: per-unit sensitivity scores, the seed config and the first population.

Two scores per unit, both measured once on calibration tokens (METHOD.md, stage 1):

* KL sensitivity (QR-Adaptor v2): mean over calibration tokens of
  KL(p(y|x; W_fp) ‖ p(y|x; W with only unit l at the bank's lowest bit-width));
* Fisher saliency (QR-Adaptor v1 table 6, AutoQRA's importance priors):
  Σ (∂L/∂W ⊙ W)² over the unit's linear weights, L the LM loss of each calibration batch.

Both are min-max normalised and mixed into one importance in [0, 1]; the seed config gives
more bits and rank to more important units (QR-Adaptor Algorithm 3) and the initial
population is repaired perturbations of it plus the uniform baselines that already fit.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import random
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from edgeqra.bank import Bank
from edgeqra.device import eval_mode, model_device
from edgeqra.errors import ConfigError, DataError, EdgeQRAError
from edgeqra.models import LoadedModel, Unit
from edgeqra.space import FP16_BITS, Choice, Config, SearchSpace

__all__ = ["Sensitivity", "initial_population", "measure_sensitivity", "seed_config"]

log = logging.getLogger(__name__)

_CACHE_FORMAT = 1  # bump when the measurement changes, so old cache files are not reused
_MUTATION_RATE = 0.1  # per-unit proximity mutation probability (METHOD.md, stage 2)


@dataclass(frozen=True)
class Sensitivity:
    """Per-unit KL and Fisher sensitivity, in unit order; the search's importance prior."""

    kl: tuple[float, ...]  # mean token KL(p_fp ‖ p_unit_at_lowest_bits)
    fisher: tuple[float, ...]  # Σ over calibration batches and unit weights of (dL/dW ⊙ W)²
    lowest_bits: int

    def __post_init__(self) -> None:
        kl = tuple(float(v) for v in self.kl)
        fisher = tuple(float(v) for v in self.fisher)
        if not kl or len(kl) != len(fisher):
            raise ConfigError(
                f"sensitivity needs one `kl` and one `fisher` score per unit; got {len(kl)} "
                f"and {len(fisher)}: re-run measure_sensitivity"
            )
        bad = [v for v in kl + fisher if not math.isfinite(v) or v < 0]
        if bad:
            raise ConfigError(
                f"sensitivity scores must be finite and >= 0, got {bad[:3]}; the model's "
                "forward pass produced NaN/inf: check the model and calibration data"
            )
        object.__setattr__(self, "kl", kl)
        object.__setattr__(self, "fisher", fisher)
        object.__setattr__(self, "lowest_bits", int(self.lowest_bits))

    def importance(self, kl_weight: float = 0.5) -> tuple[float, ...]:
        """Per-unit importance in [0, 1]: ``kl_weight``·norm(KL) + (1 − kl_weight)·norm(Fisher).

        Each score is min-max normalised first (all equal → 0.5), so the two scales mix.
        """
        if not 0.0 <= kl_weight <= 1.0:
            raise ConfigError(f"`kl_weight` must be in [0, 1], got {kl_weight}")
        kl, fisher = _minmax(self.kl), _minmax(self.fisher)
        return tuple(kl_weight * k + (1.0 - kl_weight) * f for k, f in zip(kl, fisher, strict=True))

    def to_json(self) -> dict:
        """JSON-ready ``{"kl": [...], "fisher": [...], "lowest_bits": b}``."""
        return {"kl": list(self.kl), "fisher": list(self.fisher), "lowest_bits": self.lowest_bits}

    @classmethod
    def from_json(cls, data: dict) -> Sensitivity:
        """Inverse of :meth:`to_json`."""
        try:
            return cls(tuple(data["kl"]), tuple(data["fisher"]), int(data["lowest_bits"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(
                f"sensitivity JSON needs `kl`, `fisher` (lists of numbers) and `lowest_bits`; "
                f"got keys {sorted(data) if isinstance(data, dict) else type(data).__name__} "
                f"({exc}); re-run measure_sensitivity"
            ) from exc


def _minmax(values: Sequence[float]) -> tuple[float, ...]:
    """Min-max normalise to [0, 1]; all equal → 0.5 (no unit stands out)."""
    low, high = min(values), max(values)
    if high - low <= 0.0:
        return tuple(0.5 for _ in values)
    return tuple((v - low) / (high - low) for v in values)


# ---------------------------------------------------------------- measurement


def _unit_weights(model: nn.Module, unit: Unit) -> list[nn.Parameter]:
    """The weight parameters of a unit's linears, in ``unit.linears`` order."""
    return [model.get_submodule(lin.name).weight for lin in unit.linears]


@torch.no_grad()
def _load_unit(model: nn.Module, unit: Unit, tensors: dict[str, torch.Tensor]) -> None:
    """Copy ``tensors`` (by module name) into a unit's linear weights, as Bank.assemble does."""
    for lin in unit.linears:
        weight = model.get_submodule(lin.name).weight
        weight.copy_(tensors[lin.name].to(device=weight.device, dtype=weight.dtype))


def _log_probs(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    """Float32 next-token log-probabilities, (batch, seq, vocab)."""
    logits = model(input_ids=batch, use_cache=False).logits  # (batch, seq, vocab)
    return F.log_softmax(logits.float(), dim=-1)


def _token_kl(ref: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """KL(p_ref ‖ p_other) per token from log-probabilities (..., vocab) → (...), clamped ≥ 0."""
    return (ref.exp() * (ref - other)).sum(-1).clamp_min(0.0)


@contextlib.contextmanager
def _recording(layers: Sequence[nn.Module]) -> Iterator[list[object]]:
    """The outputs of ``layers``, in the order they run, for the forwards inside the block."""
    outputs: list[object] = []
    hooks = [
        layer.register_forward_hook(lambda _m, _i, out: outputs.append(out)) for layer in layers
    ]
    try:
        yield outputs
    finally:
        for hook in hooks:
            hook.remove()


@contextlib.contextmanager
def _replayed(layers: Sequence[nn.Module], outputs: Sequence[object]) -> Iterator[None]:
    """Each of ``layers`` returns its recorded output instead of computing it.

    With only unit l changed, every layer before it computes exactly what the reference
    forward computed; replaying those outputs skips about half of the layer work of the
    KL pass and changes no number (tensors are cloned, so in-place use downstream is safe).
    """

    def replay(output: object):
        def forward(*args: object, **kwargs: object) -> object:
            if isinstance(output, torch.Tensor):
                return output.clone()
            if isinstance(output, tuple):
                return tuple(o.clone() if isinstance(o, torch.Tensor) else o for o in output)
            return output

        return forward

    for layer, output in zip(layers, outputs, strict=True):
        layer.forward = replay(output)  # instance attribute: shadows the class method
    try:
        yield
    finally:
        for layer in layers:
            del layer.forward


@torch.no_grad()
def _kl_scores(
    model: nn.Module,
    units: Sequence[Unit],
    low_weights: Callable[[Unit], dict[str, torch.Tensor]],
    batches: Sequence[torch.Tensor],
    advance: Callable[[float], None],
) -> list[float]:
    """Mean token KL(p_fp ‖ p with only unit l at ``low_weights(l)``) for every unit l.

    The model must hold its original weights. Batches are the outer loop so the reference
    log-probabilities of one batch are computed once and never all held at once (for a
    49k vocabulary they would be gigabytes); only unit l is swapped in and back, which is
    the config "unit l low, every other unit 16-bit" without re-assembling the model. The
    units before l replay the reference forward's outputs (``_replayed``): units are decoder
    layers, run in order.
    """
    layers = [model.get_submodule(unit.name) for unit in units]
    sums = [0.0] * len(units)
    tokens = 0
    for batch in batches:  # (batch, seq)
        with _recording(layers) as recorded:
            ref = _log_probs(model, batch)  # (batch, seq, vocab)
        replay = len(recorded) == len(layers)  # each unit ran once, in order: safe to replay
        for position, unit in enumerate(units):
            saved = {
                lin.name: w.detach().clone()
                for lin, w in zip(unit.linears, _unit_weights(model, unit), strict=True)
            }
            _load_unit(model, unit, low_weights(unit))
            earlier = (layers[:position], recorded[:position]) if replay else ((), ())
            try:
                with _replayed(*earlier):
                    sums[position] += float(_token_kl(ref, _log_probs(model, batch)).sum())
            finally:
                _load_unit(model, unit, saved)  # bit-identical: a copy of the clone
            advance(1.0 / len(batches))
        del recorded
        tokens += batch.numel()
    return [s / tokens for s in sums]


def _fisher_scores(
    model: nn.Module,
    units: Sequence[Unit],
    batches: Sequence[torch.Tensor],
    advance: Callable[[float], None],
) -> list[float]:
    """Σ over batches and each unit's linear weights of (∂L/∂W ⊙ W)², L the batch's LM loss.

    Gradients are taken with ``torch.autograd.grad`` on the unit weights only, so no
    ``.grad`` is written and every other parameter's ``requires_grad`` is off meanwhile
    (no memory for their gradients); all flags are restored afterwards.
    """
    weights = [_unit_weights(model, unit) for unit in units]
    flat = [w for ws in weights for w in ws]
    params = list(model.parameters())
    flags = [p.requires_grad for p in params]
    sums = [0.0] * len(units)
    try:
        for p in params:
            p.requires_grad_(False)
        for w in flat:
            w.requires_grad_(True)
        with torch.enable_grad():
            for batch in batches:  # (batch, seq)
                loss = model(input_ids=batch, labels=batch, use_cache=False).loss
                grads = torch.autograd.grad(loss, flat)
                start = 0
                for position, ws in enumerate(weights):
                    for w, g in zip(ws, grads[start : start + len(ws)], strict=True):
                        sums[position] += float((g.float() * w.detach().float()).pow(2).sum())
                    start += len(ws)
                advance(1.0)
    finally:
        for p, flag in zip(params, flags, strict=True):
            p.requires_grad_(flag)
    return sums


def _cache_path(
    cache_dir: Path, bank: Bank, calibration: torch.Tensor, batch_size: int, model: nn.Module
) -> Path:
    """One JSON file per (bank, calibration tokens, lowest bits, batch size, dtype)."""
    digest = hashlib.sha256()
    digest.update(str(list(calibration.shape)).encode())
    digest.update(calibration.to(torch.int64).contiguous().cpu().numpy().tobytes())
    dtype = next((str(p.dtype) for p in model.parameters()), "?")
    options = {
        "format": _CACHE_FORMAT,
        "lowest_bits": min(bank.spec.bits),
        "batch_size": batch_size,  # Fisher sums per-batch gradients
        "dtype": dtype,
        "units": len(bank.units),
    }
    digest.update(json.dumps(options, sort_keys=True).encode())
    return Path(cache_dir) / f"sensitivity-{bank.root.name}-{digest.hexdigest()[:16]}.json"


def _read_cache(path: Path) -> Sensitivity | None:
    """The cached scores, or None when the file is missing or unreadable (then recompute)."""
    if not path.is_file():
        return None
    try:
        return Sensitivity.from_json(json.loads(path.read_text()))
    except (OSError, ValueError, EdgeQRAError) as exc:
        log.warning("ignoring unreadable sensitivity cache %s: %s", path, exc)
        return None


def _write_cache(path: Path, result: Sensitivity) -> None:
    """Write atomically (temp file + rename) so a crash never leaves half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result.to_json(), indent=2))
    tmp.replace(path)


def _check_inputs(
    loaded: LoadedModel, bank: Bank, calibration: torch.Tensor, batch_size: int
) -> None:
    """Raise on what a caller can get wrong, naming the value."""
    if (
        not isinstance(calibration, torch.Tensor)
        or calibration.dim() != 2
        or calibration.numel() == 0
    ):
        shape = (
            list(calibration.shape)
            if isinstance(calibration, torch.Tensor)
            else type(calibration).__name__
        )
        raise DataError(
            f"`calibration` must be a non-empty (n_samples, seq_len) tensor of token ids, got "
            f"{shape}; build it with data.calibration_batches"
        )
    if calibration.dtype.is_floating_point or calibration.dtype == torch.bool:
        raise DataError(f"`calibration` must hold integer token ids, got dtype {calibration.dtype}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"`batch_size` must be a positive integer, got {batch_size!r}")
    if len(bank.units) != len(loaded.units):
        raise ConfigError(
            f"the bank has {len(bank.units)} units but the model has {len(loaded.units)}; "
            "build the bank for this model (build_bank with loaded.units)"
        )


def measure_sensitivity(
    loaded: LoadedModel,
    bank: Bank,
    calibration: torch.Tensor,
    *,
    batch_size: int = 4,
    cache_dir: Path | None = None,
    progress: bool = True,
) -> Sensitivity:
    """KL and Fisher sensitivity of every unit, measured on calibration tokens (or cached).

    Call it on the unquantized model, or on any model whose bank already remembers its
    originals (``bank.remember_originals``): the model is assembled at 16 bits first and is
    left with its original weights, in its own train/eval mode, with ``requires_grad``
    flags and ``.grad`` untouched.

    Args:
        loaded: the model and its units.
        bank: GPTQ bank; its lowest bit-width (``min(bank.spec.bits)``) is the KL probe.
        calibration: (n_samples, seq_len) token ids (``data.calibration_batches``).
        batch_size: calibration rows per forward pass (Fisher sums per-batch gradients,
            so it is part of the cache key).
        cache_dir: folder for a JSON cache keyed by the bank and the calibration tokens.
        progress: show a rich progress bar on stderr.
    """
    _check_inputs(loaded, bank, calibration, batch_size)
    model = loaded.model
    path = _cache_path(cache_dir, bank, calibration, batch_size, model) if cache_dir else None
    if path is not None and (cached := _read_cache(path)) is not None:
        log.info("sensitivity cache hit: %s", path)
        return cached
    units = bank.units
    lowest = min(bank.spec.bits)
    originals = Config.uniform(len(units), FP16_BITS, 0)
    try:
        bank.assemble(model, originals)
    except ConfigError:  # originals not remembered yet: the model is the unquantized one
        bank.remember_originals(model)
    device = model_device(model)
    batches = [b.to(device) for b in calibration.to(torch.long).split(batch_size)]  # (≤batch, seq)

    from rich.console import Console
    from rich.progress import Progress, TimeElapsedColumn

    with (
        Progress(
            *Progress.get_default_columns(),
            TimeElapsedColumn(),
            console=Console(file=sys.stderr),
            disable=not progress,
            transient=True,
        ) as bar,
        eval_mode(model),
    ):
        kl_task = bar.add_task(f"KL sensitivity ({lowest}-bit, units)", total=len(units))
        fisher_task = bar.add_task("Fisher saliency (batches)", total=len(batches))
        try:
            kl = _kl_scores(
                model,
                units,
                lambda unit: bank.entry(unit.index, lowest),
                batches,
                lambda step: bar.advance(kl_task, step),
            )
            fisher = _fisher_scores(
                model, units, batches, lambda step: bar.advance(fisher_task, step)
            )
        finally:
            bank.assemble(model, originals)  # whatever happened, originals back
    result = Sensitivity(tuple(kl), tuple(fisher), lowest)
    if path is not None:
        _write_cache(path, result)
    return result


# ---------------------------------------------------------------- seed + population


def _index(score: float, n: int) -> int:
    """Algorithm 3 of QR-Adaptor: normalised importance → index in a sorted set of size n.

    Rounds half up (``round`` would send 0.5 of 3 choices down but 0.5 of 5 up).
    """
    return min(n - 1, int(math.floor(score * (n - 1) + 0.5)))


def seed_config(importance: Sequence[float], space: SearchSpace) -> Config:
    """The warm-start config: more important units get more bits and a higher rank.

    Args:
        importance: one score in [0, 1] per unit (``Sensitivity.importance()``).
        space: the allowed bit-widths Q and ranks R; 16 bits is chosen only if it is in Q.
    """
    scores = [float(s) for s in importance]
    if len(scores) != space.n_units:
        raise ConfigError(
            f"`importance` has {len(scores)} scores but the space has {space.n_units} units; "
            "give one score per unit"
        )
    bad = [s for s in scores if not 0.0 <= s <= 1.0]
    if bad:
        raise ConfigError(
            f"`importance` must be normalised to [0, 1], got {bad[:3]}; "
            "pass Sensitivity.importance()"
        )
    bits, ranks = space.bits, space.ranks  # both sorted ascending by SearchSpace
    return Config(
        tuple(Choice(bits[_index(s, len(bits))], ranks[_index(s, len(ranks))]) for s in scores)
    )


def initial_population(
    seed: Config,
    space: SearchSpace,
    rng: random.Random,
    size: int,
    *,
    repair: Callable[[Config], Config],
    importance: Sequence[float] | None = None,
    extra: Sequence[Config] = (),
) -> list[Config]:
    """The first generation: the repaired seed, the repaired ``extra`` configs, then mutants.

    Mutants are proximity mutations of the repaired seed (importance-guided when given),
    each repaired to the budget. When ``size`` consecutive tries bring nothing new, later
    tries mutate a random member instead, so a narrow neighbourhood still fills up. A space
    too small for ``size`` distinct feasible configs gives as many as a bounded number of
    tries finds. Deterministic for a given ``rng`` state.

    Args:
        seed: the warm-start config (``seed_config``).
        space: the search space (its ``mutate`` makes the perturbations).
        rng: the search's random stream.
        size: number of configs wanted.
        repair: maps any config to a feasible one (identity on feasible configs).
        importance: per-unit weights for importance-guided mutation.
        extra: baselines (e.g. the uniform configs that fit), each kept as ``repair(c)``.
            The pipeline's repair also fills to the budget, so a uniform config below it
            enters raised to it; keeping only baselines that ``repair`` left unchanged dropped
            them all (issue 20, H200 2026-12-03: at 3.5 bits uniform 3-bit was filtered out and
            every config of the first generation held 16-20 collapsing 2-bit layers).
    """
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ConfigError(f"population `size` must be a positive integer, got {size!r}")
    start = repair(space.validate(seed))
    population = [start]
    seen = {start}
    for config in extra:
        if len(population) >= size:
            break
        fitted = repair(space.validate(config))
        if fitted not in seen:
            population.append(fitted)
            seen.add(fitted)
    rate = max(_MUTATION_RATE, 1.0 / space.n_units)  # on average ≥ 1 unit moves per mutant
    misses = 0
    for _ in range(50 * size + 100):
        if len(population) >= size:
            break
        base = start if misses < size else rng.choice(population)
        child = repair(space.mutate(base, rng, rate=rate, weights=importance))
        if child in seen:
            misses += 1
            continue
        population.append(child)
        seen.add(child)
        misses = 0
    if len(population) < size:
        log.warning(
            "initial population has %d distinct feasible configs, fewer than `size`=%d: "
            "the space (or the budget) allows few configs",
            len(population),
            size,
        )
    return population
