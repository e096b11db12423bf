"""The memory model M(C): bytes per component, per unit, for inference and for fine-tuning.

Everything is computed from the real module shapes (:class:`ModelSpec`), never from a
parameter count, so pruned or non-uniform models work. Components (METHOD.md):

* quantized weights: GPTQ packing as GPTQModel writes it (int32-packed q-bit weights,
  q-bit zeros and fp16 scales per group, int32 ``g_idx``, fp16 bias) — exact, tested
  against the tensors GPTQModel saves;
* unquantized tensors (embeddings, untied lm_head, norms) at the deployment dtype;
* LoRA: r·(d_in + d_out) per adapted linear; for fine-tuning also gradients and AdamW's
  two fp32 moments (PEFT keeps adapters in fp32 by default);
* activations for the workload's batch × sequence (with or without gradient checkpointing);
* KV cache: 2 · layers · kv_heads · head_dim · context · batch · dtype bytes;
* the device profile's runtime reserve (CUDA context, allocator slack, kernel workspace).

The activation terms are a model of what PyTorch autograd saves; the measured-vs-predicted
error on a real GPU is published in ``bench/RESULTS.md``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from edgeqra.models import Unit, find_units
from edgeqra.profiles import BudgetMode, DeviceProfile, FinetuneWorkload, InferenceWorkload
from edgeqra.space import FP16_BITS, Config

__all__ = [
    "Breakdown",
    "ModelSpec",
    "estimate",
    "estimate_for_profile",
    "gptq_linear_bytes",
    "lora_params",
]

GiB = 1 << 30
MiB = 1 << 20


def gptq_linear_bytes(
    d_in: int, d_out: int, bits: int, group_size: int, *, bias: bool, desc_act: bool = False
) -> int:
    """Exact bytes GPTQModel stores for one quantized linear (d_in -> d_out).

    qweight int32 (d_in·bits/32, d_out); qzeros int32 (groups, d_out·bits/32); scales fp16
    (groups, d_out); g_idx int32 (d_in); bias fp16 (d_out). ``desc_act`` changes the order of
    g_idx, not its size.
    """
    del desc_act  # g_idx is always stored (sequential when act-order is off)
    groups = 1 if group_size <= 0 else math.ceil(d_in / group_size)
    qweight = math.ceil(d_in * bits / 32) * d_out * 4
    qzeros = groups * math.ceil(d_out * bits / 32) * 4
    scales = groups * d_out * 2
    g_idx = d_in * 4
    return qweight + qzeros + scales + g_idx + (d_out * 2 if bias else 0)


def lora_params(d_in: int, d_out: int, rank: int) -> int:
    """Parameters of one LoRA adapter: A (r, d_in) and B (d_out, r)."""
    return rank * (d_in + d_out)


@dataclass(frozen=True)
class ModelSpec:
    """What the memory model needs to know of a model: shapes only, no weights."""

    units: tuple[Unit, ...]
    other_numel: int  # parameters outside the units' linears (embeddings, norms, lm_head)
    hidden_size: int
    intermediate_size: int
    vocab_size: int
    num_attention_heads: int
    num_kv_heads: int
    head_dim: int
    kv_window: tuple[int | None, ...]  # per layer: None = full context, else sliding window

    @classmethod
    def from_model(cls, model: nn.Module) -> ModelSpec:
        """Read shapes from a (possibly meta-device) HF causal LM."""
        units = find_units(model)
        in_units = {
            f"{lin.name}.{p}" for u in units for lin in u.linears for p in ("weight", "bias")
        }
        # named_parameters de-duplicates tied tensors, so a tied lm_head counts once.
        other = sum(p.numel() for n, p in model.named_parameters() if n not in in_units)
        cfg = getattr(model.config, "get_text_config", lambda: model.config)()
        heads = cfg.num_attention_heads
        kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
        layer_types = getattr(cfg, "layer_types", None) or ["full_attention"] * len(units)
        window = getattr(cfg, "sliding_window", None)
        kv_window = tuple(
            window if (t == "sliding_attention" and window) else None for t in layer_types
        )
        return cls(
            units=units,
            other_numel=other,
            hidden_size=cfg.hidden_size,
            intermediate_size=cfg.intermediate_size,
            vocab_size=cfg.vocab_size,
            num_attention_heads=heads,
            num_kv_heads=kv_heads,
            head_dim=head_dim,
            kv_window=kv_window,
        )

    @classmethod
    def from_config(cls, config: object) -> ModelSpec:
        """Shapes of an architecture from its HF config alone (meta device: no memory)."""
        from transformers import AutoModelForCausalLM

        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
        return cls.from_model(model)

    @property
    def n_units(self) -> int:
        """Number of units (decoder layers)."""
        return len(self.units)

    @property
    def unit_params(self) -> tuple[int, ...]:
        """Linear weight parameters per unit (for parameter-weighted average bits)."""
        return tuple(u.params for u in self.units)


@dataclass(frozen=True)
class Breakdown:
    """Predicted bytes by component, plus the per-unit share of weights and adapters."""

    mode: BudgetMode
    components: dict[str, int]
    per_unit: tuple[int, ...] = field(default=())

    @property
    def total(self) -> int:
        """Sum of all components, in bytes."""
        return sum(self.components.values())

    def fits(self, budget_bytes: int) -> bool:
        """Whether the prediction is within a hard budget."""
        return self.total <= budget_bytes

    def to_json(self) -> dict[str, object]:
        """JSON-ready dict (bytes)."""
        return {
            "mode": self.mode.value,
            "total": self.total,
            "components": dict(self.components),
            "per_unit": list(self.per_unit),
        }


def _weight_bytes(spec: ModelSpec, config: Config, group_size: int, dtype_bytes: int) -> list[int]:
    """Stored bytes of each unit's linears at its bit-width."""
    out = []
    for unit, choice in zip(spec.units, config, strict=True):
        total = 0
        for lin in unit.linears:
            if choice.bits >= FP16_BITS:
                total += (lin.d_in * lin.d_out + (lin.d_out if lin.bias else 0)) * dtype_bytes
            else:
                total += gptq_linear_bytes(
                    lin.d_in, lin.d_out, choice.bits, group_size, bias=lin.bias
                )
        out.append(total)
    return out


