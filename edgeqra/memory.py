"""The memory model M(C): bytes per component, per unit, for inference and for fine-tuning.

Everything is computed from the real module shapes (:class:`ModelSpec`), never from a
parameter count, so pruned or non-uniform models work. The prediction is PyTorch's peak
*allocated* bytes plus the profile's reserve; it must never be below what a GPU measures
(issue 15: ``bench/memory_truth.py``, replayed offline by ``bench/memory_replay.py``).
Components (METHOD.md), each one term with its reason:

* quantized weights: GPTQ packing as GPTQModel writes it (int32-packed q-bit weights,
  q-bit zeros and fp16 scales per group, int32 ``g_idx``, fp16 bias) — exact, tested
  against the tensors GPTQModel saves;
* unquantized tensors (embeddings, untied lm_head, norms) at the deployment dtype;
* LoRA: r·(d_in + d_out) per adapted linear; for fine-tuning also gradients and AdamW's
  two fp32 moments (PEFT keeps adapters in fp32 by default);
* activations: inference, the largest transient moment of ``generate`` (a prefill layer,
  a dequantizing kernel's dense W, a decode step's KV copy); fine-tuning, what autograd
  saves (counted with saved-tensor hooks) at the larger of the loss's backward and a
  layer's (recomputed) backward; ``logits``: the prefill's last-position logits;
* dequant_buffers: the quantized base's dense weights alive at the fine-tuning peak (one
  with ``edgeqra.qlinear``'s recompute backward, all with GPTQModel's own path);
* KV cache: 2 · layers · kv_heads · head_dim · context · batch · dtype bytes;
* kernel_caches: GPTQModel's per-module decoded zero points, int64 g_idx, shift tables;
* cublas_workspace: PyTorch's cuBLAS workspace per thread that runs a matmul;
* allocator_rounding: the caching allocator's 512 B blocks around persistent tensors;
* allocator_step: what the allocator holds at a fine-tuning peak without checkpointing
  beyond every live tensor, per adapted layer and token (measured, cause not yet named);
* the device profile's runtime reserve: measured CUDA context outside the allocator and
  allocator slack (``bench/gpu/README.md``).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import NamedTuple

import torch
from torch import nn

from edgeqra.models import Unit, find_units
from edgeqra.profiles import BudgetMode, DeviceProfile, FinetuneWorkload, InferenceWorkload
from edgeqra.space import FP16_BITS, Config

__all__ = [
    "ALLOC_ROUND",
    "Breakdown",
    "ModelSpec",
    "QuantizedBackward",
    "cublas_workspace_bytes",
    "estimate",
    "estimate_for_profile",
    "gptq_linear_bytes",
    "lora_params",
]

GiB = 1 << 30
MiB = 1 << 20
ALLOC_ROUND = 512  # PyTorch's CUDA caching allocator rounds every block up to 512 B


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

    @functools.cached_property
    def unit_shapes(self) -> tuple[tuple[tuple[int, int, bool], ...], ...]:
        """Per unit, its linears' (d_in, d_out, bias): the key of :func:`_unit_terms`."""
        return tuple(tuple((x.d_in, x.d_out, x.bias) for x in u.linears) for u in self.units)

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


class _UnitTerms(NamedTuple):
    """What one unit at one (bits, rank) contributes, independent of the workload."""

    weights: int  # stored bytes of its linears
    lora: int  # adapter parameters
    packed_rounding: int  # allocator rounding of the packed tensors (0 unquantized)
    kernel_caches: int  # GPTQModel's per-module caches (0 unquantized)
    dense_sum: int  # bytes of its linears' dense weights if quantized, else 0
    dense_max: int  # the largest of them, else 0
    adapter_saved: int  # bytes per token its adapters save for backward (fp32 input + hidden)
    lora_rounding: int  # allocator rounding of one copy of its adapters at the compute dtype
    lora_rounding_fp32: int  # ... of one fp32 copy (PEFT's trainable adapters)


