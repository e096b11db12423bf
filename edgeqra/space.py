"""The search space: a Config gives every unit one (bits, rank) choice.

``bits == 16`` means the unit stays in half precision (the FP16 LoRA baseline);
``rank == 0`` means no adapter on that unit. A Config is an immutable, hashable tuple that
serialises to a short readable string, ``"4/8,4/8,8/16"`` (bits/rank per unit), or JSON.
"""

from __future__ import annotations

import json
import math
import random
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from edgeqra.errors import BudgetError, ConfigError

__all__ = [
    "DEFAULT_BITS",
    "DEFAULT_RANKS",
    "FP16_BITS",
    "Choice",
    "Config",
    "SearchSpace",
    "fill",
    "repair",
]

DEFAULT_BITS: tuple[int, ...] = (2, 3, 4, 8)
DEFAULT_RANKS: tuple[int, ...] = (0, 4, 8, 16, 32)
FP16_BITS = 16
# One unit `BITS/RANK`, or a run of N equal units `BITS/RANKxN` (the form `Config.short` writes).
_SPEC_ITEM = re.compile(r"^\s*(\d+)\s*/\s*(\d+)\s*(?:[xX]\s*(\d+)\s*)?$")
_GIB = 1 << 30


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
        """Parse ``"4/8,4/8,8/16"`` (runs as ``"4/8x2,8/16"``, :meth:`short`'s form), a JSON
        list of ``[bits, rank]``, or a path to such a file."""
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
                    f"config spec item {position} `{item.strip()}` is not `BITS/RANK` or "
                    "`BITS/RANKxN`; write one `bits/rank` per unit separated by commas, e.g. "
                    "`4/8,4/8,8/16`, or a run of N equal units as `4/8x2,8/16`"
                )
            repeat = int(match.group(3)) if match.group(3) else 1
            if repeat < 1:
                raise ConfigError(
                    f"config spec item {position} `{item.strip()}` repeats a unit {repeat} times; "
                    "a run needs N >= 1"
                )
            choices.extend([Choice(int(match.group(1)), int(match.group(2)))] * repeat)
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

    @classmethod
    def from_model(
        cls,
        source: str | Path,
        bits: Iterable[int] = DEFAULT_BITS,
        ranks: Iterable[int] = DEFAULT_RANKS,
        *,
        trust_remote_code: bool = False,
    ) -> SearchSpace:
        """The space over a model's units, counted from its config.json or GGUF header.

        Loads no weights and builds no cache (:func:`edgeqra.models.peek_units`), so a
        ``--config`` of the wrong length fails before the model loads.
        """
        from edgeqra.models import peek_units

        n_units = peek_units(source, trust_remote_code=trust_remote_code)
        return cls(n_units, tuple(bits), tuple(ranks))

    def parse(self, spec: str, *, allow_fp16: bool = True) -> Config:
        """:meth:`Config.parse` then :meth:`validate`: wrong length or a value outside Q/R fails."""
        return self.validate(Config.parse(spec), allow_fp16=allow_fp16)

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

    # --- search operators (METHOD.md stage 2) -------------------------------------------------
    # A unit's bits and rank are ordered choices: every move is one step along sorted Q or R
    # (proximity mutation), so the search never makes the destructive jumps that a uniform
    # resample would (QR-Adaptor; nevergrad's TransitionChoice).

    def _bit_ladder(self, bits: int) -> tuple[int, ...]:
        """Sorted Q, with FP16 appended when a unit sits there outside Q (it may only step down)."""
        return self.bits if bits in self.bits else (*self.bits, bits)

    def _moves(self, choice: Choice) -> list[tuple[str, int]]:
        """(field, delta) moves that stay in the space, in the fixed order bits-, bits+, rank-, rank+."""
        out = []
        for name, ladder, value in (
            ("bits", self._bit_ladder(choice.bits), choice.bits),
            ("rank", self.ranks, choice.rank),
        ):
            index = ladder.index(value)
            out.extend((name, d) for d in (-1, 1) if 0 <= index + d < len(ladder))
        return out

    def _step(self, choice: Choice, name: str, delta: int) -> Choice:
        """``choice`` with ``name`` moved ``delta`` steps along its sorted set."""
        if name == "bits":
            ladder = self._bit_ladder(choice.bits)
            return replace(choice, bits=ladder[ladder.index(choice.bits) + delta])
        return replace(choice, rank=self.ranks[self.ranks.index(choice.rank) + delta])

    def _unit_weights(self, weights: Sequence[float] | None, what: str) -> list[float]:
        """Per-unit non-negative weights, checked; ``None`` (or all zero) means uniform."""
        if weights is None:
            return [1.0] * self.n_units
        w = [float(x) for x in weights]
        if len(w) != self.n_units:
            raise ConfigError(
                f"`{what}` has {len(w)} values but the space has {self.n_units} units; "
                "give one score per unit"
            )
        if any(not math.isfinite(x) or x < 0 for x in w):
            raise ConfigError(
                f"`{what}` {w} must be finite and non-negative (normalised importance)"
            )
        return w if sum(w) > 0 else [1.0] * self.n_units

    def neighbours(self, config: Config) -> list[Config]:
        """Every config one step away: one unit's bits or rank moved to an adjacent value.

        The Hamming-1 ball that local search and the trust region (METHOD.md stage 3) walk.
        Order is deterministic: by unit, then bits down, bits up, rank down, rank up.
        """
        self.validate(config)
        out = []
        for index, choice in enumerate(config):
            for name, delta in self._moves(choice):
                choices = list(config.choices)
                choices[index] = self._step(choice, name, delta)
                out.append(Config(tuple(choices)))
        return out

    def mutate(
        self,
        config: Config,
        rng: random.Random,
        *,
        rate: float = 0.1,
        weights: Sequence[float] | None = None,
    ) -> Config:
        """Proximity mutation, importance-guided (AutoQRA): sensitive units mutate more often.

        Args:
            config: the parent, in this space.
            rng: the only source of randomness (seeded by the caller).
            rate: mean per-unit mutation probability; unit l mutates with probability
                ``min(1, rate * w_l / mean(w))``.
            weights: per-unit importance (length ``n_units``, non-negative); ``None`` = uniform.

        A mutated unit moves its bits or its rank (50/50) one step up or down (50/50); a step
        that would leave the set goes the other way, so every mutation changes something.
        If no unit mutated, one unit chosen with probability proportional to its weight is
        mutated, so the child always differs from the parent (unless the space has one point).
        """
        self.validate(config)
        if not 0.0 <= rate <= 1.0:
            raise ConfigError(f"`rate` must be in [0, 1], got {rate}")
        w = self._unit_weights(weights, "weights")
        mean = sum(w) / len(w)
        choices = list(config.choices)
        changed = False
        for index, choice in enumerate(choices):
            if rng.random() < min(1.0, rate * w[index] / mean):
                choices[index] = self._mutate_unit(choice, rng)
                changed |= choices[index] != choice
        if not changed:
            movable = [i for i, c in enumerate(choices) if self._moves(c)]
            if movable:
                mw = [w[i] for i in movable]
                pick = rng.choices(movable, weights=mw if sum(mw) > 0 else None)[0]
                choices[pick] = self._mutate_unit(choices[pick], rng)
        return Config(tuple(choices))

    def _mutate_unit(self, choice: Choice, rng: random.Random) -> Choice:
        """One unit's move: bits or rank (50/50, or the one that can move), up or down."""
        moves = self._moves(choice)
        if not moves:
            return choice
        names = sorted({name for name, _ in moves})
        name = names[0] if len(names) == 1 else ("bits" if rng.random() < 0.5 else "rank")
        deltas = [d for n, d in moves if n == name]
        # At either end of the set the only step goes inwards (reflection, not clamping), so a
        # chosen mutation is never a silent no-op.
        delta = deltas[0] if len(deltas) == 1 else (-1 if rng.random() < 0.5 else 1)
        return self._step(choice, name, delta)

    def crossover(self, a: Config, b: Config, rng: random.Random) -> Config:
        """Layer-wise uniform crossover: each unit's (bits, rank) gene comes whole from a or b.

        Genes are not split, because a layer's bits and rank compensate each other (QR-Adaptor).
        """
        self.validate(a)
        self.validate(b)
        return Config(tuple(x if rng.random() < 0.5 else y for x, y in zip(a, b, strict=True)))

    def sample(self, rng: random.Random) -> Config:
        """A uniformly random config (random-search baseline, population fill)."""
        return Config(
            tuple(
                Choice(rng.choice(self.bits), rng.choice(self.ranks)) for _ in range(self.n_units)
            )
        )

    def encode(self, config: Config) -> list[float]:
        """Surrogate features: per unit, bits index then rank index in their sorted sets, in [0, 1].

        Ordinal positions, not raw values, so 8 bits is one step above 4 as the search sees it.
        A set of one value encodes as 0.0; FP16 outside Q encodes as 1.0 (above every GPTQ width).
        """
        self.validate(config)
        out: list[float] = []
        for choice in config:
            out.append(_position(self.bits, choice.bits))
            out.append(_position(self.ranks, choice.rank))
        return out


