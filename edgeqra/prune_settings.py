"""What a pruning asks for and what it resolves to: :class:`PruneSettings` and the widths
every decoder layer is pruned to (:class:`PruneTarget`, computed from the config alone, before
any weight is loaded). A leaf for :mod:`edgeqra.prune` and :mod:`edgeqra._depgraph`, which
both read the target (see the module docstring of edgeqra.prune for the method)."""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass
from enum import Enum
from typing import Any

from edgeqra.errors import ConfigError
from edgeqra.settings import setting

__all__ = [
    "LAYERWISE_REFUSAL",
    "MAX_RATIO",
    "Importance",
    "Layout",
    "PruneError",
    "PruneSettings",
    "PruneTarget",
    "apply_widths",
    "pruned_config",
    "text_config",
]

log = logging.getLogger(__name__)

MAX_RATIO = 0.7

LAYERWISE_REFUSAL = (
    "`layout` 'layerwise' is refused: per-layer widths (LLM-Pruner's block-wise rule) cannot "
    "be written as a standard Hugging Face config, which holds one `intermediate_size` and one "
    "`num_attention_heads` for every layer (LlamaConfig, Qwen2Config, Gemma3TextConfig); "
    "transformers' per-layer `per_layer_config` is not read by these models (building one "
    "raises AmbiguousGlobalPerLayerAttributeError), so the folder would load only through "
    "custom modelling code (trust_remote_code) or pickled modules; use `layout` 'uniform'"
)


class PruneError(ConfigError):
    """Pruning settings or a model that cannot be pruned as asked (the CLI exits 2)."""


class Importance(str, Enum):
    """How channels and heads are ranked."""

    TAYLOR = "taylor"  # |w · dL/dw| on calibration rows (LLM-Pruner's first-order choice)
    MAGNITUDE = "magnitude"  # L2 norm of the coupled weights, no data


class Layout(str, Enum):
    """How the ratio is spread over the decoder layers."""

    UNIFORM = "uniform"  # every layer to the same width: a standard HF config
    LAYERWISE = "layerwise"  # refused, see LAYERWISE_REFUSAL


