"""Structured pruning before the search (AutoMixQ, issue 17), on Torch-Pruning's DepGraph.

Every decoder layer loses the same share of its MLP channels and of its query heads
(``layout = uniform``), so the result is an ordinary Hugging Face config with a smaller
``intermediate_size`` and fewer ``num_attention_heads``: transformers, GPTQModel, PEFT and
onnxruntime load it with no custom code, and every later stage reads its shapes as it reads
any model's. The hidden size is kept (pruning it would change every norm and the embedding;
LLM-Pruner keeps it too), and so is every layer.

How the groups are found: ``tp.DependencyGraph`` traces the model once, and each layer's
coupled channels are read from it: ``gate_proj``/``up_proj`` rows with ``down_proj``
columns; ``q_proj`` rows of a head with ``o_proj`` columns, and for GQA the key-value head
those query rows attend with (DepGraph follows ``repeat_kv``). Importance is Torch-Pruning's
``GroupTaylorImportance`` (|w·∂L/∂w| summed over calibration rows: LLM-Pruner's first-order
criterion) or ``GroupMagnitudeImportance`` (L2), averaged over a head's channels for heads.
With GQA every key-value head is kept and each of its query groups loses the same number of
heads (Torch-Pruning's own GQA rule), so ``num_attention_heads`` stays a multiple of
``num_key_value_heads``; without GQA whole q/k/v/o heads go.

Two details of Torch-Pruning 1.6.1 that this module works around (so it pins that version):

* tracing through RoPE's ``rotate_half`` (a ``cat`` of two halves) never terminates
  (VainF/Torch-Pruning#527: Qwen3, GQA). Whole heads are pruned, never head dimensions, so
  the rotation inside a head cannot change which channels are coupled: the model is traced
  with the rotation replaced by the identity (and with eager attention, whose ``repeat_kv``
  DepGraph can follow; SDPA is one opaque op). A guard turns any other runaway trace into a
  :class:`PruneError` naming the module.
* its ``BasePruner`` rounds head counts up per group (``ceil``) and, once the query heads of a
  GQA layer drop to the key-value count, starts pruning key-value heads; the counts here are
  computed up front (:class:`PruneTarget`) and each group is pruned with exactly those indices.

The DepGraph side (tracing, coupling checks, pruning by index) lives in
:mod:`edgeqra._depgraph`; this module holds the settings, the widths, the importance ranking
and the folder I/O.

``layout = layerwise`` (LLM-Pruner's block-wise rule: first and last layers whole, the middle
pruned harder) is refused: no standard config can hold per-layer widths (see
:data:`LAYERWISE_REFUSAL`).
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import logging
import math
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

import torch
from torch import nn

from edgeqra.errors import ConfigError

__all__ = [
    "LAYERWISE_REFUSAL",
    "PRUNING_FILE",
    "Importance",
    "Layout",
    "PruneError",
    "PruneOutcome",
    "PruneSettings",
    "PruneTarget",
    "prune_folder",
    "prune_model",
    "pruned_config",
    "read_record",
    "unpruned_config",
]

log = logging.getLogger(__name__)

PRUNING_FILE = "pruning.json"
"""The record a pruned folder carries: settings, calibration, parameter counts, kept indices."""

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


def _help(text: str) -> dict[str, str]:
    return {"help": text}


@dataclass(frozen=True)
class PruneSettings:
    """What fixes a pruning: ratio, importance, layout, calibration rows and seed."""

    ratio: float = field(
        default=0.2,
        metadata=_help(
            "share of each decoder layer's MLP channels and query heads removed, 0 to 0.7"
        ),
    )
    importance: Importance = field(
        default=Importance.TAYLOR,
        metadata=_help("taylor (|w·grad| on calibration rows) or magnitude (L2, no data)"),
    )
    layout: Layout = field(
        default=Layout.UNIFORM,
        metadata=_help("uniform (same width in every layer); layerwise is refused (README)"),
    )
    calib_samples: int = field(
        default=32, metadata=_help("calibration rows for the Taylor importance")
    )
    calib_seq_len: int = field(default=256, metadata=_help("tokens per calibration row"))
    calibration: str = field(default="c4", metadata=_help("calibration text source"))
    seed: int = field(default=0, metadata=_help("seed of the calibration rows"))
    heads: int | None = field(
        default=None,
        metadata=_help(
            "query heads kept per layer (default: from the ratio); with GQA a multiple of "
            "the key-value heads"
        ),
    )
    round_to: int = field(
        default=32,
        metadata=_help(
            "MLP channels kept are a multiple of this (GPTQModel packs 3-bit only in "
            "multiples of 32; use the GPTQ group size if it is larger)"
        ),
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


def _text_config(config: Any) -> Any:
    """The language model's config (multimodal wrappers nest it)."""
    return getattr(config, "get_text_config", lambda: config)()


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
        cfg = _text_config(config)
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
    _apply_widths(_text_config(out), target)
    return out