def _position(values: tuple[int, ...], value: int) -> float:
    """Index of ``value`` in sorted ``values`` scaled to [0, 1]; values above the set give 1.0."""
    if value not in values:
        return 1.0
    return values.index(value) / (len(values) - 1) if len(values) > 1 else 0.0


def repair(
    config: Config,
    space: SearchSpace,
    memory: Callable[[Config], int],
    budget: int,
    importance: Sequence[float] | None = None,
    *,
    fields: tuple[str, ...] = ("bits", "rank"),
) -> Config:
    """Lower the cheapest steps until ``memory(config) <= budget`` (METHOD.md feasibility repair).

    Args:
        config: a config in ``space``; returned unchanged when it already fits.
        space: the allowed bits and ranks.
        memory: bytes of a config (in edgeqra: ``estimate_for_profile(...).total``). It need not
            be additive over units, so every candidate is measured; it should not grow when a
            bit-width or rank is lowered (true of :mod:`edgeqra.memory`).
        budget: the hard limit in bytes.
        importance: per-unit sensitivity (non-negative); ``None`` = all ones.
        fields: which steps may be lowered (``("rank",)``: keep every unit's bits and drop
            adapters from the least important units, the QLoRA config at the budget).

    Greedy: each round takes the single down step (one unit's bits or rank one step lower)
    with the least importance lost per byte saved, where the loss is ``importance[l]`` times
    the relative step, ``(q_old - q_new) / q_old`` or ``(r_old - r_new) / max(r_old, 1)``.
    Ties go to the lowest unit, bits before rank. Steps that save no bytes are skipped unless
    nothing else is left. Raises :class:`BudgetError` when even the smallest config is over.
    """
    space.validate(config)
    imp = space._unit_weights(importance, "importance")
    current_bytes = memory(config)
    if current_bytes <= budget:
        return config
    floor = Config(
        tuple(
            Choice(
                space.bits[0] if "bits" in fields else c.bits,
                space.ranks[0] if "rank" in fields else c.rank,
            )
            for c in config
        )
    )
    floor_bytes = memory(floor)
    if floor_bytes > budget:
        # With memory monotone in bits and ranks the floor is the smallest reachable config;
        # failing here saves walking the whole way down to find that out.
        raise _budget_error(space, floor, floor_bytes, budget)
    current = config
    while current_bytes > budget:
        best: tuple[tuple[int, float, int, int], Config, int] | None = None
        for index, choice in enumerate(current):
            down = (m for m in space._moves(choice) if m[1] < 0 and m[0] in fields)
            for order, (name, delta) in enumerate(down):
                new = space._step(choice, name, delta)
                old_v, new_v = (
                    (choice.bits, new.bits) if name == "bits" else (choice.rank, new.rank)
                )
                lost = imp[index] * (old_v - new_v) / max(old_v, 1)
                choices = list(current.choices)
                choices[index] = new
                candidate = Config(tuple(choices))
                after = memory(candidate)
                saved = current_bytes - after
                # Positive savings first (ranked by loss per byte); the rest only as a last
                # resort, by loss alone, so the walk still ends at the floor.
                key = (0, lost / saved, index, order) if saved > 0 else (1, lost, index, order)
                if best is None or key < best[0]:
                    best = (key, candidate, after)
        if best is None:
            raise _budget_error(space, current, current_bytes, budget)
        _, current, current_bytes = best
    return current