@dataclass(frozen=True)
class PruneSettings:
    """What fixes a pruning: ratio, importance, layout, calibration rows and seed."""

    ratio: float = setting(
        0.2,
        help="share of each decoder layer's MLP channels and query heads removed, 0 to 0.7",
        key="prune.ratio",
    )
    importance: Importance = setting(
        Importance.TAYLOR,
        help="taylor (|w·grad| on calibration rows) or magnitude (L2, no data)",
        key="prune.importance",
    )
    layout: Layout = setting(
        Layout.UNIFORM,
        help="uniform (same width in every layer); layerwise is refused (README)",
        key="prune.layout",
    )
    calib_samples: int = setting(
        32, help="calibration rows for the Taylor importance", key="prune.calib_samples"
    )
    calib_seq_len: int = setting(256, help="tokens per calibration row", key="prune.calib_seq_len")
    calibration: str = setting("c4", help="calibration text source", key="prune.calibration")
    # The job's one `seed` (a job file's [prune] has none of its own).
    seed: int = setting(0, help="seed of the calibration rows", key="seed")
    heads: int | None = setting(
        None,
        help="query heads kept per layer (default: from the ratio); with GQA a multiple of "
        "the key-value heads",
        key="prune.heads",
    )
    round_to: int = setting(
        32,
        help="MLP channels kept are a multiple of this (GPTQModel packs 3-bit only in "
        "multiples of 32; use the GPTQ group size if it is larger)",
        key="prune.round_to",
    )

    def __post_init__(self) -> None:
        if isinstance(self.ratio, bool) or not isinstance(self.ratio, int | float):
            raise PruneError(f"`ratio` must be a number in [0, {MAX_RATIO}], got {self.ratio!r}")
        if not 0.0 <= float(self.ratio) <= MAX_RATIO or math.isnan(self.ratio):
            raise PruneError(
                f"`ratio` {self.ratio} is outside [0, {MAX_RATIO}]; AutoMixQ prunes 0.2-0.5, "
                f"and past {MAX_RATIO} a layer keeps too little to recover by LoRA tuning"
            )
        try:
            object.__setattr__(self, "importance", Importance(self.importance))
        except ValueError:
            raise PruneError(
                f"`importance` {self.importance!r} is unknown; use "
                f"{' or '.join(repr(i.value) for i in Importance)}"
            ) from None
        try:
            object.__setattr__(self, "layout", Layout(self.layout))
        except ValueError:
            raise PruneError(f"`layout` {self.layout!r} is unknown; use 'uniform'") from None
        if self.layout is Layout.LAYERWISE:
            raise PruneError(LAYERWISE_REFUSAL)
        for name in ("calib_samples", "calib_seq_len", "round_to"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < (2 if name == "calib_seq_len" else 1):
                raise PruneError(f"`{name}` must be a positive integer, got {value!r}")
        if self.heads is not None and (not isinstance(self.heads, int) or self.heads < 1):
            raise PruneError(f"`heads` must be a positive integer, got {self.heads!r}")
        if self.ratio == 0 and self.heads is None:
            log.warning("`ratio` is 0: the pruned model equals the original (a plain copy)")

    def to_json(self) -> dict[str, object]:
        """JSON-ready (enums as their values); ``from_json`` reads it back."""
        data = dataclasses.asdict(self)
        data["importance"] = self.importance.value
        data["layout"] = self.layout.value
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> PruneSettings:
        """Rebuild from :meth:`to_json` output."""
        return cls(**data)


# ----------------------------------------------------------------------------- targets


def text_config(config: Any) -> Any:
    """The language model's config (multimodal wrappers nest it)."""
    return getattr(config, "gettext_config", lambda: config)()


@dataclass(frozen=True)
class PruneTarget:
    """The widths every decoder layer is pruned to (computed before any weight is loaded)."""

    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    before: tuple[int, int, int]  # (intermediate_size, num_attention_heads, num_key_value_heads)

    @classmethod
    def from_config(
        cls, config: Any, settings: PruneSettings, *, quiet: bool = False
    ) -> PruneTarget:
        """Widths for ``settings.ratio`` (or ``settings.heads``) on this architecture.

        Raises:
            PruneError: the head count cannot be divided as asked, or the ratio would leave
                a layer without heads or channels.
        """
        cfg = text_config(config)
        missing = [
            k for k in ("intermediate_size", "num_attention_heads", "hidden_size")
            if not isinstance(getattr(cfg, k, None), int)
        ]  # fmt: skip
        if missing:
            raise PruneError(
                f"cannot prune model type `{getattr(cfg, 'model_type', '?')}`: its config has no "
                f"{', '.join(f'`{k}`' for k in missing)}; edgeqra prunes gate/up/down MLPs and "
                "q/k/v/o attention heads, as in Llama, Qwen2 and Gemma3"
            )
        inter = int(cfg.intermediate_size)
        heads = int(cfg.num_attention_heads)
        kv = int(getattr(cfg, "num_key_value_heads", None) or heads)
        head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // heads)
        if heads % kv:
            raise PruneError(
                f"the model has {heads} query heads and {kv} key-value heads, which do not "
                "divide: it is not a standard GQA layout that edgeqra can prune"
            )
        keep = 1.0 - float(settings.ratio)
        step = settings.round_to
        if inter % step:
            step = math.gcd(inter, step)  # keep the original width reachable
        channels = min(inter, max(step, step * math.floor(inter * keep / step + 0.5)))
        group = heads // kv
        gqa = kv < heads
        # Head counts the architecture can hold: GQA keeps every key-value head (multiples of
        # kv); the config class may also want hidden_size divisible by it (LlamaConfig does).
        counts = [kv * k for k in range(1, group + 1)] if gqa else list(range(1, heads + 1))
        valid = [h for h in counts if _config_accepts(cfg, h, kv if gqa else h, head_dim)]
        if settings.heads is not None:
            new_heads = settings.heads
            if new_heads > heads:
                raise PruneError(
                    f"`heads` {new_heads} is more than the model's {heads} query heads; pass at "
                    f"most {heads}"
                )
            if new_heads not in valid:
                why = (
                    f"is not a multiple of the model's {kv} key-value heads (with GQA every "
                    "key-value head keeps the same number of query heads)"
                    if gqa and new_heads % kv
                    else f"is rejected by {type(cfg).__name__} (hidden_size "
                    f"{cfg.hidden_size} must be a multiple of the head count)"
                )
                raise PruneError(
                    f"`heads` {new_heads} {why}; pass one of {', '.join(map(str, valid))}"
                )
        else:
            wanted = group * keep * kv if gqa else heads * keep
            # The nearest count the config accepts; ties keep more heads.
            new_heads = min(valid, key=lambda h: (abs(h - wanted), -h))
            natural = kv * math.floor(group * keep + 0.5) if gqa else math.floor(wanted + 0.5)
            if new_heads != natural and not quiet:
                log.warning(
                    "`ratio` %s asks for %.1f query heads; %s holds %d (choices %s)",
                    settings.ratio, wanted, type(cfg).__name__, new_heads, valid,
                )  # fmt: skip
        new_kv = kv if gqa else new_heads
        return cls(channels, new_heads, new_kv, head_dim, (inter, heads, kv))

    @property
    def changes(self) -> bool:
        """Whether anything is removed."""
        return (self.intermediate_size, self.num_attention_heads) != self.before[:2]

    def to_json(self) -> dict[str, object]:
        """Before/after widths, JSON-ready."""
        inter, heads, kv = self.before
        return {
            "before": {"intermediate_size": inter, "num_attention_heads": heads,
                       "num_key_value_heads": kv, "head_dim": self.head_dim},
            "after": {"intermediate_size": self.intermediate_size,
                      "num_attention_heads": self.num_attention_heads,
                      "num_key_value_heads": self.num_key_value_heads, "head_dim": self.head_dim},
        }  # fmt: skip


def _config_accepts(cfg: Any, heads: int, kv: int, head_dim: int) -> bool:
    """Whether the config class validates with these head counts (LlamaConfig checks
    hidden_size % num_attention_heads; transformers raises on load otherwise)."""
    from huggingface_hub.errors import StrictDataclassError

    data = cfg.to_dict()
    data.update(num_attention_heads=heads, num_key_value_heads=kv, head_dim=head_dim)
    try:
        cfg.__class__.from_dict(data)
    except (ValueError, TypeError, StrictDataclassError):
        return False
    return True


def pruned_config(config: Any, settings: PruneSettings) -> Any:
    """A copy of ``config`` with the pruned widths (for memory planning without weights)."""
    target = PruneTarget.from_config(config, settings)
    out = config.__class__.from_dict(config.to_dict())
    apply_widths(text_config(out), target)
    return out


def apply_widths(cfg: Any, target: PruneTarget) -> None:
    """Write the target widths into a (text) config; head_dim made explicit."""
    cfg.intermediate_size = target.intermediate_size
    cfg.num_attention_heads = target.num_attention_heads
    cfg.num_key_value_heads = target.num_key_value_heads
    # Some configs derive head_dim as hidden // heads when it is absent: pin it.
    cfg.head_dim = target.head_dim
