"""The export's merge choices: method, threshold, what happens above it, Hessian rows."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from enum import Enum
from typing import Any

from edgeqra.errors import ConfigError
from edgeqra.settings import setting

__all__ = ["MergeMethod", "MergeSettings", "OverThreshold"]


class MergeMethod(str, Enum):
    """How adapters are merged into the GPTQ checkpoint."""

    GRID = "grid"  # onto the bank's scales/zeros with error feedback (this module)
    REQUANTIZE = "requantize"  # GPTQModel again on the merged dense weights (the old path)


class OverThreshold(str, Enum):
    """What to do with a unit whose merge loses more than ``threshold`` of its adapter."""

    REPORT = "report"  # merge anyway; the manifest flags it
    UNMERGED = "unmerged"  # keep the bank's codes, ship the unit's adapter unmerged
    UPBITS = "upbits"  # merge onto the next bit-width's grid if the bank and budget allow


@dataclass(frozen=True)
class MergeSettings:
    """The export's merge choices (``edgeqra export --merge ...``; a job file's ``[merge]``)."""

    method: MergeMethod = setting(
        MergeMethod.GRID,
        help="gptq/onnx: round W+BA onto the bank's own grid with GPTQ error feedback (grid) "
        "or run GPTQModel again on the merged weights (requantize, the old way)",
        key="merge.method",
        flag="--merge",
    )
    threshold: float = setting(  # fraction of the adapter's output effect a merge may lose
        0.5,
        help="a layer whose merge loses more than this fraction of its adapter's effect on "
        "its outputs is kept unmerged (see --over-threshold)",
        key="merge.threshold",
        flag="--merge-threshold",
    )
    over_threshold: OverThreshold = setting(  # module docstring says why
        OverThreshold.UNMERGED,
        help="layers over the threshold: keep their adapter unmerged (unmerged: the package "
        "loads as base + adapter), merge anyway (report), or merge at the next bit-width up "
        "if the budget allows (upbits)",
        key="merge.over_threshold",
    )
    hessian_rows: int = setting(  # the run's calibration rows, plus fresh windows if fewer
        64,
        help="calibration rows for each layer's merge Hessian (the run's, plus fresh windows "
        "of the same source if it had fewer); fewer is faster, on CPU especially",
        key="merge.hessian_rows",
        flag="--hessian-rows",
    )
    damp: float = 0.01  # GPTQ's dampening, a fraction of mean(diag H)
    block_size: int = 128  # GPTQ's lazy-batch block (speed only, same result)

    def __post_init__(self) -> None:
        for name, enum in (("method", MergeMethod), ("over_threshold", OverThreshold)):
            value = getattr(self, name)
            try:
                object.__setattr__(self, name, enum(value))
            except ValueError:
                raise ConfigError(
                    f"`{name}` {value!r} is unknown; use one of {[e.value for e in enum]}"
                ) from None
        if not (self.threshold >= 0 and math.isfinite(self.threshold)):
            raise ConfigError(f"`threshold` {self.threshold} must be a finite number >= 0")
        if self.hessian_rows < 1:
            raise ConfigError(f"`hessian_rows` {self.hessian_rows} must be >= 1, e.g. 8 or 64")
        if not 0 <= self.damp < 1:
            raise ConfigError(f"`damp` {self.damp} must be in [0, 1), e.g. 0.01")
        if self.block_size < 1:
            raise ConfigError(f"`block_size` {self.block_size} must be >= 1")

    def to_json(self) -> dict[str, Any]:
        """JSON-ready fields (enums as their strings)."""
        out = asdict(self)
        out["method"], out["over_threshold"] = self.method.value, self.over_threshold.value
        return out