def fill(
    config: Config,
    space: SearchSpace,
    memory: Callable[[Config], int],
    budget: int,
    importance: Sequence[float] | None = None,
    *,
    fields: tuple[str, ...] = ("bits", "rank"),
) -> Config:
    """Raise the most valuable steps while ``memory(config) <= budget``: the mirror of :func:`repair`.

    A hard budget is not an objective: bytes left unused below it buy nothing, so a config
    the search evaluates should use them (issue 20: repair only lowers, and the quick-start's
    children sat at 2-3 bits where 4 fitted everywhere).

    Greedy: each round takes the single up step (one unit's bits or rank one step higher,
    among ``fields``) with the most importance gained per byte spent that still fits; the
    gain mirrors repair's loss, ``importance[l]`` times the relative step measured at the
    larger value. Byte costs are taken per unit and refreshed for the unit that moved (the
    memory model is nearly additive over units); every accepted step is checked against the
    exact ``memory``, and a last exact pass over every up step makes sure none fits when it
    returns. A config over the budget is returned unchanged (repair it first).

    Args:
        config: a config in ``space``.
        space: the allowed bits and ranks.
        memory: exact bytes of a config (monotone in bits and ranks).
        budget: the hard limit in bytes.
        importance: per-unit sensitivity (non-negative); ``None`` = all ones.
        fields: which steps may be raised (``("bits",)``: a bits-only knapsack).
    """
    space.validate(config)
    imp = space._unit_weights(importance, "importance")
    current_bytes = memory(config)
    if current_bytes > budget:
        return config
    current = config

    def up_moves(index: int, choice: Choice) -> list[tuple[int, str, Config]]:
        out = []
        for order, (name, delta) in enumerate(space._moves(choice)):
            if delta > 0 and name in fields:
                choices = list(current.choices)
                choices[index] = space._step(choice, name, delta)
                out.append((order, name, Config(tuple(choices))))
        return out

    def gain(index: int, old: Choice, new: Choice, name: str) -> float:
        old_v, new_v = (old.bits, new.bits) if name == "bits" else (old.rank, new.rank)
        return imp[index] * (new_v - old_v) / max(new_v, 1)

    def costs(index: int) -> list[tuple[int, str, int]]:
        return [(o, n, memory(c) - current_bytes) for o, n, c in up_moves(index, current[index])]

    cost = {i: costs(i) for i in range(space.n_units)}  # per unit: (order, field, bytes)
    blocked: set[tuple[int, int]] = set()  # (unit, order) found over budget at the exact check
    while True:
        ranked = []
        for index, moves in cost.items():
            for order, name, spent in moves:
                if (index, order) in blocked or current_bytes + spent > budget:
                    continue
                new = space._step(current[index], name, 1)
                g = gain(index, current[index], new, name)
                key = (0, -g, index, order) if spent <= 0 else (1, -g / spent, index, order)
                ranked.append((key, index, order, name))
        taken = False
        for _, index, order, name in sorted(ranked):
            choices = list(current.choices)
            choices[index] = space._step(current[index], name, 1)
            candidate = Config(tuple(choices))
            after = memory(candidate)
            if after <= budget:
                current, current_bytes, taken = candidate, after, True
                blocked = {b for b in blocked if b[0] != index}
                cost[index] = costs(index)
                break
            blocked.add((index, order))
        if taken:
            continue
        # Exact pass: with refreshed costs, is any up step still affordable?
        cost = {i: costs(i) for i in range(space.n_units)}
        blocked.clear()
        if not any(current_bytes + spent <= budget for m in cost.values() for _, _, spent in m):
            return current


def _budget_error(
    space: SearchSpace, smallest: Config, smallest_bytes: int, budget: int
) -> BudgetError:
    """Say how far over the budget the smallest config is, and what to change."""
    return BudgetError(
        f"no configuration fits the memory budget of {budget / _GIB:.2f} GiB: the smallest one "
        f"(`{smallest.short()}`, bits {space.bits[0]}, rank {space.ranks[0]} everywhere) needs "
        f"{smallest_bytes / _GIB:.2f} GiB. Use a device profile with more memory or a larger "
        f"`--budget-gb`, or allow smaller bit-widths (bit set {list(space.bits)}) or ranks "
        f"(rank set {list(space.ranks)})"
    )
