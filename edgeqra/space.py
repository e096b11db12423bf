"""The search space: a Config gives every unit one (bits, rank) choice.

``bits == 16`` means the unit stays in half precision (the FP16 LoRA baseline);
``rank == 0`` means no adapter on that unit. A Config is an immutable, hashable tuple that
serialises to a short readable string, ``"4/8,4/8,8/16"`` (bits/rank per unit), or JSON.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from edgeqra.errors import ConfigError

__all__ = [
    "DEFAULT_BITS",
    "DEFAULT_RANKS",
    "FP16_BITS",
    "Choice",
    "Config",
    "SearchSpace",
]

DEFAULT_BITS: tuple[int, ...] = (2, 3, 4, 8)
DEFAULT_RANKS: tuple[int, ...] = (0, 4, 8, 16, 32)
FP16_BITS = 16
_SPEC_ITEM = re.compile(r"^\s*(\d+)\s*/\s*(\d+)\s*$")


@dataclass(frozen=True, order=True)
class Choice:
    """One unit's gene: GPTQ bit-width (16 = unquantized) and LoRA rank (0 = none)."""

    bits: int
    rank: int

    def __str__(self) -> str:
        return f"{self.bits}/{self.rank}"


@dataclass(frozen=True)
class Config:
    """Per-unit choices, in unit order; the unit of search, caching and journaling."""

    choices: tuple[Choice, ...]

    def __post_init__(self) -> None:
        if not self.choices:
            raise ConfigError("a config needs at least one unit; got an empty `choices`")

    def __len__(self) -> int:
        return len(self.choices)

    def __iter__(self):
        return iter(self.choices)

    def __getitem__(self, index: int) -> Choice:
        return self.choices[index]

    def __str__(self) -> str:
        return ",".join(str(c) for c in self.choices)

    def short(self) -> str:
        """Run-length form for display, e.g. ``"4/8x12,8/16x18"``."""
        runs: list[list[object]] = []
        for choice in self.choices:
            if runs and runs[-1][0] == choice:
                runs[-1][1] += 1  # type: ignore[operator]
            else:
                runs.append([choice, 1])
        return ",".join(f"{c}x{n}" if n > 1 else str(c) for c, n in runs)

    @property
    def bits(self) -> tuple[int, ...]:
        """Bit-width per unit."""
        return tuple(c.bits for c in self.choices)

    @property
    def ranks(self) -> tuple[int, ...]:
        """LoRA rank per unit."""
        return tuple(c.rank for c in self.choices)

    @classmethod
    def uniform(cls, n_units: int, bits: int, rank: int) -> Config:
        """The same (bits, rank) on every unit: the QLoRA-style and FP16 baselines."""
        return cls(tuple(Choice(bits, rank) for _ in range(n_units)))

    @classmethod
    def from_pairs(cls, pairs: Iterable[Sequence[int]]) -> Config:
        """Build from ``[(bits, rank), ...]``."""
        return cls(tuple(Choice(int(b), int(r)) for b, r in pairs))

    @classmethod
    def parse(cls, spec: str) -> Config:
        """Parse ``"4/8,4/8,8/16"``, a JSON list of ``[bits, rank]``, or a path to such a file."""
        text = spec.strip()
        path = Path(text)
        if text.endswith(".json") or (len(text) < 4096 and path.is_file()):
            if not path.is_file():
                raise ConfigError(
                    f"config file `{text}` does not exist; pass an existing JSON file"
                )
            text = path.read_text().strip()
        if text.startswith("[") or text.startswith("{"):
            return cls._from_json(text, spec)
        items = [item for item in text.split(",")]
        choices = []
        for position, item in enumerate(items):
            match = _SPEC_ITEM.match(item)
            if match is None:
                raise ConfigError(
                    f"config spec item {position} `{item.strip()}` is not `BITS/RANK`; "
                    "write one `bits/rank` per unit separated by commas, e.g. `4/8,4/8,8/16`"
                )
            choices.append(Choice(int(match.group(1)), int(match.group(2))))
        return cls(tuple(choices))

    @classmethod
    def _from_json(cls, text: str, origin: str) -> Config:
        """JSON forms: ``[[4, 8], ...]``, ``[{"bits": 4, "rank": 8}, ...]`` or ``{"units": [...]}``."""
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"config `{origin}` is not valid JSON: {exc}") from exc
        if isinstance(data, dict):
            data = data.get("units", data.get("config"))
        if not isinstance(data, list):
            raise ConfigError(
                f'config `{origin}` must be a JSON list of [bits, rank] pairs (or {{"units": [...]}})'
            )
        pairs = []
        for position, item in enumerate(data):
            if isinstance(item, dict) and {"bits", "rank"} <= item.keys():
                pairs.append((item["bits"], item["rank"]))
            elif isinstance(item, list) and len(item) == 2:
                pairs.append(tuple(item))
            else:
                raise ConfigError(
                    f"config `{origin}` unit {position} is `{item}`; use [bits, rank] or "
                    '{"bits": B, "rank": R}'
                )
        if not all(isinstance(v, int) for pair in pairs for v in pair):
            raise ConfigError(f"config `{origin}` has non-integer bits or ranks; use integers")
        return cls.from_pairs(pairs)

    def to_json(self) -> list[list[int]]:
        """JSON-ready ``[[bits, rank], ...]``."""
        return [[c.bits, c.rank] for c in self.choices]

    def average_bits(self, weights: Sequence[int] | None = None) -> float:
        """Mean bit-width, weighted by each unit's parameter count when given."""
        w = weights or [1] * len(self)
        return sum(b * n for b, n in zip(self.bits, w, strict=True)) / sum(w)


@dataclass(frozen=True)
class SearchSpace:
    """The allowed bit-widths Q and ranks R for a model with ``n_units`` units."""

    n_units: int
    bits: tuple[int, ...] = DEFAULT_BITS
    ranks: tuple[int, ...] = DEFAULT_RANKS

    def __post_init__(self) -> None:
        if self.n_units <= 0:
            raise ConfigError(f"`n_units` must be positive, got {self.n_units}")
        bad_bits = [b for b in self.bits if b not in (2, 3, 4, 8, FP16_BITS)]
        if not self.bits or bad_bits:
            raise ConfigError(
                f"`bits` {list(self.bits)} may only hold GPTQ widths 2, 3, 4, 8 (or 16 = unquantized)"
            )
        if not self.ranks or any(r < 0 for r in self.ranks):
            raise ConfigError(f"`ranks` {list(self.ranks)} must be non-negative integers")
        object.__setattr__(self, "bits", tuple(sorted(set(self.bits))))
        object.__setattr__(self, "ranks", tuple(sorted(set(self.ranks))))

    def validate(self, config: Config, *, allow_fp16: bool = True) -> Config:
        """Check unit count and that each bit-width is in Q and each rank in R; return config."""
        if len(config) != self.n_units:
            raise ConfigError(
                f"config has {len(config)} units but the model has {self.n_units}; "
                f"give one `bits/rank` per decoder layer ({self.n_units} items)"
            )
        for index, choice in enumerate(config):
            fp16_ok = allow_fp16 and choice.bits == FP16_BITS
            if choice.bits not in self.bits and not fp16_ok:
                raise ConfigError(
                    f"unit {index} has bit-width {choice.bits}, not in the allowed set "
                    f"{list(self.bits)}; pick one of those (16 = unquantized)"
                )
            if choice.rank not in self.ranks:
                raise ConfigError(
                    f"unit {index} has rank {choice.rank}, not in the allowed set "
                    f"{list(self.ranks)}; pick one of those (0 = no adapter)"
                )
        return config