def _lora_params_per_unit(spec: ModelSpec, config: Config) -> list[int]:
    """Adapter parameters of each unit at its rank."""
    return [
        sum(lora_params(lin.d_in, lin.d_out, choice.rank) for lin in unit.linears)
        for unit, choice in zip(spec.units, config, strict=True)
    ]


def _kv_cache_bytes(spec: ModelSpec, work: InferenceWorkload, dtype_bytes: int) -> int:
    """2 (K and V) · kv_heads · head_dim · cached tokens · batch · bytes, summed over layers."""
    per_token = 2 * spec.num_kv_heads * spec.head_dim * dtype_bytes * work.batch
    return sum(
        per_token * (work.context if w is None else min(w, work.context)) for w in spec.kv_window
    )


def _inference_activation_bytes(spec: ModelSpec, work: InferenceWorkload, dtype_bytes: int) -> int:
    """Peak transient tensors of one prefill layer plus last-token fp32 logits.

    During prefill one layer at a time is live: the residual stream and its normed copy (2h),
    q, k, v (h + 2·kv), and the MLP's gate, up and activated gate (3·i).
    """
    h, i = spec.hidden_size, spec.intermediate_size
    kv = spec.num_kv_heads * spec.head_dim
    tokens = work.batch * work.context
    layer = tokens * (3 * h + 2 * kv + 3 * i) * dtype_bytes
    logits = work.batch * spec.vocab_size * 4  # generate keeps only the last position
    return layer + logits


def _finetune_activation_bytes(
    spec: ModelSpec, config: Config, work: FinetuneWorkload, dtype_bytes: int
) -> int:
    """Tensors autograd keeps for backward, for one micro-batch.

    Per layer and token, without checkpointing: about 10·h (norm inputs/outputs, attention
    input/output, o_proj input), 4·kv (k, v and their rotary copies), 4·i (gate, up, act,
    down input) at the compute dtype, plus each adapter's fp32 copy of its input and its
    rank-sized hidden. With checkpointing only each layer's input (h) is kept, and one
    layer's full set is alive during its recomputation. Logits: compute-dtype logits, their
    fp32 upcast and the fp32 log-softmax saved by cross-entropy.
    """
    h, i = spec.hidden_size, spec.intermediate_size
    kv = spec.num_kv_heads * spec.head_dim
    tokens = work.micro_batch * work.seq_len
    base_layer = (10 * h + 4 * kv + 4 * i) * dtype_bytes

    def adapter_bytes(unit: Unit, rank: int) -> int:
        if rank == 0:
            return 0
        return sum((lin.d_in + rank) * 4 for lin in unit.linears)

    per_layer = [
        base_layer + adapter_bytes(u, c.rank) for u, c in zip(spec.units, config, strict=True)
    ]
    if work.gradient_checkpointing:
        layers = spec.n_units * h * dtype_bytes + max(per_layer)
    else:
        layers = sum(per_layer)
    logits = spec.vocab_size * (dtype_bytes + 4 + 4)
    return tokens * (layers + logits)


