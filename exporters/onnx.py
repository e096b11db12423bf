"""ONNX export of a mixed-precision GPTQ checkpoint: one ``MatMulNBits`` node per GPTQ linear.

Why this route (issue 6, /work/shared/FINDINGS.md): a GPTQ kernel op does not export to ONNX
and optimum-onnx cannot share the venv with gptqmodel, so the float graph is exported with
``torch.onnx.export(dynamo=True)`` from a torch model whose linears hold the *dequantized*
GPTQ weights, and then every such ``MatMul`` is swapped for onnxruntime's ``com.microsoft``
``MatMulNBits`` whose initializers carry the checkpoint's own integers, scales and zero
points (no round-to-nearest re-quantization: ONNX and the GPTQ checkpoint hold the same
numbers, and ``write_onnx`` checks that bit for bit before it writes anything).

MatMulNBits layout (onnxruntime 1.32 contrib op spec and ``matmul_nbits_quantizer.py``):

* ``B`` uint8 (N, k_blocks, block_size * bits / 8), codes packed low bits first along K;
* ``scales`` (N, k_blocks) in A's dtype (float32 here: the fp16 GPTQ scales upcast exactly);
* ``zero_points`` uint8 (N, ceil(k_blocks * bits / 8)), packed the same way as ``B``;
* ``block_size`` a power of two >= 16; ``bits`` per node. The CPU kernel takes 2, 4 and 8.

GPTQ v1 stores ``zero - 1`` in ``qzeros`` (v2 stores ``zero``); the true zero point is written.
3-bit units are stored at 4 bits: the same integers (0..7) with the same scales and zero
points, so the weights are unchanged and each costs K*N/8 more bytes than at 3 bits.
Only sequential groups are supported (``desc_act`` off: ``g_idx[i] == i // group_size``);
an act-order ``g_idx`` would need a permuted activation and is refused with a clear error.

The graph has a KV cache: inputs ``input_ids`` (batch, seq), ``attention_mask`` (batch,
past + seq), ``past_keys`` / ``past_values`` (layers, batch, kv_heads, past, head_dim);
outputs ``logits`` (batch, seq, vocab), ``present_keys`` / ``present_values`` (past + seq).
A prefill passes past length 0. ``EDGEQRA_ORT_THREADS`` sets onnxruntime's intra-op threads
for :func:`onnx_logits` / :func:`greedy_generate` (unset: one per core).
"""

from __future__ import annotations

import ast
import importlib.metadata
import logging
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from edgeqra.exporters.gptq import TOKENIZER_FILES
from torch import nn

from edgeqra.errors import ConfigError, ModelError

__all__ = ["float_model", "greedy_generate", "onnx_logits", "write_onnx"]

log = logging.getLogger(__name__)

MODEL_FILE = "model.onnx"
DATA_FILE = "model.onnx.data"
MS_DOMAIN = "com.microsoft"
ORT_BITS = (2, 4, 8)  # what the onnxruntime CPU kernel of MatMulNBits executes
THREE_BIT_STORAGE = 4
PARITY_SEED = 0
PARITY_SHAPE = (2, 16)  # (batch, seq) of the fixed parity input
_SIDE_FILES = (*TOKENIZER_FILES, "generation_config.json")  # copied next to model.onnx
_WRAPPER_ATTR = "lm"  # the wrapper's attribute: exported name scopes read "lm.model.layers..."
_INPUTS = ("input_ids", "attention_mask", "past_keys", "past_values")
_OUTPUTS = ("logits", "present_keys", "present_values")


