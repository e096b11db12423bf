"""Multi-fidelity by successive halving (AutoQRA; Jamieson & Talwalkar 2016).

A candidate's fidelity is its number of LoRA tuning steps. Every child is scored at the lowest
rung; the best ``1/eta`` of a rung is promoted to the next, so full-length tuning runs go only
to promising configs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from edgeqra.errors import ConfigError

__all__ = ["Schedule", "promote"]


@dataclass(frozen=True)
class Schedule:
    """Rungs ``high / eta**k`` for k = n_rungs-1 … 0 (at least one step each), ascending."""

    high: int
    eta: int = 4
    n_rungs: int = 3

    def __post_init__(self) -> None:
        if self.high < 0:
            raise ConfigError(f"`steps` (the full fidelity) must be >= 0, got {self.high}")
        if self.eta < 2:
            raise ConfigError(f"`eta` must be >= 2 (the promotion ratio), got {self.eta}")
        if self.n_rungs < 1:
            raise ConfigError(f"`n_rungs` must be >= 1, got {self.n_rungs}")

    @property
    def rungs(self) -> tuple[int, ...]:
        """Distinct fidelities, ascending; ``high`` is always the last."""
        if self.high == 0:
            return (0,)
        steps = {max(1, self.high // self.eta**k) for k in range(self.n_rungs)}
        return tuple(sorted(steps))

    @property
    def low(self) -> int:
        """The screening fidelity every child gets."""
        return self.rungs[0]


def promote(scores: Sequence[float], eta: int) -> list[int]:
    """Indices of the best ``ceil(n / eta)`` scores (higher is better), best first, ties by index."""
    if not scores:
        return []
    keep = math.ceil(len(scores) / eta)
    return sorted(range(len(scores)), key=lambda i: (-scores[i], i))[:keep]