def _apply_widths(cfg: Any, target: PruneTarget) -> None:
    """Write the target widths into a (text) config; head_dim made explicit."""
    cfg.intermediate_size = target.intermediate_size
    cfg.num_attention_heads = target.num_attention_heads
    cfg.num_key_value_heads = target.num_key_value_heads
    # Some configs derive head_dim as hidden // heads when it is absent: pin it.
    cfg.head_dim = target.head_dim


# ----------------------------------------------------------------------------- pruning


@dataclass(frozen=True)
class PruneOutcome:
    """What :func:`prune_model` removed: target widths, kept indices, parameter counts."""

    target: PruneTarget
    kept_heads: dict[str, tuple[int, ...]]  # layer name -> query heads kept (original numbering)
    kept_channels: dict[str, tuple[int, ...]]  # layer name -> MLP channels kept
    params_before: int
    params_after: int
    seconds: float

    def to_json(self) -> dict[str, object]:
        """JSON-ready (the bulk of ``pruning.json``)."""
        return {
            "parameters": {
                "before": self.params_before,
                "after": self.params_after,
                "removed_fraction": round(1 - self.params_after / self.params_before, 6),
            },
            "shapes": self.target.to_json(),
            "kept": {
                name: {
                    "heads": list(self.kept_heads[name]),
                    "mlp_channels": list(self.kept_channels[name]),
                }
                for name in self.kept_heads
            },  # fmt: skip
            "seconds": round(self.seconds, 2),
        }


def _count_params(model: nn.Module) -> int:
    """Parameters, tied tensors once."""
    return sum(p.numel() for p in model.parameters())


def _importance(settings: PruneSettings) -> Any:
    """Torch-Pruning's group importance for the settings."""
    import torch_pruning as tp

    if settings.importance is Importance.TAYLOR:
        return tp.importance.GroupTaylorImportance(group_reduction="mean", normalizer=None)
    return tp.importance.GroupMagnitudeImportance(p=2, group_reduction="mean", normalizer=None)


def _accumulate_gradients(model: nn.Module, calibration: torch.Tensor, batch: int = 4) -> None:
    """Sum of the LM loss gradients over the calibration rows (Taylor importance reads .grad)."""
    device = next(model.parameters()).device
    model.zero_grad(set_to_none=True)
    with torch.enable_grad():
        for start in range(0, calibration.shape[0], batch):
            rows = calibration[start : start + batch].to(device)  # (batch, seq)
            loss = model(input_ids=rows, labels=rows).loss
            loss.backward()


def _top(scores: torch.Tensor, k: int) -> list[int]:
    """Indices of the ``k`` largest scores, ascending (ties: the lower index wins)."""
    order = sorted(range(len(scores)), key=lambda i: (-float(scores[i]), i))
    return sorted(order[:k])


def prune_model(
    model: nn.Module, settings: PruneSettings, calibration: torch.Tensor | None = None
) -> PruneOutcome:
    """Prune ``model`` in place to :class:`PruneTarget`'s widths, every layer alike.

    Args:
        model: a Hugging Face causal LM (Llama, Qwen2, Gemma3 layouts), any device.
        settings: ratio, importance, layout (validated by PruneSettings).
        calibration: (rows, seq) token ids; required for Taylor importance.

    Returns:
        The target widths, the heads and channels each layer kept, parameter counts.

    Raises:
        PruneError: the model cannot be traced or divided as asked.
    """
    from edgeqra import _depgraph

    start = time.perf_counter()
    target = PruneTarget.from_config(model.config, settings)
    layers = _depgraph.find_layers(model)
    before = _count_params(model)
    if settings.importance is Importance.TAYLOR and calibration is None:
        raise PruneError("`importance` 'taylor' needs calibration rows; pass `calibration`")
    inter, heads, kv = target.before
    d = target.head_dim
    kept_heads = {layer.name: tuple(range(heads)) for layer in layers}
    kept_channels = {layer.name: tuple(range(inter)) for layer in layers}
    if not target.changes:
        return PruneOutcome(target, kept_heads, kept_channels, before, before, 0.0)

    dg = _depgraph.dependency_graph(model, layers)
    names = {id(m): n for n, m in model.named_modules()}
    limit = 64 * len(layers) + 256  # a layer's real groups hold tens of operations
    importance = _importance(settings)
    if calibration is not None and settings.importance is Importance.TAYLOR:
        _accumulate_gradients(model, calibration)

    plans = []  # (layer, mlp items, channels kept, attention items, heads kept)
    for layer in layers:
        mlp_items, attn_items, groups = _depgraph.couple(dg, layer, target, limit, names)
        mlp_imp = importance(_depgraph.subgroup(dg, mlp_items))  # (inter,)
        keep_ch = _top(mlp_imp, target.intermediate_size)
        head_imp = importance(_depgraph.subgroup(dg, attn_items)).view(heads, d).mean(1)
        if kv == heads:  # whole q/k/v/o heads
            keep_h = _top(head_imp, target.num_attention_heads)
        else:  # the same number of query heads leaves each key-value group
            per_group = target.num_attention_heads // kv
            keep_h = sorted(
                h for members in groups for h in
                (members[i] for i in _top(head_imp[list(members)], per_group))
            )  # fmt: skip
        plans.append((layer, mlp_items, keep_ch, attn_items, keep_h))
    model.zero_grad(set_to_none=True)

    for layer, mlp_items, keep_ch, attn_items, keep_h in plans:
        drop_ch = sorted(set(range(inter)) - set(keep_ch))
        if drop_ch:
            _depgraph.prune_items(dg, mlp_items, drop_ch)
        drop_h = sorted(set(range(heads)) - set(keep_h))
        if drop_h:
            channels = [h * d + c for h in drop_h for c in range(d)]
            _depgraph.prune_items(dg, attn_items, channels)
        groups_per_kv = target.num_attention_heads // target.num_key_value_heads
        layer.attention.num_key_value_groups = groups_per_kv
        if hasattr(layer.attention, "num_heads"):
            layer.attention.num_heads = target.num_attention_heads
        if hasattr(layer.mlp, "intermediate_size"):
            layer.mlp.intermediate_size = target.intermediate_size
        kept_heads[layer.name] = tuple(keep_h)
        kept_channels[layer.name] = tuple(keep_ch)
        _depgraph.check_layer(layer, target)
    _apply_widths(_text_config(model.config), target)
    if model.config is not _text_config(model.config):
        _apply_widths(model.config, target)  # pragma: no cover - multimodal wrappers
    after = _count_params(model)
    log.info("pruned %s: %d -> %d parameters", type(model).__name__, before, after)
    return PruneOutcome(
        target, kept_heads, kept_channels, before, after, time.perf_counter() - start
    )


