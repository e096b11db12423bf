"""Plan a model onto a device profile: baselines' memory and the most bits that fit.

This is the first stage of the flow: before any GPTQ or tuning it tells the user which
uniform baselines fit the profile's hard budget and the largest average bit-width that
does, so that an impossible budget is rejected with the minimum memory it would need.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from edgeqra.errors import BudgetError, ConfigError
from edgeqra.memory import Breakdown, ModelSpec, estimate_for_profile
from edgeqra.profiles import BudgetMode, DeviceProfile
from edgeqra.space import DEFAULT_BITS, FP16_BITS, Choice, Config

__all__ = ["Plan", "PlanRow", "budget_for_bits", "largest_fitting", "make_plan"]

GiB = 1 << 30


@dataclass(frozen=True)
class PlanRow:
    """One configuration's predicted memory against the budget."""

    label: str
    config: Config
    breakdown: Breakdown
    budget_bytes: int
    average_bits: float

    @property
    def fits(self) -> bool:
        """Whether the prediction is within the budget."""
        return self.breakdown.fits(self.budget_bytes)

    def to_json(self) -> dict[str, object]:
        """JSON-ready dict."""
        return {
            "label": self.label,
            "config": str(self.config),
            "average_bits": round(self.average_bits, 4),
            "fits": self.fits,
            "budget_bytes": self.budget_bytes,
            **self.breakdown.to_json(),
        }


@dataclass(frozen=True)
class Plan:
    """Baselines plus the largest average bit-width config that fits (None if none fits)."""

    profile: DeviceProfile
    mode: BudgetMode
    rows: tuple[PlanRow, ...]
    best: PlanRow | None
    minimum: PlanRow  # the smallest config in the space (lowest bits, no adapters)

    @property
    def planned(self) -> PlanRow:
        """The row ``plan --measure`` checks: the largest fitting config, else the minimum."""
        return self.best or self.minimum

    def to_json(self) -> dict[str, object]:
        """JSON-ready dict."""
        return {
            "profile": self.profile.name,
            "mode": self.mode.value,
            "budget_bytes": self.profile.budget_bytes,
            "rows": [r.to_json() for r in self.rows],
            "best": None if self.best is None else self.best.to_json(),
            "minimum_bytes": self.minimum.breakdown.total,
        }


def _row(
    label: str,
    spec: ModelSpec,
    config: Config,
    profile: DeviceProfile,
    mode: BudgetMode,
    group_size: int,
) -> PlanRow:
    """Estimate one config for the plan table."""
    breakdown = estimate_for_profile(spec, config, profile, mode=mode, group_size=group_size)
    return PlanRow(
        label, config, breakdown, profile.budget_bytes, config.average_bits(spec.unit_params)
    )


def largest_fitting(
    spec: ModelSpec,
    profile: DeviceProfile,
    *,
    bits: tuple[int, ...],
    rank: int,
    mode: BudgetMode,
    group_size: int,
) -> Config | None:
    """Greedy: start at the most bits everywhere, lower one unit one step until it fits.

    Earlier layers are lowered first: later layers are usually more fragile (METHOD.md), and
    the sensitivity stage refines this per model. Returns None when even the lowest bits
    everywhere do not fit at this rank.
    """
    ordered = sorted(bits)
    levels = [len(ordered) - 1] * spec.n_units
    while True:
        config = Config(tuple(Choice(ordered[k], rank) for k in levels))
        if estimate_for_profile(spec, config, profile, mode=mode, group_size=group_size).fits(
            profile.budget_bytes
        ):
            return config
        top = max(levels)
        if top == 0:
            return None
        levels[levels.index(top)] -= 1


def make_plan(
    spec: ModelSpec,
    profile: DeviceProfile,
    *,
    rank: int = 8,
    bits: tuple[int, ...] = DEFAULT_BITS,
    mode: BudgetMode | None = None,
    group_size: int = 64,
) -> Plan:
    """FP16 and uniform b-bit baselines at ``rank``, and the largest average bits that fit.

    Raises:
        BudgetError: not even the smallest config (lowest bits, no adapters) fits; the
            message states the minimum memory needed.
    """
    mode = mode or profile.mode
    usable_bits = tuple(b for b in sorted(bits) if b in profile.bits)
    if not usable_bits:
        raise BudgetError(
            f"profile `{profile.name}` runs bit-widths {list(profile.bits)}, none of the requested "
            f"{list(bits)}; pick bits from the profile's list"
        )
    n = spec.n_units
    rows = [_row("FP16 LoRA", spec, Config.uniform(n, FP16_BITS, rank), profile, mode, group_size)]
    rows += [
        _row(f"GPTQ {b}-bit", spec, Config.uniform(n, b, rank), profile, mode, group_size)
        for b in sorted(usable_bits, reverse=True)
    ]
    minimum = _row("minimum", spec, Config.uniform(n, usable_bits[0], 0), profile, mode, group_size)
    if not minimum.fits:
        raise BudgetError(
            f"nothing fits profile `{profile.name}` ({mode.value}): its budget is "
            f"{profile.budget_bytes / GiB:.2f} GiB but even {usable_bits[0]}-bit weights without "
            f"adapters need {minimum.breakdown.total / GiB:.2f} GiB; pick a profile with at least "
            f"that much memory, a smaller workload, or a smaller model"
        )
    best_config = largest_fitting(
        spec, profile, bits=usable_bits, rank=rank, mode=mode, group_size=group_size
    )
    best = (
        None
        if best_config is None
        else _row("largest fitting", spec, best_config, profile, mode, group_size)
    )
    return Plan(profile, mode, tuple(rows), best, minimum)


def budget_for_bits(
    spec: ModelSpec,
    profile: DeviceProfile,
    bits: float,
    space_bits: tuple[int, ...] = DEFAULT_BITS,
    *,
    rank: int = 8,
    group_size: int = 64,
) -> int:
    """The memory budget that ``bits`` average bits means: ``--budget-bits`` (issue 20).

    The predicted bytes, under the profile's workload, of a rank-``rank`` config whose
    weights average ``bits``: between the two uniform configs whose bit-widths bracket it
    (from ``space_bits`` and 16), the bytes are interpolated linearly in bits, which is how
    the quantized weights' bytes grow (the rest of the memory does not depend on bits).
    For a small model whose memory is mostly the runtime reserve and logits, a budget in
    GiB hardly binds; one in bits does, and it means the same on every profile.
    """
    ladder = sorted({*space_bits, FP16_BITS})
    if isinstance(bits, bool) or not isinstance(bits, int | float) or not math.isfinite(bits):
        raise ConfigError(f"`budget_bits` must be a number of bits, got {bits!r}; e.g. 3.5")
    if not ladder[0] <= bits <= FP16_BITS:
        raise ConfigError(
            f"`budget_bits` {bits} is outside [{ladder[0]}, {FP16_BITS}] (the bit set "
            f"{list(space_bits)} up to unquantized); pick a value in that range, e.g. 3.5"
        )
    lo = max(b for b in ladder if b <= bits)
    hi = min(b for b in ladder if b >= bits)

    def total(b: int) -> int:
        config = Config.uniform(spec.n_units, b, rank)
        return estimate_for_profile(spec, config, profile, group_size=group_size).total

    if lo == hi:
        return total(lo)
    return int(total(lo) + (bits - lo) / (hi - lo) * (total(hi) - total(lo)))
