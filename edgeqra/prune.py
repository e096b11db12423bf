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

The settings and the widths they resolve to live in :mod:`edgeqra.prune_settings`
(re-exported here), the DepGraph side (tracing, coupling checks, pruning by index) in
:mod:`edgeqra.depgraph`; this module holds the importance ranking, the pruning and the folder
I/O.

``layout = layerwise`` (LLM-Pruner's block-wise rule: first and last layers whole, the middle
pruned harder) is refused: no standard config can hold per-layer widths (see
:data:`LAYERWISE_REFUSAL`).
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from edgeqra.prune_settings import (
    LAYERWISE_REFUSAL,
    Importance,
    Layout,
    PruneError,
    PruneSettings,
    PruneTarget,
    apply_widths,
    pruned_config,
    text_config,
)

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
    from edgeqra import depgraph

    start = time.perf_counter()
    target = PruneTarget.from_config(model.config, settings)
    layers = depgraph.find_layers(model)
    before = _count_params(model)
    if settings.importance is Importance.TAYLOR and calibration is None:
        raise PruneError("`importance` 'taylor' needs calibration rows; pass `calibration`")
    inter, heads, kv = target.before
    d = target.head_dim
    kept_heads = {layer.name: tuple(range(heads)) for layer in layers}
    kept_channels = {layer.name: tuple(range(inter)) for layer in layers}
    if not target.changes:
        return PruneOutcome(target, kept_heads, kept_channels, before, before, 0.0)

    dg = depgraph.dependency_graph(model, layers)
    names = {id(m): n for n, m in model.named_modules()}
    limit = 64 * len(layers) + 256  # a layer's real groups hold tens of operations
    importance = _importance(settings)
    if calibration is not None and settings.importance is Importance.TAYLOR:
        _accumulate_gradients(model, calibration)

    plans = []  # (layer, mlp items, channels kept, attention items, heads kept)
    for layer in layers:
        mlp_items, attn_items, groups = depgraph.couple(dg, layer, target, limit, names)
        mlp_imp = importance(depgraph.subgroup(dg, mlp_items))  # (inter,)
        keep_ch = _top(mlp_imp, target.intermediate_size)
        head_imp = importance(depgraph.subgroup(dg, attn_items)).view(heads, d).mean(1)
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
            depgraph.prune_items(dg, mlp_items, drop_ch)
        drop_h = sorted(set(range(heads)) - set(keep_h))
        if drop_h:
            channels = [h * d + c for h in drop_h for c in range(d)]
            depgraph.prune_items(dg, attn_items, channels)
        groups_per_kv = target.num_attention_heads // target.num_key_value_heads
        layer.attention.num_key_value_groups = groups_per_kv
        if hasattr(layer.attention, "num_heads"):
            layer.attention.num_heads = target.num_attention_heads
        if hasattr(layer.mlp, "intermediate_size"):
            layer.mlp.intermediate_size = target.intermediate_size
        kept_heads[layer.name] = tuple(keep_h)
        kept_channels[layer.name] = tuple(keep_ch)
        depgraph.check_layer(layer, target)
    apply_widths(text_config(model.config), target)
    if model.config is not text_config(model.config):
        apply_widths(model.config, target)  # pragma: no cover - multimodal wrappers
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
    from edgeqra.device import resolve_device
    from edgeqra.models import load_model, resolve_model

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