# ----------------------------------------------------------------------------- folders


def read_record(folder: str | Path) -> dict[str, Any] | None:
    """The folder's ``pruning.json``, or None for a model that was not pruned here."""
    path = Path(folder) / PRUNING_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise PruneError(f"cannot read `{path}` ({exc}); re-run `edgeqra prune`") from None


def unpruned_config(folder: str | Path) -> Any | None:
    """The original model's config, as ``pruning.json`` recorded it (None if not pruned)."""
    record = read_record(folder)
    if record is None:
        return None
    from transformers import AutoConfig

    data = dict(record["source_config"])
    return AutoConfig.for_model(data.pop("model_type"), **data)


def _dtype_of(config: Any) -> torch.dtype:
    """The checkpoint's stored dtype (float32 when the config does not say)."""
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    return dtype if isinstance(dtype, torch.dtype) else torch.float32


def prune_folder(
    source: str | Path,
    out: str | Path,
    settings: PruneSettings,
    *,
    device: str = "cpu",
    trust_remote_code: bool = False,
) -> dict[str, Any]:
    """Prune a model and write a loadable HF folder at ``out`` atomically (temp dir, rename).

    Args:
        source: ``smollm2``, a HF folder or a .gguf file (as everywhere in edgeqra).
        out: the new folder; must not exist. It gets safetensors, config, tokenizer and
            ``pruning.json`` (settings, calibration, parameter counts, kept indices).
        settings: what to prune.
        device: where importance is computed (``auto``, ``cpu`` or ``cuda``).

    Returns:
        The ``pruning.json`` record.

    Raises:
        PruneError: bad settings or a model that cannot be pruned as asked; nothing is written.
    """
    from transformers import AutoConfig

    from edgeqra import __version__
    from edgeqra.data import calibration_batches
    from edgeqra.models import load_model, resolve_model
    from edgeqra.pipeline import resolve_device

    out = Path(out)
    if out.exists():
        raise PruneError(f"`out` {out} already exists; remove it or pass another folder")
    device = resolve_device(device)
    path = resolve_model(source)
    config = AutoConfig.from_pretrained(
        path, local_files_only=True, trust_remote_code=trust_remote_code
    )
    PruneTarget.from_config(config, settings, quiet=True)  # bad counts fail before loading
    dtype = _dtype_of(config)
    loaded = load_model(
        source, dtype=torch.float32, device=device, trust_remote_code=trust_remote_code
    )
    calibration = None
    if settings.importance is Importance.TAYLOR:
        calibration = calibration_batches(
            loaded.tokenizer,
            settings.calibration,
            n_samples=settings.calib_samples,
            seq_len=settings.calib_seq_len,
            seed=settings.seed,
        )
    source_config = loaded.model.config.to_dict()
    outcome = prune_model(loaded.model, settings, calibration)
    model = loaded.model.to(dtype=dtype, device="cpu")
    record = {
        "edgeqra_version": __version__,
        "torch_pruning_version": importlib.metadata.version("torch-pruning"),
        "source": str(source),
        "source_path": str(path),
        "settings": settings.to_json(),
        "ratio": settings.ratio,
        "importance": settings.importance.value,
        "layout": settings.layout.value,
        "calibration": None
        if calibration is None
        else {
            "source": settings.calibration,
            "rows": int(calibration.shape[0]),
            "seq_len": int(calibration.shape[1]),
            "seed": settings.seed,
        },
        **outcome.to_json(),
        "source_config": source_config,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        loaded.tokenizer.save_pretrained(tmp)
        (tmp / PRUNING_FILE).write_text(json.dumps(record, indent=2) + "\n")
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return record