# A search asks the memory model for tens of thousands of configs (repair and fill measure
# every one-step move, stage 3 repairs hundreds of walks per proposal): on the H200 host the
# GP's first proposal took 120 s, nearly all in these per-linear sums. A unit's terms depend
# only on its shapes and choice, so they are memoised per (shapes, bits, rank) — a pure
# function, identical across the layers of a model.
@functools.lru_cache(maxsize=4096)
def _unit_terms(
    shapes: tuple[tuple[int, int, bool], ...],
    bits: int,
    rank: int,
    group_size: int,
    dtype_bytes: int,
) -> _UnitTerms:
    weights = packed = caches = dense_sum = dense_max = 0
    for d_in, d_out, bias in shapes:
        if bits >= FP16_BITS:
            weights += (d_in * d_out + (d_out if bias else 0)) * dtype_bytes
            continue
        weights += gptq_linear_bytes(d_in, d_out, bits, group_size, bias=bias)
        groups = 1 if group_size <= 0 else math.ceil(d_in / group_size)
        sizes = [
            math.ceil(d_in * bits / 32) * d_out * 4,
            groups * math.ceil(d_out * bits / 32) * 4,
            groups * d_out * 2,
            d_in * 4,
        ] + ([d_out * 2] if bias else [])
        packed += sum(_round_up(n) - n for n in sizes)
        caches += groups * d_out * (2 if bits == 8 else 1) + 8 * d_in + 2 * ALLOC_ROUND
        dense_sum += d_in * d_out * dtype_bytes
        dense_max = max(dense_max, d_in * d_out * dtype_bytes)
    lora = sum(lora_params(d_in, d_out, rank) for d_in, d_out, _ in shapes)
    saved = 0 if rank == 0 else sum(4 * (d_in + rank) for d_in, _, _ in shapes)
    rounding = _lora_rounding(shapes, rank, dtype_bytes), _lora_rounding(shapes, rank, 4)
    return _UnitTerms(weights, lora, packed, caches, dense_sum, dense_max, saved, *rounding)


@functools.lru_cache(maxsize=1024)
def _lora_rounding(shapes: tuple[tuple[int, int, bool], ...], rank: int, elem_bytes: int) -> int:
    """Allocator rounding of one copy of a unit's adapter matrices (A and B)."""
    if not rank or not elem_bytes:
        return 0
    return sum(
        _round_up(n * elem_bytes) - n * elem_bytes
        for d_in, d_out, _ in shapes
        for n in (rank * d_in, rank * d_out)
    )


def _terms(spec: ModelSpec, config: Config, group_size: int, dtype_bytes: int) -> list[_UnitTerms]:
    """Each unit's :class:`_UnitTerms` at its choice."""
    return [
        _unit_terms(shapes, c.bits, c.rank, group_size, dtype_bytes)
        for shapes, c in zip(spec.unit_shapes, config, strict=True)
    ]


def _kv_cache_bytes(spec: ModelSpec, work: InferenceWorkload, dtype_bytes: int) -> int:
    """2 (K and V) · kv_heads · head_dim · cached tokens · batch · bytes, summed over layers."""
    per_token = 2 * spec.num_kv_heads * spec.head_dim * dtype_bytes * work.batch
    return sum(
        per_token * (work.context if w is None else min(w, work.context)) for w in spec.kv_window
    )