def estimate(
    spec: ModelSpec,
    config: Config,
    *,
    mode: BudgetMode,
    inference: InferenceWorkload | None = None,
    finetune: FinetuneWorkload | None = None,
    reserve_bytes: int = 0,
    group_size: int = 64,
    dtype_bytes: int = 2,
    merged_adapters: bool = False,
) -> Breakdown:
    """Predict peak memory of ``config`` on ``spec`` for one mode.

    Args:
        spec: model shapes (:meth:`ModelSpec.from_model`).
        config: one (bits, rank) per unit; bits 16 = unquantized.
        mode: inference or fine-tuning (BOTH is handled by :func:`estimate_for_profile`).
        inference / finetune: the workload of that mode.
        reserve_bytes: the profile's runtime reserve (CUDA context, allocator slack).
        group_size: GPTQ group size.
        dtype_bytes: bytes of the compute / unquantized dtype (2 for fp16/bf16).
        merged_adapters: inference only: adapters merged into the weights cost nothing;
            otherwise they are held separately in the compute dtype (the exact form).
    """
    if len(config) != spec.n_units:
        from edgeqra.errors import ConfigError

        raise ConfigError(f"config has {len(config)} units but the model has {spec.n_units}")
    weights = _weight_bytes(spec, config, group_size, dtype_bytes)
    lora = _lora_params_per_unit(spec, config)
    components: dict[str, int] = {
        "quantized_weights": sum(
            w for w, c in zip(weights, config, strict=True) if c.bits < FP16_BITS
        ),
        "unquantized_weights": spec.other_numel * dtype_bytes
        + sum(w for w, c in zip(weights, config, strict=True) if c.bits >= FP16_BITS),
    }
    if mode is BudgetMode.INFERENCE:
        if inference is None:
            raise ValueError("estimate(mode=INFERENCE) needs an `inference` workload")
        lora_bytes_per_param = 0 if merged_adapters else dtype_bytes
        components["lora_weights"] = sum(lora) * lora_bytes_per_param
        components["kv_cache"] = _kv_cache_bytes(spec, inference, dtype_bytes)
        components["activations"] = _inference_activation_bytes(spec, inference, dtype_bytes)
        per_unit = tuple(w + p * lora_bytes_per_param for w, p in zip(weights, lora, strict=True))
    elif mode is BudgetMode.FINETUNE:
        if finetune is None:
            raise ValueError("estimate(mode=FINETUNE) needs a `finetune` workload")
        # PEFT keeps adapters in fp32: weights 4 B, grads 4 B, AdamW exp_avg + exp_avg_sq 8 B.
        components["lora_weights"] = sum(lora) * 4
        components["lora_grads"] = sum(lora) * 4
        components["optimizer_states"] = sum(lora) * 8
        components["activations"] = _finetune_activation_bytes(spec, config, finetune, dtype_bytes)
        per_unit = tuple(w + p * 16 for w, p in zip(weights, lora, strict=True))
    else:
        raise ValueError(f"estimate() takes INFERENCE or FINETUNE, not {mode}")
    components["reserve"] = reserve_bytes
    return Breakdown(mode, components, per_unit)


def estimate_for_profile(
    spec: ModelSpec,
    config: Config,
    profile: DeviceProfile,
    *,
    mode: BudgetMode | None = None,
    group_size: int = 64,
    merged_adapters: bool = False,
) -> Breakdown:
    """Estimate with the profile's workloads and reserve; BOTH returns the larger mode."""
    mode = mode or profile.mode
    kwargs = dict(
        inference=profile.inference,
        finetune=profile.finetune,
        reserve_bytes=profile.reserve_bytes,
        group_size=group_size,
        merged_adapters=merged_adapters,
    )
    if mode is BudgetMode.BOTH:
        both: Sequence[Breakdown] = [
            estimate(spec, config, mode=m, **kwargs)  # type: ignore[arg-type]
            for m in (BudgetMode.INFERENCE, BudgetMode.FINETUNE)
        ]
        return max(both, key=lambda b: b.total)
    return estimate(spec, config, mode=mode, **kwargs)  # type: ignore[arg-type]