@dataclass(frozen=True)
class PackedLinear:
    """One GPTQ linear in MatMulNBits layout (K = d_in, N = d_out)."""

    name: str
    bits_requested: int  # the checkpoint's width for this module
    bits_stored: int  # the MatMulNBits ``bits`` attribute
    group_size: int  # GPTQ group (d_in for per-channel)
    block_size: int  # MatMulNBits block, a power of two dividing the group
    k: int
    n: int
    b: np.ndarray  # (N, k_blocks, block_size * bits / 8) uint8
    scales: np.ndarray  # (N, k_blocks) float32
    zero_points: np.ndarray  # (N, ceil(k_blocks * bits / 8)) uint8

    def dequantized(self) -> np.ndarray:
        """The float32 weight (N, K) that onnxruntime computes with: (code - zero) * scale."""
        codes = _unpack_low_first(self.b.reshape(self.n, -1), self.bits_stored)[:, : self.k]
        k_blocks = self.scales.shape[1]
        zeros = _unpack_low_first(self.zero_points, self.bits_stored)[:, :k_blocks]
        block = np.arange(self.k) // self.block_size  # (K,) block of each input feature
        return self.scales[:, block] * (codes.astype(np.float32) - zeros[:, block])


# --- packing (pure functions of arrays) ---------------------------------------------------


def _pack_low_first(values: np.ndarray, bits: int) -> np.ndarray:
    """Pack (rows, cols) ints < 2**bits into (rows, ceil(cols * bits / 8)) uint8, low bits first.

    The order MatMulNBits reads ``B`` and ``zero_points`` in: value j of a byte sits at bit
    ``j * bits`` (onnxruntime's ``pack_on_row_fast_248bit`` does the same along K).
    """
    per_byte = 8 // bits
    rows, cols = values.shape
    pad = -cols % per_byte
    v = np.pad(values.astype(np.uint8), ((0, 0), (0, pad)))  # (rows, cols + pad)
    v = v.reshape(rows, -1, per_byte)  # (rows, bytes, per_byte)
    shifts = (np.arange(per_byte, dtype=np.uint8) * bits).astype(np.uint8)
    return np.bitwise_or.reduce(v << shifts, axis=-1).astype(np.uint8)  # (rows, bytes)


def _unpack_low_first(packed: np.ndarray, bits: int) -> np.ndarray:
    """Inverse of :func:`_pack_low_first`: (rows, bytes) uint8 -> (rows, bytes * 8 / bits)."""
    per_byte = 8 // bits
    shifts = (np.arange(per_byte, dtype=np.uint8) * bits).astype(np.uint8)
    out = (packed[..., None] >> shifts) & np.uint8((1 << bits) - 1)  # (rows, bytes, per_byte)
    return out.reshape(packed.shape[0], -1)


def block_size_for(group_size: int, name: str = "module") -> int:
    """Largest power of two dividing the GPTQ group, capped at 128; MatMulNBits needs >= 16.

    A block inside one group gets that group's scale and zero point, so any power-of-two
    divisor of the group is lossless; per-channel groups (the whole of K) take 128.
    """
    if group_size <= 0:
        raise ConfigError(f"`group_size`={group_size} of `{name}` must be positive")
    block = min(group_size & -group_size, 128)  # lowest set bit = largest power-of-two divisor
    if block < 16:
        raise ConfigError(
            f"`group_size`={group_size} of `{name}` has no power-of-two divisor >= 16, which "
            "onnxruntime's MatMulNBits needs as its block_size; re-quantize with group size "
            "32, 64 or 128"
        )
    return block