def _round_up(n: int, to: int = ALLOC_ROUND) -> int:
    """``n`` rounded up to the allocator's block granularity."""
    return -(-n // to) * to


def _inference_activation_bytes(
    spec: ModelSpec, terms: Sequence[_UnitTerms], work: InferenceWorkload, dtype_bytes: int
) -> int:
    """Peak transient tensors of generate: the largest of three moments.

    * a prefill layer (issue 15: +h +i over issue 4's count, measured 0.014-0.127 GiB short):
      residual, normed input, attention output and o_proj output (4h), k and v (2kv), the
      MLP's gate, up, act(gate) and their product alive together (4i);
    * a dequantizing kernel's down_proj (Triton and torch build the dense W before the
      matmul): its input (i), output and the residual (2h), plus the largest dense W;
    * a decode step: DynamicCache's ``torch.cat`` copies one layer's K and V.
    """
    h, i = spec.hidden_size, spec.intermediate_size
    kv = spec.num_kv_heads * spec.head_dim
    tokens = work.batch * work.context
    layer = tokens * (4 * h + 2 * kv + 4 * i) * dtype_bytes
    dense_w = max((t.dense_max for t in terms), default=0)
    dequant = tokens * (i + 2 * h) * dtype_bytes + dense_w if dense_w else 0
    decode = 2 * kv * work.batch * work.context * dtype_bytes
    return max(layer, dequant, decode)


def _finetune_layer_bytes(spec: ModelSpec, unit: Unit, rank: int, dtype_bytes: int) -> int:
    """Bytes per token one decoder layer saves for backward (frozen base, LoRA adapters).

    Counted with ``saved_tensors_hooks`` on CPU (tests/test_memory.py): a frozen linear
    saves no input (no weight grad); each RMSNorm saves its fp32 input and rsqrt (2 · (4h
    + 4)); attention saves q and its output (2h) and k, v (2kv) at the compute dtype plus an
    fp32 logsumexp per head; the MLP saves gate, act(gate) and up (3i); every adapter saves
    its fp32 copy of the input (4·d_in) and its rank-sized hidden (4r).
    """
    shapes = tuple((x.d_in, x.d_out, x.bias) for x in unit.linears)
    adapters = _unit_terms(shapes, FP16_BITS, rank, 0, dtype_bytes).adapter_saved
    return _base_layer_bytes(spec, dtype_bytes) + adapters


def _base_layer_bytes(spec: ModelSpec, dtype_bytes: int) -> int:
    """:func:`_finetune_layer_bytes` without the adapters: norms, attention and MLP."""
    h, i = spec.hidden_size, spec.intermediate_size
    kv = spec.num_kv_heads * spec.head_dim
    norms = 2 * (4 * h + 4)
    attention = (2 * h + 2 * kv) * dtype_bytes + 4 * spec.num_attention_heads
    mlp = 3 * i * dtype_bytes
    return norms + attention + mlp


def _loss_peak_bytes(spec: ModelSpec, dtype_bytes: int) -> int:
    """Bytes per token at the loss's backward: the model's logits at the compute dtype, the
    fp32 log-softmax cross-entropy saved, the fp32 gradient NLL hands it and the fp32 one it
    returns (3 · 4 · vocab), all alive in ``LogSoftmaxBackward``."""
    return spec.vocab_size * (dtype_bytes + 12)


def _finetune_peak_bytes(
    spec: ModelSpec,
    config: Config,
    terms: Sequence[_UnitTerms],
    work: FinetuneWorkload,
    backward: QuantizedBackward,
    dtype_bytes: int,
) -> tuple[int, int]:
    """(activations, dequant_buffers) at the training step's peak, for one micro-batch.

    Two moments can be the peak. The loss's backward: every saved tensor is alive (only each
    checkpointed layer's input and the final norm's fp32 input with checkpointing) plus the
    loss's buffers (:func:`_loss_peak_bytes`). A layer's backward: the same saved tensors
    (with checkpointing, the recomputed layer's full set), the logits (still referenced by
    the training loop), that layer's gradients (at most as large as what it saved) and the
    dense weight(s) its backward dequantizes. Units before the first adapter build no graph.

    The quantized base's dense weights: recompute (``edgeqra.qlinear``) rebuilds one W at a
    time in the layer moment; saved (GPTQModel's ``matmul(x, W)``) keeps every W from the
    first adapter on alive in both moments, or only the recomputed unit's with checkpointing.
    ``dequant_buffers`` is what they add to the peak.
    """
    tokens = work.micro_batch * work.seq_len
    h = spec.hidden_size
    first = _first_trained_unit(config)
    base = _base_layer_bytes(spec, dtype_bytes)  # + each unit's adapters: _finetune_layer_bytes
    per_layer = [base + t.adapter_saved if k >= first else 0 for k, t in enumerate(terms)]
    trained = terms[first:]  # units before the first adapter keep no dense weight either
    largest_w = max((t.dense_max for t in trained), default=0)
    final_norm = 4 * h + 4
    loss = tokens * _loss_peak_bytes(spec, dtype_bytes)
    layer = tokens * (spec.vocab_size * dtype_bytes + max(per_layer))  # logits + grads
    if work.gradient_checkpointing:
        kept = tokens * ((spec.n_units - first) * h * dtype_bytes + final_norm)
        layer += tokens * max(per_layer)  # the recomputed layer's saved set
        always = 0
        in_layer = (
            largest_w
            if backward is QuantizedBackward.RECOMPUTE
            else max((t.dense_sum for t in trained), default=0)
        )
    else:
        kept = tokens * (sum(per_layer) + final_norm)
        saved = backward is QuantizedBackward.SAVED
        always = sum(t.dense_sum for t in trained) if saved else 0
        in_layer = 0 if saved else largest_w
    activations = kept + max(loss, layer)
    peak = kept + always + max(loss, layer + in_layer)
    return activations, peak - activations


def _first_trained_unit(config: Config) -> int:
    """Index of the first unit with an adapter (``len(config)`` when none has one)."""
    return next((k for k, c in enumerate(config) if c.rank > 0), len(config))


def _kernel_cache_bytes(terms: Sequence[_UnitTerms]) -> int:
    """What GPTQModel's trainable kernels hold beyond the packed tensors, per QuantLinear.

    Its torch dequant path caches the decoded zero points (groups × d_out, int8; int16 at 8
    bits, ``TorchLinear._stream_decode_qzeros``) and an int64 g_idx (``_stream_g_idx_long``);
    two shift tables (``wf_unsqueeze_*``) take one allocator block each. Measured after the
    build on an H200 (issue 15): up to 113 MiB beyond the cuBLAS workspaces (Llama-3.1-8B,
    3 bits), which is this count.
    """
    return sum(t.kernel_caches for t in terms)  # counted per linear in _unit_terms


def _rounding_bytes(terms: Sequence[_UnitTerms], lora_copies: int, lora_fp32: bool) -> int:
    """Allocator rounding of the persistent tensors: every block is a multiple of 512 B.

    Packed tensors of each quantized linear, and each adapter matrix (A and B) times the
    copies alive (weights at the compute dtype; in training fp32 weights + grads + two AdamW
    moments).
    """
    packed = sum(t.packed_rounding for t in terms)
    if lora_fp32:
        adapters = sum(t.lora_rounding_fp32 for t in terms)
    else:
        adapters = sum(t.lora_rounding for t in terms)
    return packed + lora_copies * adapters


# Measured on the H200 (issue 15, bench/RESULTS.md "Where the two shortfalls sit"): without
# checkpointing SmolLM2's fine-tuning peak is short by 1.46 MiB per adapted layer at 2 x 1024
# tokens (a fit over nine configs, at most 2.3 MiB off), i.e. ~750 B per token and adapted
# layer, while the live tensors at that peak equal the CPU census's and the model's count.
_STEP_BYTES_PER_TOKEN_AND_ADAPTED_LAYER = 768


def _allocator_step_bytes(config: Config, work: FinetuneWorkload) -> int:
    """Bytes the allocator holds at the step's peak beyond the live tensors, per adapted
    layer and token, without gradient checkpointing.

    It follows the layers that carry an adapter, whose saved tensors checkpointing does not
    keep, so it is counted only without checkpointing (where the H200 rows fall short; with
    checkpointing they are over). The cause is not named yet: ``bench/peak_census.py
    --snapshot`` attributes those blocks to the Python frame that allocated them.
    """
    if work.gradient_checkpointing:
        return 0
    adapted = sum(1 for c in config if c.rank > 0)
    return adapted * work.micro_batch * work.seq_len * _STEP_BYTES_PER_TOKEN_AND_ADAPTED_LAYER


def cublas_workspace_bytes(compute_capability: tuple[int, int] | None) -> int:
    """PyTorch's default cuBLAS workspace per handle (``CUBLAS_WORKSPACE_CONFIG`` unset).

    ``parseChosenWorkspaceSize`` in ATen's ``CublasHandlePool.cpp``: 32 MiB on sm_90
    (Hopper), else 4096 KiB · 2 + 16 KiB · 8. Unknown device (None): the larger.
    """
    if compute_capability is None or tuple(compute_capability) == (9, 0):
        return 4096 * 8 * 1024
    return 4096 * 1024 * 2 + 16 * 1024 * 8


class QuantizedBackward(str, Enum):
    """What the quantized base keeps for backward during LoRA fine-tuning."""

    RECOMPUTE = "recompute"  # edgeqra.qlinear: W rebuilt in backward, one layer at a time
    SAVED = "saved"  # GPTQModel's own autograd path: every layer's dense W saved


# The defaults of `estimate`, which `estimate_for_profile` (the profiles' path) shares.
_DTYPE_BYTES = 2  # fp16/bf16 compute
_BACKWARD = QuantizedBackward.RECOMPUTE  # edgeqra's fine-tuning path (edgeqra.qlinear)


def estimate(
    spec: ModelSpec,
    config: Config,
    *,
    mode: BudgetMode,
    inference: InferenceWorkload | None = None,
    finetune: FinetuneWorkload | None = None,
    reserve_bytes: int = 0,
    group_size: int = 64,
    dtype_bytes: int = _DTYPE_BYTES,
    merged_adapters: bool = False,
    compute_capability: tuple[int, int] | None = None,
    quantized_backward: QuantizedBackward | str = _BACKWARD,
    cublas_handles: int | None = None,
) -> Breakdown:
    """Predict peak memory of ``config`` on ``spec`` for one mode.

    Args:
        spec: model shapes (:meth:`ModelSpec.from_model`).
        config: one (bits, rank) per unit; bits 16 = unquantized.
        mode: inference or fine-tuning (BOTH is handled by :func:`estimate_for_profile`).
        inference / finetune: the workload of that mode.
        reserve_bytes: the profile's runtime reserve (CUDA context outside the allocator,
            allocator slack: measured, ``bench/gpu/README.md``).
        group_size: GPTQ group size.
        dtype_bytes: bytes of the compute / unquantized dtype (2 for fp16/bf16).
        merged_adapters: inference only: adapters merged into the weights cost nothing;
            otherwise they are held separately in the compute dtype (the exact form).
        compute_capability: the GPU's (major, minor), for the cuBLAS workspace size
            (None: the largest).
        quantized_backward: ``recompute`` (edgeqra's path, at most one dense weight alive
            in backward) or ``saved`` (GPTQModel's own: every layer's dense weight saved).
        cublas_handles: cuBLAS handles with a workspace (default: 1 for inference, 2 for
            fine-tuning: the forward thread's and the autograd engine's).
    """
    _check_units(spec, config)
    terms = _terms(spec, config, group_size, dtype_bytes)
    return _estimate(
        spec, config, terms, mode=mode, inference=inference, finetune=finetune,
        reserve_bytes=reserve_bytes, dtype_bytes=dtype_bytes, merged_adapters=merged_adapters,
        compute_capability=compute_capability, quantized_backward=quantized_backward,
        cublas_handles=cublas_handles,
    )  # fmt: skip


def _check_units(spec: ModelSpec, config: Config) -> None:
    """A config must give every unit of the model one choice."""
    if len(config) != spec.n_units:
        from edgeqra.errors import ConfigError

        raise ConfigError(f"config has {len(config)} units but the model has {spec.n_units}")


def _estimate(
    spec: ModelSpec,
    config: Config,
    terms: Sequence[_UnitTerms],
    *,
    mode: BudgetMode,
    inference: InferenceWorkload | None,
    finetune: FinetuneWorkload | None,
    reserve_bytes: int,
    dtype_bytes: int,
    merged_adapters: bool,
    compute_capability: tuple[int, int] | None,
    quantized_backward: QuantizedBackward | str,
    cublas_handles: int | None,
) -> Breakdown:
    """:func:`estimate` from the units' terms (computed once when both modes are wanted)."""
    backward = QuantizedBackward(quantized_backward)
    weights = [t.weights for t in terms]
    lora = [t.lora for t in terms]
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
        components["lora_grads"] = 0
        components["optimizer_states"] = 0
        components["kv_cache"] = _kv_cache_bytes(spec, inference, dtype_bytes)
        components["activations"] = _inference_activation_bytes(spec, terms, inference, dtype_bytes)
        # Prefill logits: the last position's logits, generate's fp32 copy, processed scores.
        components["logits"] = inference.batch * spec.vocab_size * (dtype_bytes + 8)
        components["dequant_buffers"] = 0  # the dequantizing kernel's W is in `activations`
        components["allocator_step"] = 0
        handles = 1 if cublas_handles is None else cublas_handles
        rounding = _rounding_bytes(terms, 1 if lora_bytes_per_param else 0, lora_fp32=False)
        per_unit = tuple(w + p * lora_bytes_per_param for w, p in zip(weights, lora, strict=True))
    elif mode is BudgetMode.FINETUNE:
        if finetune is None:
            raise ValueError("estimate(mode=FINETUNE) needs a `finetune` workload")
        # PEFT keeps adapters in fp32: weights 4 B, grads 4 B, AdamW exp_avg + exp_avg_sq 8 B.
        components["lora_weights"] = sum(lora) * 4
        components["lora_grads"] = sum(lora) * 4
        components["optimizer_states"] = sum(lora) * 8
        components["kv_cache"] = 0
        components["activations"], components["dequant_buffers"] = _finetune_peak_bytes(
            spec, config, terms, finetune, backward, dtype_bytes
        )
        components["logits"] = 0  # the loss's buffers are one moment of `activations`
        handles = 2 if cublas_handles is None else cublas_handles
        rounding = _rounding_bytes(terms, 4, lora_fp32=True)
        components["allocator_step"] = _allocator_step_bytes(config, finetune)
        per_unit = tuple(w + p * 16 for w, p in zip(weights, lora, strict=True))
    else:
        raise ValueError(f"estimate() takes INFERENCE or FINETUNE, not {mode}")
    components["kernel_caches"] = _kernel_cache_bytes(terms)
    components["cublas_workspace"] = handles * cublas_workspace_bytes(compute_capability)
    components["allocator_rounding"] = rounding
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
    _check_units(spec, config)
    terms = _terms(spec, config, group_size, _DTYPE_BYTES)
    kwargs = dict(
        inference=profile.inference,
        finetune=profile.finetune,
        reserve_bytes=profile.reserve_bytes,
        dtype_bytes=_DTYPE_BYTES,
        merged_adapters=merged_adapters,
        compute_capability=profile.compute_capability_tuple,
        quantized_backward=_BACKWARD,
        cublas_handles=None,
    )
    if mode is BudgetMode.BOTH:
        both: Sequence[Breakdown] = [
            _estimate(spec, config, terms, mode=m, **kwargs)  # type: ignore[arg-type]
            for m in (BudgetMode.INFERENCE, BudgetMode.FINETUNE)
        ]
        return max(both, key=lambda b: b.total)
    return _estimate(spec, config, terms, mode=mode, **kwargs)  # type: ignore[arg-type]


def config_bytes(
    spec: ModelSpec, profile: DeviceProfile, *, group_size: int = 64, cache_size: int = 2**17
) -> Callable[[Config], int]:
    """``config -> estimate_for_profile(...).total``, memoised per config.

    A search's repair and fill walks ask for the same configs again and again (a benchmark
    search on SmolLM2's 30 units: 528k requests, 98k distinct configs; 90 us each made the
    memory model most of a search's CPU time, bench/RESULTS.md, issue 20). The estimate is a
    pure function of the config for a fixed spec, profile and group size, so caching it
    changes no result.
    """

    @functools.lru_cache(maxsize=cache_size)
    def total(config: Config) -> int:
        return estimate_for_profile(spec, config, profile, group_size=group_size).total

    return total