def pack_matmul_nbits(
    name: str,
    codes: np.ndarray,
    zeros: np.ndarray,
    scales: np.ndarray,
    *,
    bits: int,
    group_size: int,
) -> PackedLinear:
    """GPTQ integers -> MatMulNBits initializers, values unchanged.

    Args:
        codes: (K, N) integer codes in [0, 2**bits), GPTQ's (d_in, d_out) orientation.
        zeros: (groups, N) true zero points (already v1-corrected).
        scales: (groups, N) float scales (fp16 in the checkpoint; stored as float32).
        bits: the checkpoint's width; 3 is stored at 4 bits.
        group_size: input features per group, sequential (group of feature i is i // group).
    """
    k, n = codes.shape
    if bits not in (2, 3, 4, 8):
        raise ConfigError(
            f"`{name}` has {bits}-bit weights; the ONNX export handles 2, 3, 4 and 8 bits"
        )
    stored = THREE_BIT_STORAGE if bits == 3 else bits
    if group_size >= k:  # one group per column (per-channel): any block size shares its scale
        block = min(128, max(16, 1 << (k - 1).bit_length()))
    else:
        block = block_size_for(group_size, name)
    k_blocks = -(-k // block)
    group_of_block = (np.arange(k_blocks) * block) // group_size  # (k_blocks,)
    padded = np.zeros((k_blocks * block, n), dtype=np.uint8)  # (K padded, N); pad codes = 0
    padded[:k] = codes
    b = _pack_low_first(padded.T, stored).reshape(n, k_blocks, block * stored // 8)
    scales_nb = np.ascontiguousarray(np.asarray(scales, np.float32)[group_of_block].T)
    zeros_nb = np.asarray(zeros)[group_of_block].T  # (N, k_blocks)
    return PackedLinear(
        name=name,
        bits_requested=bits,
        bits_stored=stored,
        group_size=group_size,
        block_size=block,
        k=k,
        n=n,
        b=b,
        scales=scales_nb,
        zero_points=_pack_low_first(zeros_nb, stored),
    )


# --- reading the GPTQ checkpoint ----------------------------------------------------------


def _quantize_config(gptq_dir: Path) -> dict:
    """The checkpoint's quantization config, checked for a layout this exporter reads."""
    from edgeqra.gptq import _quantize_config

    qcfg = _quantize_config(gptq_dir)
    method = str(qcfg.get("quant_method", "gptq")).lower()
    fmt = str(qcfg.get("checkpoint_format") or qcfg.get("format") or "gptq").lower()
    if method != "gptq" or fmt not in {"gptq", "gptq_v2"}:
        raise ModelError(
            f"{gptq_dir} is a `{method}`/`{fmt}` checkpoint; the ONNX export reads GPTQ "
            "(v1 or v2) checkpoints as GPTQModel writes them"
        )
    return qcfg


def _gptq_modules(gptq_dir: Path) -> Iterator[PackedLinear]:
    """Each quantized linear of the checkpoint, unpacked and re-packed for MatMulNBits."""
    from gptqmodel.quantization.config import dynamic_get
    from gptqmodel.utils.model_dequant import unpack_cols, unpack_rows
    from safetensors import safe_open

    qcfg = _quantize_config(gptq_dir)
    v1 = str(qcfg.get("checkpoint_format") or qcfg.get("format") or "gptq").lower() == "gptq"
    tensors: dict[str, torch.Tensor] = {}
    for path in sorted(gptq_dir.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as reader:
            for key in reader.keys():  # noqa: SIM118 - safe_open has no __iter__
                if key.rsplit(".", 1)[-1] in ("qweight", "qzeros", "scales", "g_idx"):
                    tensors[key] = reader.get_tensor(key)
    prefixes = sorted(k[: -len(".qweight")] for k in tensors if k.endswith(".qweight"))
    if not prefixes:
        raise ModelError(f"{gptq_dir} holds no `qweight` tensors; is it a GPTQ checkpoint?")
    for prefix in prefixes:
        bits = int(dynamic_get(qcfg.get("dynamic"), prefix, "bits", qcfg["bits"]))
        group = int(dynamic_get(qcfg.get("dynamic"), prefix, "group_size", qcfg["group_size"]))
        g_idx = tensors[f"{prefix}.g_idx"].long()  # (d_in,)
        scales = tensors[f"{prefix}.scales"]  # (groups, d_out) fp16
        d_in, d_out = g_idx.numel(), scales.shape[1]
        group = d_in if group <= 0 else group
        if not torch.equal(g_idx, torch.arange(d_in) // group):
            raise ConfigError(
                f"`{prefix}` has a non-sequential `g_idx` (act-order / desc_act=True); "
                "MatMulNBits needs sequential groups: re-quantize with `desc_act=False`"
            )
        codes = unpack_rows(tensors[f"{prefix}.qweight"], bits)[:d_in]  # (d_in, d_out)
        zeros = unpack_cols(tensors[f"{prefix}.qzeros"], bits)[:, :d_out]  # (groups, d_out)
        if v1:
            zeros = (zeros + 1) & ((1 << bits) - 1)  # v1 stores zero - 1
        yield pack_matmul_nbits(
            prefix,
            codes.numpy(),
            zeros.numpy(),
            scales.float().numpy(),
            bits=bits,
            group_size=group,
        )


def float_model(gptq_dir: Path) -> nn.Module:
    """The float32 HF model of config.json: the checkpoint's dense tensors, W_hat in every linear.

    The torch reference of the export (what the ONNX graph is traced from).
    """
    import transformers

    from edgeqra.gptq import _restore_dense_tensors, dequantized_weights

    config = transformers.AutoConfig.from_pretrained(gptq_dir)
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the float twin; no quantizer
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    _restore_dense_tensors(model, gptq_dir)
    weights = dequantized_weights(gptq_dir)
    with torch.no_grad():
        for name, w_hat in weights.items():
            model.get_submodule(name).weight.copy_(w_hat)  # (d_out, d_in)
    return model.eval()


# --- export -------------------------------------------------------------------------------


class _CachedLM(nn.Module):
    """Explicit-tensor KV-cache wrapper, so the exported graph's inputs/outputs are plain tensors."""

    def __init__(self, lm: nn.Module) -> None:
        super().__init__()
        self.lm = lm  # attribute name = _WRAPPER_ATTR

    def forward(self, input_ids, attention_mask, past_keys, past_values):
        """(batch, seq) ids + (layers, batch, kv_heads, past, head_dim) cache -> logits, cache."""
        from transformers import DynamicCache

        cache = DynamicCache(config=self.lm.config)
        for i in range(past_keys.shape[0]):
            cache.update(past_keys[i], past_values[i], i)
        out = self.lm(
            input_ids=input_ids,
            attention_mask=attention_mask,
            past_key_values=cache,
            use_cache=True,
        )
        keys = torch.stack([layer.keys for layer in cache.layers])  # (layers, b, kvh, total, hd)
        values = torch.stack([layer.values for layer in cache.layers])
        return out.logits, keys, values


def _cache_shape(config, batch: int, past: int) -> tuple[int, int, int, int, int]:
    """(layers, batch, kv_heads, past, head_dim) of the explicit cache tensors."""
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return (config.num_hidden_layers, batch, kv_heads, past, head_dim)


def _export_float(model: nn.Module):
    """torch.onnx.export(dynamo=True) of the cached wrapper; returns the onnx_ir model."""
    import warnings

    sample_batch, sample_seq, sample_past = 2, 5, 3  # dynamic dims must not be sampled at 0/1
    vocab = model.config.vocab_size
    ids = torch.randint(
        0, vocab, (sample_batch, sample_seq), generator=torch.Generator().manual_seed(0)
    )
    mask = torch.ones(sample_batch, sample_past + sample_seq, dtype=torch.long)
    past = torch.zeros(_cache_shape(model.config, sample_batch, sample_past))
    dim = torch.export.Dim
    batch, seq, total = dim("batch"), dim("seq"), dim("total")
    past_len = dim("past", min=0)  # prefill runs with an empty cache
    # onnxscript's rewriter logs every rule at INFO; keep a root INFO logger readable.
    chatty = [logging.getLogger(n) for n in ("onnxscript", "onnx_ir", "torch.onnx")]
    levels = [c.level for c in chatty]
    for c in chatty:
        c.setLevel(max(c.getEffectiveLevel(), logging.WARNING))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                _CachedLM(model).eval(),
                (ids, mask, past, past.clone()),
                dynamo=True,
                input_names=list(_INPUTS),
                output_names=list(_OUTPUTS),
                dynamic_shapes={
                    "input_ids": {0: batch, 1: seq},
                    "attention_mask": {0: batch, 1: total},
                    "past_keys": {1: batch, 3: past_len},
                    "past_values": {1: batch, 3: past_len},
                },
                optimize=True,
                verbose=False,
            )
    finally:
        for c, level in zip(chatty, levels, strict=True):
            c.setLevel(level)
    return program.model


def _module_of(node, names: set[str]) -> str | None:
    """The quantized module a node was traced from, read from the exporter's name scopes.

    torch.onnx (dynamo) records ``pkg.torch.onnx.name_scopes`` on each node, e.g.
    ``['', 'lm', 'lm.model', ..., 'lm.model.layers.0.self_attn.q_proj', 'linear']``.
    """
    raw = node.metadata_props.get("pkg.torch.onnx.name_scopes")
    if not raw:
        return None
    prefix = _WRAPPER_ATTR + "."
    scopes = [s[len(prefix) :] for s in ast.literal_eval(raw) if s.startswith(prefix)]
    hits = [s for s in scopes if s in names]
    return hits[-1] if hits else None


def _swap_matmuls(
    model, packed: dict[str, PackedLinear], w_hat: dict[str, torch.Tensor], accuracy_level: int
) -> dict:
    """Replace each quantized linear's MatMul by MatMulNBits; returns {module: node name}.

    A MatMul is taken for module M only if its name scope says M *and* its constant weight
    equals M's dequantized weight transposed, bit for bit: the mapping is checked by content.
    """
    import onnx_ir as ir

    graph = model.graph
    swapped: dict[str, str] = {}
    for node in list(graph):
        if node.op_type != "MatMul" or node.domain not in ("", "ai.onnx"):
            continue
        name = _module_of(node, set(packed))
        weight = node.inputs[1]
        if name is None or weight is None or weight.const_value is None:
            continue
        if name in swapped:
            raise ModelError(f"the exported graph has two MatMuls for `{name}`; cannot map it")
        p = packed[name]
        expected = w_hat[name].t().numpy()  # (K, N)
        got = weight.const_value.numpy()
        if got.shape != expected.shape or not np.array_equal(got, expected):
            raise ModelError(
                f"the MatMul traced from `{name}` does not hold its dequantized weight "
                f"(shape {got.shape} vs {expected.shape}); the exporter's graph changed"
            )
        tag = name.replace(".", "_")
        inits = []
        for suffix, array in (("qB", p.b), ("scales", p.scales), ("zero_points", p.zero_points)):
            value = ir.Value(
                name=f"{tag}.{suffix}", const_value=ir.tensor(array, name=f"{tag}.{suffix}")
            )
            value.shape = ir.Shape(array.shape)
            value.type = ir.TensorType(value.const_value.dtype)
            graph.register_initializer(value)
            inits.append(value)
        new = ir.Node(
            MS_DOMAIN,
            "MatMulNBits",
            [node.inputs[0], *inits],
            attributes={
                "K": ir.AttrInt64("K", p.k),
                "N": ir.AttrInt64("N", p.n),
                "bits": ir.AttrInt64("bits", p.bits_stored),
                "block_size": ir.AttrInt64("block_size", p.block_size),
                **(
                    {"accuracy_level": ir.AttrInt64("accuracy_level", accuracy_level)}
                    if accuracy_level
                    else {}
                ),
            },
            name=f"{tag}.MatMulNBits",
            metadata_props={
                "edgeqra.module": name,
                "edgeqra.bits_requested": str(p.bits_requested),
            },
        )
        ir.convenience.replace_nodes_and_values(
            graph, node, [node], [new], [node.outputs[0]], [new.outputs[0]]
        )
        if not weight.uses() and weight.name in graph.initializers:
            graph.initializers.pop(weight.name)
        swapped[name] = new.name
    missing = sorted(set(packed) - set(swapped))
    if missing:
        raise ModelError(
            f"no MatMul found in the exported graph for {len(missing)} quantized module(s), "
            f"e.g. `{missing[0]}`; the ONNX export does not support this architecture yet"
        )
    model.opset_imports.setdefault(MS_DOMAIN, 1)
    return swapped


# --- onnxruntime ----------------------------------------------------------------------------

_SESSIONS: dict[tuple[str, int, int], object] = {}


def _session(dest: Path):
    """A cached CPU InferenceSession for ``dest/model.onnx`` (keyed by path and mtime)."""
    import onnxruntime as ort

    path = Path(dest) / MODEL_FILE
    if not path.is_file():
        raise ModelError(f"{dest} has no {MODEL_FILE}; pass a folder written by `write_onnx`")
    threads = int(os.environ.get("EDGEQRA_ORT_THREADS", "0"))
    key = (str(path.resolve()), path.stat().st_mtime_ns, threads)
    if key not in _SESSIONS:
        _SESSIONS.clear()
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads  # 0: onnxruntime's default (one per core)
        _SESSIONS[key] = ort.InferenceSession(
            str(path), options, providers=["CPUExecutionProvider"]
        )
    return _SESSIONS[key]


def _empty_cache(sess, batch: int) -> np.ndarray:
    """(layers, batch, kv_heads, 0, head_dim) float32 zeros from the graph's input shape."""
    shape = next(i.shape for i in sess.get_inputs() if i.name == "past_keys")
    layers, _, kv_heads, _, head_dim = shape
    return np.zeros((layers, batch, kv_heads, 0, head_dim), dtype=np.float32)


def _as_ids(input_ids) -> np.ndarray:
    """(batch, seq) int64 from a (seq,) or (batch, seq) array, tensor or list."""
    ids = np.asarray(input_ids.cpu() if isinstance(input_ids, torch.Tensor) else input_ids)
    if ids.ndim == 1:
        ids = ids[None]
    if ids.ndim != 2 or ids.shape[1] == 0:
        raise ConfigError(f"`input_ids` must be (batch, seq) with seq >= 1, got {ids.shape}")
    return ids.astype(np.int64)


def onnx_logits(dest: Path, input_ids: np.ndarray) -> np.ndarray:
    """onnxruntime (CPU) logits (batch, seq, vocab) float32 of a full, unpadded sequence.

    Args:
        dest: folder written by :func:`write_onnx`.
        input_ids: (batch, seq) or (seq,) token ids.
    """
    sess = _session(Path(dest))
    ids = _as_ids(input_ids)
    empty = _empty_cache(sess, ids.shape[0])
    feeds = {
        "input_ids": ids,
        "attention_mask": np.ones(ids.shape, dtype=np.int64),
        "past_keys": empty,
        "past_values": empty,
    }
    return sess.run(["logits"], feeds)[0]


def greedy_generate(
    dest: Path, input_ids, max_new_tokens: int, *, eos_token_id: int | None = None
) -> list[int]:
    """Greedy decoding in onnxruntime with the exported KV cache; returns the new tokens only.

    Args:
        dest: folder written by :func:`write_onnx`.
        input_ids: (seq,) or (1, seq) prompt ids.
        max_new_tokens: tokens to generate (fewer if ``eos_token_id`` comes out first).
        eos_token_id: stop after emitting this id (None: always ``max_new_tokens``).
    """
    if max_new_tokens < 0:
        raise ConfigError(f"`max_new_tokens`={max_new_tokens} must be >= 0")
    sess = _session(Path(dest))
    ids = _as_ids(input_ids)
    if ids.shape[0] != 1:
        raise ConfigError(f"`input_ids` must hold one prompt, got batch {ids.shape[0]}")
    keys = values = _empty_cache(sess, 1)
    step, total, out = ids, ids.shape[1], []
    for _ in range(max_new_tokens):
        logits, keys, values = sess.run(
            None,
            {
                "input_ids": step,
                "attention_mask": np.ones((1, total), dtype=np.int64),
                "past_keys": keys,
                "past_values": values,
            },
        )
        token = int(logits[0, -1].argmax())
        out.append(token)
        if eos_token_id is not None and token == eos_token_id:
            break
        step, total = np.array([[token]], dtype=np.int64), total + 1
    return out


# --- the writer -----------------------------------------------------------------------------


def _version(dist: str) -> str:
    """Installed version of a distribution ("unknown" if absent)."""
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _parity(dest: Path, model: nn.Module) -> dict:
    """max |Δlogits| of onnxruntime vs the float torch model on a fixed seeded input."""
    g = torch.Generator().manual_seed(PARITY_SEED)
    ids = torch.randint(0, model.config.vocab_size, PARITY_SHAPE, generator=g)
    with torch.no_grad():
        ref = model(ids, use_cache=False).logits  # (batch, seq, vocab)
        ref_next = model(torch.cat([ids, ids[:, :1]], 1), use_cache=False).logits[:, -1]
    got = onnx_logits(dest, ids.numpy())
    # One cached decode step: prefill, then feed ids[:, 0] again as the next token.
    sess = _session(dest)
    empty = _empty_cache(sess, ids.shape[0])
    mask = np.ones(ids.shape, dtype=np.int64)
    _, k, v = sess.run(
        None,
        {
            "input_ids": ids.numpy(),
            "attention_mask": mask,
            "past_keys": empty,
            "past_values": empty,
        },
    )
    nxt = sess.run(
        ["logits"],
        {
            "input_ids": ids[:, :1].numpy(),
            "attention_mask": np.ones((ids.shape[0], ids.shape[1] + 1), np.int64),
            "past_keys": k,
            "past_values": v,
        },
    )[0][:, -1]
    return {
        "max_abs_dlogits": float(np.abs(got - ref.numpy()).max()),
        "max_abs_dlogits_cached_step": float(np.abs(nxt - ref_next.numpy()).max()),
        "max_abs_logit": float(ref.abs().max()),
        "input_shape": list(PARITY_SHAPE),
        "seed": PARITY_SEED,
        "reference": "torch float32 model of config.json with the dequantized GPTQ weights",
    }


def _three_bit_info(packed: dict[str, PackedLinear]) -> dict:
    """How 3-bit units are stored and what it costs over a 3-bit packing."""
    three = [p for p in packed.values() if p.bits_requested == 3]
    extra = sum(p.b.nbytes + p.zero_points.nbytes for p in three) - sum(
        -(-p.b.nbytes * 3 // 4) + -(-p.zero_points.nbytes * 3 // 4) for p in three
    )
    return {
        "modules": len(three),
        "stored_bits": THREE_BIT_STORAGE,
        "lossless": True,
        "extra_bytes": int(extra),
        "note": (
            "onnxruntime's MatMulNBits CPU kernel runs 2, 4 and 8 bits, not 3: 3-bit codes "
            "(0..7) are stored at 4 bits with the same scales and zero points, so the weights "
            "are unchanged and B takes K*N/8 more bytes per 3-bit module"
        ),
    }


def write_onnx(
    gptq_dir: Path, dest: Path, *, progress: bool = True, accuracy_level: int = 0
) -> dict:
    """Export a GPTQModel checkpoint to ``dest/model.onnx`` (+ ``model.onnx.data``) and tokenizer.

    ``dest`` must exist and be empty (the packager writes into a temp dir and renames it).
    Returns JSON-ready info for the manifest: per-node stored vs requested bits, the 3-bit
    storage choice and its byte cost, block sizes, opset, versions, the onnxruntime-vs-torch
    max |Δlogits| on a fixed input, and the file list.

    ``accuracy_level`` is MatMulNBits' compute type for the activations: 0 (default) computes
    in float32; 4 lets onnxruntime quantize A to int8 per block (faster on CPUs with int8 dot
    products, small extra error, measured by the parity check). The weights are the same.
    """
    import onnx_ir as ir
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    gptq_dir, dest = Path(gptq_dir), Path(dest)
    if not (gptq_dir / "config.json").is_file():
        raise ModelError(f"`gptq_dir` {gptq_dir} has no config.json; pass a GPTQ checkpoint")
    if accuracy_level not in (0, 1, 4):
        raise ConfigError(
            f"`accuracy_level`={accuracy_level} is not supported; use 0 or 1 (float32) or 4 (int8)"
        )
    if not dest.is_dir() or any(dest.iterdir()):
        raise ConfigError(f"`dest` {dest} must be an existing empty folder")

    steps = [
        "read and re-pack the GPTQ integers",
        "build the float torch model (dequantized GPTQ weights)",
        "torch.onnx.export (dynamo, KV cache)",
        "swap MatMul -> MatMulNBits",
        "save model.onnx + external data",
        "onnxruntime parity check",
    ]
    started = time.perf_counter()
    with Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        TimeElapsedColumn(),
        disable=not progress,
        transient=True,
    ) as bar:
        task = bar.add_task(steps[0], total=len(steps))

        def advance(i: int) -> None:
            bar.update(task, advance=1, description=steps[i] if i < len(steps) else "done")
            log.info("onnx export: %s", steps[i - 1])

        packed = {p.name: p for p in _gptq_modules(gptq_dir)}
        unsupported = sorted({p.bits_stored for p in packed.values()} - set(ORT_BITS))
        if unsupported:
            raise ConfigError(f"stored bit-widths {unsupported} are not run by onnxruntime")
        advance(1)
        model = float_model(gptq_dir)
        from edgeqra.gptq import dequantized_weights

        w_hat = dequantized_weights(gptq_dir)
        for name, p in packed.items():  # the MatMulNBits values are the GPTQ values, exactly
            if not np.array_equal(p.dequantized(), w_hat[name].numpy()):
                raise ModelError(f"re-packing `{name}` changed its dequantized weight (bug)")
        advance(2)
        t_export = time.perf_counter()
        onnx_model = _export_float(model)
        export_s = time.perf_counter() - t_export
        advance(3)
        swapped = _swap_matmuls(onnx_model, packed, w_hat, accuracy_level)
        del w_hat
        advance(4)
        ir.save(onnx_model, dest / MODEL_FILE, external_data=DATA_FILE)
        opset = int(onnx_model.opset_imports.get("", 0))
        del onnx_model
        copied = []
        for name in _SIDE_FILES:
            if (gptq_dir / name).is_file():
                shutil.copy2(gptq_dir / name, dest / name)
                copied.append(name)
        advance(5)
        parity = _parity(dest, model)
        advance(6)

    import onnxruntime

    nodes = [
        {
            "module": name,
            "node": swapped[name],
            "bits_requested": p.bits_requested,
            "bits_stored": p.bits_stored,
            "group_size": p.group_size,
            "block_size": p.block_size,
            "K": p.k,
            "N": p.n,
            "bytes": int(p.b.nbytes + p.scales.nbytes + p.zero_points.nbytes),
        }
        for name, p in sorted(packed.items())
    ]
    files = sorted(p for p in dest.iterdir() if p.is_file())
    return {
        "format": "onnx",
        "model_file": MODEL_FILE,
        "external_data": DATA_FILE,
        "op": f"{MS_DOMAIN}.MatMulNBits",
        "nodes": nodes,
        "bits_stored": sorted({n["bits_stored"] for n in nodes}),
        "bits_requested": sorted({n["bits_requested"] for n in nodes}),
        "block_sizes": sorted({n["block_size"] for n in nodes}),
        "three_bit": _three_bit_info(packed),
        "values": "GPTQ integers, scales and zero points (no re-quantization)",
        "accuracy_level": accuracy_level,
        "kv_cache": True,
        "inputs": list(_INPUTS),
        "outputs": list(_OUTPUTS),
        "opset": opset,
        "onnxruntime_version": onnxruntime.__version__,
        "onnx_version": _version("onnx"),
        "onnxscript_version": _version("onnxscript"),
        "torch_version": torch.__version__,
        "parity": parity,
        "tokenizer_files": copied,
        "export_seconds": round(time.perf_counter() - started, 2),
        "torch_export_seconds": round(export_s, 2),
        "files": [{"path": p.name, "bytes": p.stat().st_size} for p in files],
    }
