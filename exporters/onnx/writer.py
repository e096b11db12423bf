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
past + seq), ``past_key_values.{i}.key`` / ``.value`` (batch, kv_heads, past, head_dim) per
layer; outputs ``logits`` (batch, seq, vocab), ``present.{i}.key`` / ``.value`` (past + seq):
onnxruntime-genai's (and Optimum's) names, with a ``genai_config.json`` beside the graph
(issue 21; ``cache_io="stacked"`` keeps the older (layers, ...) ``past_keys`` tensors).
A prefill passes past length 0. Storage (issue 21): 2- and 3-bit codes run in the 4-bit
kernel, 8-bit layers as two 4-bit nodes by default, the tied embedding once in float16. ``EDGEQRA_ORT_THREADS`` sets onnxruntime's intra-op threads
for :func:`onnx_logits` / :func:`greedy_generate` (unset: one per core).

Units kept unmerged (issue 21: a short-tuned adapter moves weights by less than a grid step,
so no merge keeps it): a merged package holds their PEFT adapter in ``adapter/``
(``exporters.gptq.UNMERGED_ADAPTER``). The float twin then loads it with PEFT (eval, so no
dropout), and the graph computes y = MatMulNBits(x) + s·((x Aᵀ) Bᵀ) for those modules: the
base MatMul is swapped as for any unit, the two LoRA MatMuls stay float32 MatMuls with
PEFT's own scaling s (``lora_alpha / r``, or ``/ √r`` with rslora) as one Mul.
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
from enum import Enum
from pathlib import Path

import numpy as np
import torch
from edgeqra.exporters.gptq import TOKENIZER_FILES, UNMERGED_ADAPTER
from torch import nn

from edgeqra.errors import ConfigError, ModelError

__all__ = [
    "EightBit",
    "LinearPlan",
    "embedding_storage",
    "float_model",
    "genai_config",
    "greedy_generate",
    "nbits_bytes",
    "onnx_logits",
    "plan_linear",
    "run_step",
    "split_eight_bit",
    "storage_line",
    "storage_report",
    "unmerged_adapter",
    "write_onnx",
]

log = logging.getLogger(__name__)

MODEL_FILE = "model.onnx"
GENAI_CONFIG = "genai_config.json"
DATA_FILE = "model.onnx.data"
MS_DOMAIN = "com.microsoft"
ORT_BITS = (2, 4, 8)  # what the onnxruntime CPU kernel of MatMulNBits executes
THREE_BIT_STORAGE = 4
LOW_BIT_STORAGE = 4  # 2- and 3-bit codes run in the 4-bit kernel (the only fast fp32 one)
EMBEDDING_DTYPES = ("float16", "bfloat16", "int8", "float32")


class EightBit(str, Enum):
    """How 8-bit linears are stored (measured per kernel in bench/onnx_speed.py)."""

    SPLIT = "split"  # q = 16·hi + lo: two 4-bit MatMulNBits (scales 16s, s) + Add; lossless
    FLOAT32 = "float32"  # the dequantized weight as a float32 MatMul initializer; lossless, 4 B/w
    NATIVE = "native"  # one 8-bit MatMulNBits (a slow fallback kernel on CPU at level 0)


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
    stored_bits: int | None = None,
) -> PackedLinear:
    """GPTQ integers -> MatMulNBits initializers, values unchanged.

    Args:
        codes: (K, N) integer codes in [0, 2**bits), GPTQ's (d_in, d_out) orientation.
        zeros: (groups, N) true zero points (already v1-corrected).
        scales: (groups, N) float scales (fp16 in the checkpoint; stored as float32).
        bits: the checkpoint's width; 2 and 3 are stored at 4 bits by default.
        group_size: input features per group, sequential (group of feature i is i // group).
        stored_bits: the MatMulNBits width (>= ``bits``; 2, 4 or 8); default 4 for 2/3 bits.
    """
    k, n = codes.shape
    if bits not in (2, 3, 4, 8):
        raise ConfigError(
            f"`{name}` has {bits}-bit weights; the ONNX export handles 2, 3, 4 and 8 bits"
        )
    stored = stored_bits or (LOW_BIT_STORAGE if bits in (2, 3) else bits)
    if stored < bits or stored not in ORT_BITS:
        raise ConfigError(f"`stored_bits`={stored} for {bits}-bit `{name}`; use one of {ORT_BITS}")
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


def split_eight_bit(
    name: str, codes: np.ndarray, zeros: np.ndarray, scales: np.ndarray, *, group_size: int
) -> tuple[PackedLinear, PackedLinear]:
    """An 8-bit linear as two 4-bit MatMulNBits whose outputs add up to the 8-bit one.

    q = 16·hi + lo and z = 16·zh + zl give s·(q − z) = 16s·(hi − zh) + s·(lo − zl): both parts
    and their sum are exact in float32 (an fp16 scale times an integer below 2**8 needs 19
    mantissa bits), so the weights are the GPTQ ones; only the summation order differs.
    Args as :func:`pack_matmul_nbits` (codes (K, N), zeros and scales (groups, N)).
    """
    codes, zeros = np.asarray(codes), np.asarray(zeros)
    scales = np.asarray(scales, np.float32)
    hi = pack_matmul_nbits(name, codes >> 4, zeros >> 4, 16 * scales, bits=4, group_size=group_size)
    lo = pack_matmul_nbits(name, codes & 15, zeros & 15, scales, bits=4, group_size=group_size)
    return hi, lo


def nbits_bytes(k: int, n: int, block: int, bits: int) -> int:
    """Bytes of one MatMulNBits' B, float32 scales and zero points (K, N, block, stored bits)."""
    k_blocks = -(-k // block)
    return n * k_blocks * block * bits // 8 + n * k_blocks * 4 + n * -(-k_blocks * bits // 8)


@dataclass(frozen=True)
class LinearPlan:
    """How one GPTQ linear is stored in the graph: MatMulNBits part(s) or a float MatMul."""

    name: str
    bits_requested: int
    storage: str  # "nbits" (one node), "split" (two 4-bit nodes + Add), "float32" (MatMul)
    parts: tuple[PackedLinear, ...]  # () for float32
    group_size: int
    k: int
    n: int

    @property
    def bytes(self) -> int:
        """Bytes this choice stores for the weight (initializers)."""
        if self.storage == EightBit.FLOAT32.value:
            return self.k * self.n * 4
        return sum(int(p.b.nbytes + p.scales.nbytes + p.zero_points.nbytes) for p in self.parts)

    def alternatives(self) -> dict[str, int]:
        """Bytes of each storage this linear could have had (for the export's size report)."""
        block = block_size_for(self.group_size, self.name) if self.group_size < self.k else 128
        out = {
            f"nbits{self.bits_requested}": nbits_bytes(self.k, self.n, block, self.bits_requested)
        }
        if self.bits_requested in (2, 3):
            out["nbits4"] = nbits_bytes(self.k, self.n, block, 4)
        if self.bits_requested == 8:
            out["split"] = 2 * nbits_bytes(self.k, self.n, block, 4)
            out["float32"] = self.k * self.n * 4
        if self.bits_requested == 3:
            out.pop("nbits3")  # not run by onnxruntime
        return out

    def dequantized(self) -> np.ndarray | None:
        """(N, K) float32 weight the stored parts compute with (None for a float MatMul)."""
        if not self.parts:
            return None
        out = self.parts[0].dequantized()
        for part in self.parts[1:]:
            out = out + part.dequantized()
        return out


def plan_linear(
    name: str,
    codes: np.ndarray,
    zeros: np.ndarray,
    scales: np.ndarray,
    *,
    bits: int,
    group_size: int,
    eight_bit: EightBit = EightBit.SPLIT,
    two_bit_storage: int = LOW_BIT_STORAGE,
) -> LinearPlan:
    """The storage of one GPTQ linear: 2/3/4 bits as 4-bit MatMulNBits, 8 bits per ``eight_bit``.

    Args as :func:`pack_matmul_nbits`; ``two_bit_storage`` 2 keeps 2-bit codes in the
    (slow on CPU) 2-bit kernel, for comparison.
    """
    k, n = np.asarray(codes).shape
    common = {"name": name, "bits_requested": bits, "group_size": group_size, "k": k, "n": n}
    if bits == 8 and eight_bit is EightBit.SPLIT:
        parts = split_eight_bit(name, codes, zeros, scales, group_size=group_size)
        return LinearPlan(storage="split", parts=parts, **common)
    if bits == 8 and eight_bit is EightBit.FLOAT32:
        return LinearPlan(storage="float32", parts=(), **common)
    stored = two_bit_storage if bits == 2 else None
    part = pack_matmul_nbits(
        name, codes, zeros, scales, bits=bits, group_size=group_size, stored_bits=stored
    )
    return LinearPlan(storage="nbits", parts=(part,), **common)


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


def _gptq_modules(
    gptq_dir: Path, eight_bit: EightBit = EightBit.SPLIT, two_bit_storage: int = LOW_BIT_STORAGE
) -> Iterator[LinearPlan]:
    """Each quantized linear of the checkpoint, unpacked and planned for the ONNX graph."""
    from edgeqra.gptq import import_gptqmodel

    import_gptqmodel()
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
        yield plan_linear(
            prefix,
            codes.numpy(),
            zeros.numpy(),
            scales.float().numpy(),
            bits=bits,
            group_size=group,
            eight_bit=eight_bit,
            two_bit_storage=two_bit_storage,
        )


def float_model(gptq_dir: Path, *, adapter: bool = True) -> nn.Module:
    """The float32 HF model of config.json: the checkpoint's dense tensors, W_hat in every linear.

    The torch reference of the export (what the ONNX graph is traced from). With ``adapter``
    (default) a package's unmerged adapter (``adapter/``) is applied on top by PEFT, unmerged,
    as :func:`edgeqra.exporters.gptq.load_checkpoint` does: the twin computes what the package
    loads as. The result is the plain HF model (PEFT's LoRA layers injected in place).
    """
    import transformers

    from edgeqra.gptq import _restore_dense_tensors, dequantized_weights

    gptq_dir = Path(gptq_dir)
    config = transformers.AutoConfig.from_pretrained(gptq_dir)
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the float twin; no quantizer
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    _restore_dense_tensors(model, gptq_dir)
    weights = dequantized_weights(gptq_dir)
    with torch.no_grad():
        for name, w_hat in weights.items():
            model.get_submodule(name).weight.copy_(w_hat)  # (d_out, d_in)
    if adapter and unmerged_adapter(gptq_dir) is not None:
        model = _with_adapter(model, unmerged_adapter(gptq_dir))
    return model.eval()


def unmerged_adapter(gptq_dir: Path) -> Path | None:
    """The PEFT adapter of the units a merged package kept unmerged (None: every unit merged)."""
    folder = Path(gptq_dir) / UNMERGED_ADAPTER
    return folder if (folder / "adapter_config.json").is_file() else None


def _with_adapter(model: nn.Module, adapter_dir: Path) -> nn.Module:
    """``model`` with the PEFT adapter injected, unmerged and in eval (dropout off).

    Every module that has LoRA weights in the adapter file must get a LoRA layer whose rank
    is that tensor's (PEFT only warns on unexpected keys, e.g. a ``target_modules`` that
    misses a module); LoRA variants (DoRA, ...) are refused: the graph holds plain LoRA.
    """
    from edgeqra.gptq import import_gptqmodel

    import_gptqmodel()  # PEFT's LoRA imports GPTQModel: quietly, once
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer
    from safetensors import safe_open

    ranks: dict[str, int] = {}  # module name -> rank, from the adapter file itself
    for path in sorted(adapter_dir.glob("adapter_model*.safetensors")):
        with safe_open(str(path), framework="pt") as reader:
            for key in reader.keys():  # noqa: SIM118 - safe_open has no __iter__
                if ".lora_A." in key:  # base_model.model.<module>.lora_A.weight: (r, d_in)
                    name = key.split(".lora_A.")[0].removeprefix("base_model.model.")
                    ranks[name] = int(reader.get_slice(key).get_shape()[0])
    if not ranks:
        raise ModelError(
            f"{adapter_dir} holds no LoRA weights (`adapter_model.safetensors` with lora_A "
            "tensors); re-export the package"
        )
    peft_model = PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=False)
    peft_model.eval()
    base = peft_model.get_base_model()
    layers = {n: m for n, m in base.named_modules() if isinstance(m, LoraLayer)}
    for name, layer in layers.items():
        if any(layer.lora_variant.values()):
            raise ConfigError(
                f"`{name}` in {adapter_dir} is a LoRA variant "
                f"({type(next(iter(layer.lora_variant.values()))).__name__}); the ONNX "
                "export holds plain LoRA only: merge it or export `--format gptq`"
            )
    got = {n: int(m.lora_A[m.active_adapters[0]].weight.shape[0]) for n, m in layers.items()}
    if got != ranks:
        missing = sorted(set(ranks) - set(got)) or sorted(n for n in got if got[n] != ranks.get(n))
        raise ModelError(
            f"the adapter in {adapter_dir} did not load as saved: {len(missing)} module(s) "
            f"differ, e.g. `{missing[0]}` (rank in file {ranks.get(missing[0])}, loaded "
            f"{got.get(missing[0])}); check its `target_modules` / `rank_pattern`"
        )
    return base.eval()


def _lora_summary(model: nn.Module) -> dict[str, dict] | None:
    """{module: {"rank", "scaling", "d_in", "d_out"}} of the PEFT LoRA layers (None: none)."""
    from edgeqra.gptq import import_gptqmodel

    import_gptqmodel()
    from peft.tuners.lora import LoraLayer

    out = {}
    for name, m in model.named_modules():
        if isinstance(m, LoraLayer):
            adapter = m.active_adapters[0]
            a, b = m.lora_A[adapter].weight, m.lora_B[adapter].weight  # (r, d_in), (d_out, r)
            out[name] = {"rank": int(a.shape[0]), "scaling": float(m.scaling[adapter]),
                         "d_in": int(a.shape[1]), "d_out": int(b.shape[0])}  # fmt: skip
    return out or None


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
    ``['', 'lm', 'lm.model', ..., 'lm.model.layers.0.self_attn.q_proj', 'linear']``. Under a
    PEFT LoRA layer the base MatMul sits in ``q_proj.base_layer`` and the adapter's in
    ``q_proj.lora_A.default`` / ``lora_B.default``: only a node whose deeper scopes are the
    module's own ``base_layer`` belongs to the module (the LoRA MatMuls map to none).
    """
    raw = node.metadata_props.get("pkg.torch.onnx.name_scopes")
    if not raw:
        return None
    prefix = _WRAPPER_ATTR + "."
    scopes = [s[len(prefix) :] for s in ast.literal_eval(raw) if s.startswith(prefix)]
    hits = [i for i, s in enumerate(scopes) if s in names]
    if not hits:
        return None
    name = scopes[hits[-1]]
    if any(s != f"{name}.base_layer" for s in scopes[hits[-1] + 1 :]):
        return None  # a submodule's node (a LoRA branch), not the module's own linear
    return name


def _lora_of(node, modules: set[str]) -> str | None:
    """The LoRA-adapted module whose ``lora_A`` / ``lora_B`` branch traced ``node`` (or None)."""
    raw = node.metadata_props.get("pkg.torch.onnx.name_scopes")
    if not raw:
        return None
    prefix = _WRAPPER_ATTR + "."
    for scope in reversed([s[len(prefix) :] for s in ast.literal_eval(raw)
                           if s.startswith(prefix)]):  # fmt: skip
        head, sep, _ = scope.partition(".lora_")
        if sep and head in modules:
            return head
    return None


def _lora_storage(model, lora: dict[str, dict]) -> dict:
    """Bytes and node count of the LoRA branches left in the graph (float32 MatMuls).

    Each adapted module must keep exactly two MatMuls (x Aᵀ, then Bᵀ) whose constant
    weights are its A and B: their initializers are what the adapters cost in the file.
    """
    per_module: dict[str, list] = {name: [] for name in lora}
    for node in model.graph:
        if node.op_type != "MatMul":
            continue
        name = _lora_of(node, set(lora))
        weight = node.inputs[1] if len(node.inputs) > 1 else None
        if name is not None and weight is not None and weight.const_value is not None:
            per_module[name].append(weight)
    nbytes = 0
    for name, weights in per_module.items():
        r, d_in, d_out = lora[name]["rank"], lora[name]["d_in"], lora[name]["d_out"]
        shapes = sorted(tuple(w.const_value.shape) for w in weights)
        if shapes != sorted([(d_in, r), (r, d_out)]):
            raise ModelError(
                f"the LoRA branch of `{name}` traced to MatMul weights {shapes}, expected "
                f"(d_in, r) = ({d_in}, {r}) and (r, d_out) = ({r}, {d_out}); the exporter's "
                "graph changed"
            )
        nbytes += sum(int(w.const_value.nbytes) for w in weights)
    dtypes = {w.const_value.numpy().dtype.name for ws in per_module.values() for w in ws}
    ranks = sorted({v["rank"] for v in lora.values()})
    return {
        "modules": len(lora),
        "matmuls": 2 * len(lora),
        "ranks": ranks,
        "scalings": sorted({round(v["scaling"], 6) for v in lora.values()}),
        "dtype": "+".join(sorted(dtypes)),  # float32: the twin's dtype (PEFT upcasts bf16 LoRA)
        "bytes": nbytes,
        "source": UNMERGED_ADAPTER + "/ of the GPTQ checkpoint (units kept unmerged)",
    }


def _nbits_node(ir, graph, x, p: PackedLinear, tag: str, accuracy_level: int, bits_requested: int):
    """One MatMulNBits node reading ``x`` with ``p``'s initializers (registered in ``graph``)."""
    inits = []
    for suffix, array in (("qB", p.b), ("scales", p.scales), ("zero_points", p.zero_points)):
        value = ir.Value(
            name=f"{tag}.{suffix}", const_value=ir.tensor(array, name=f"{tag}.{suffix}")
        )
        value.shape = ir.Shape(array.shape)
        value.type = ir.TensorType(value.const_value.dtype)
        graph.register_initializer(value)
        inits.append(value)
    return ir.Node(
        MS_DOMAIN,
        "MatMulNBits",
        [x, *inits],
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
        metadata_props={"edgeqra.module": p.name, "edgeqra.bits_requested": str(bits_requested)},
    )


def _swap_matmuls(
    model, plans: dict[str, LinearPlan], w_hat: dict[str, torch.Tensor], accuracy_level: int
) -> dict:
    """Replace each quantized linear's MatMul per its plan; returns {module: node name}.

    A MatMul is taken for module M only if its name scope says M *and* its constant weight
    equals M's dequantized weight transposed, bit for bit: the mapping is checked by content.
    A ``float32`` plan keeps that MatMul (its weight is W_hat already); ``split`` becomes two
    4-bit MatMulNBits and an Add.
    """
    import onnx_ir as ir

    graph = model.graph
    swapped: dict[str, str] = {}
    for node in list(graph):
        if node.op_type != "MatMul" or node.domain not in ("", "ai.onnx"):
            continue
        name = _module_of(node, set(plans))
        weight = node.inputs[1]
        if name is None or weight is None or weight.const_value is None:
            continue
        if name in swapped:
            raise ModelError(f"the exported graph has two MatMuls for `{name}`; cannot map it")
        plan = plans[name]
        expected = w_hat[name].t().numpy()  # (K, N)
        got = weight.const_value.numpy()
        if got.shape != expected.shape or not np.array_equal(got, expected):
            raise ModelError(
                f"the MatMul traced from `{name}` does not hold its dequantized weight "
                f"(shape {got.shape} vs {expected.shape}); the exporter's graph changed"
            )
        if plan.storage == EightBit.FLOAT32.value:
            node.metadata_props["edgeqra.module"] = name
            node.metadata_props["edgeqra.bits_requested"] = str(plan.bits_requested)
            swapped[name] = node.name
            continue
        tag = name.replace(".", "_")
        x = node.inputs[0]
        parts = [
            _nbits_node(ir, graph, x, p, f"{tag}.part{i}" if len(plan.parts) > 1 else tag,
                        accuracy_level, plan.bits_requested)
            for i, p in enumerate(plan.parts)
        ]  # fmt: skip
        new = parts
        if len(parts) == 2:  # split 8-bit: hi (scales 16s) + lo (scales s)
            add = ir.Node("", "Add", [parts[0].outputs[0], parts[1].outputs[0]], name=f"{tag}.Add")
            new = [*parts, add]
        ir.convenience.replace_nodes_and_values(
            graph, node, [node], new, [node.outputs[0]], [new[-1].outputs[0]]
        )
        if not weight.uses() and weight.name in graph.initializers:
            graph.initializers.pop(weight.name)
        swapped[name] = new[0].name
    missing = sorted(set(plans) - set(swapped))
    if missing:
        raise ModelError(
            f"no MatMul found in the exported graph for {len(missing)} quantized module(s), "
            f"e.g. `{missing[0]}`; the ONNX export does not support this architecture yet"
        )
    model.opset_imports.setdefault(MS_DOMAIN, 1)
    return swapped


def embedding_storage(table: np.ndarray, dtype: str) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """How the (vocab, hidden) float32 table is stored in ``dtype``, and what it reads back as.

    ``float16`` / ``bfloat16``: the table rounded to nearest. ``int8``: symmetric round-to-
    nearest per vocabulary row, codes int8 and one float32 scale per row (max|row| / 127),
    read back by a per-axis ``DequantizeLinear``. Returns ({"table"[, "scale"]}, float32 table).
    """
    if dtype == "float16":
        stored = table.astype(np.float16)
        return {"table": stored}, stored.astype(np.float32)
    if dtype == "bfloat16":
        import ml_dtypes

        stored = table.astype(ml_dtypes.bfloat16)
        return {"table": stored}, stored.astype(np.float32)
    if dtype == "int8":
        scale = (np.abs(table).max(axis=1) / 127).astype(np.float32)  # (vocab,)
        safe = np.where(scale == 0, np.float32(1), scale)
        codes = np.clip(np.rint(table / safe[:, None]), -127, 127).astype(np.int8)
        return {"table": codes, "scale": scale}, codes.astype(np.float32) * scale[:, None]
    return {"table": table}, table


def _embedding_to(model, dtype: str) -> tuple[dict, np.ndarray]:
    """Store the token-embedding table (tied: also lm_head's weight) once, in ``dtype``.

    The table feeds a Gather (and, tied, a Transpose for lm_head); it is replaced by a
    ``dtype`` initializer plus one Cast (16-bit) or DequantizeLinear (int8) to float32, so the
    file holds it at 2 or 1 bytes per value (onnxruntime folds that node at session start: the
    in-memory copy is float32). Returns ({"name", "shape", "dtype", "bytes", "bytes_float32",
    "max_abs_rounding"}, the float32 table the graph computes with).
    """
    import onnx_ir as ir

    graph = model.graph
    tables = {
        n.inputs[0].name: n.inputs[0]
        for n in graph
        if n.op_type == "Gather" and n.inputs[0] is not None and n.inputs[0].const_value is not None
        and len(n.inputs[0].shape) == 2
    }  # fmt: skip
    if len(tables) != 1:
        raise ModelError(f"expected one embedding Gather in the graph, found {sorted(tables)}")
    value = next(iter(tables.values()))
    table = value.const_value.numpy()  # (vocab, hidden) float32
    info = {"name": value.name, "shape": list(table.shape), "dtype": dtype,
            "bytes_float32": int(table.nbytes)}  # fmt: skip
    if dtype == "float32":
        return {**info, "bytes": int(table.nbytes), "max_abs_rounding": 0.0}, table
    arrays, back = embedding_storage(table, dtype)
    inputs = []
    for key, array in arrays.items():
        tensor = ir.tensor(array, name=f"{value.name}.{dtype}.{key}")
        stored = ir.Value(name=tensor.name, const_value=tensor)
        stored.shape = ir.Shape(array.shape)
        stored.type = ir.TensorType(tensor.dtype)
        graph.register_initializer(stored)
        inputs.append(stored)
    if dtype == "int8":
        node = ir.Node("", "DequantizeLinear", inputs, attributes={"axis": ir.AttrInt64("axis", 0)},
                       name=f"{value.name}.DequantizeLinear")  # fmt: skip
    else:
        node = ir.Node("", "Cast", inputs, attributes={"to": ir.AttrInt64("to", 1)},
                       name=f"{value.name}.Cast")  # fmt: skip
    node.outputs[0].shape = ir.Shape(table.shape)
    node.outputs[0].type = ir.TensorType(ir.DataType.FLOAT)
    value.replace_all_uses_with(node.outputs[0])
    graph.initializers.pop(value.name)
    graph.insert_before(graph.node(0), [node])
    nbytes = sum(int(a.nbytes) for a in arrays.values())
    return {**info, "bytes": nbytes, "max_abs_rounding": float(np.abs(back - table).max())}, back


def _per_layer_io(model, layers: int) -> None:
    """Rename the cache to onnxruntime-genai's per-layer I/O (Optimum uses the same names).

    Inputs ``past_keys`` / ``past_values`` (layers, batch, kv_heads, past, head_dim) become
    ``past_key_values.{i}.key`` / ``.value`` (batch, kv_heads, past, head_dim), stacked back
    by Unsqueeze + Concat for the traced graph; outputs ``present_keys`` / ``present_values``
    are Split + Squeezed into ``present.{i}.key`` / ``.value``. The traced graph is unchanged.
    """
    import onnx_ir as ir

    graph = model.graph
    axis0 = ir.Value(name="edgeqra.axis0", const_value=ir.tensor(np.array([0], np.int64)))
    axis0.shape, axis0.type = ir.Shape([1]), ir.TensorType(ir.DataType.INT64)
    graph.register_initializer(axis0)
    first = graph.node(0)
    for stacked, names in (("past_keys", GENAI_PAST[0]), ("past_values", GENAI_PAST[1])):
        old = next(v for v in graph.inputs if v.name == stacked)
        _, batch, kv_heads, past, head_dim = old.shape
        inputs, nodes = [], []
        for i in range(layers):
            value = ir.Value(name=names.format(i), shape=ir.Shape([batch, kv_heads, past, head_dim]),
                             type=ir.TensorType(ir.DataType.FLOAT))  # fmt: skip
            inputs.append(value)
            nodes.append(
                ir.Node("", "Unsqueeze", [value, axis0], name=f"{names.format(i)}.Unsqueeze")
            )
        concat = ir.Node("", "Concat", [n.outputs[0] for n in nodes],
                         attributes={"axis": ir.AttrInt64("axis", 0)}, name=f"{stacked}.Concat")  # fmt: skip
        old.replace_all_uses_with(concat.outputs[0])
        graph.insert_before(first, [*nodes, concat])
        position = list(graph.inputs).index(old)
        graph.inputs.pop(position)
        for j, value in enumerate(inputs):
            graph.inputs.insert(position + j, value)
    for stacked, names in (
        ("present_keys", GENAI_PRESENT[0]),
        ("present_values", GENAI_PRESENT[1]),
    ):
        old = next(v for v in graph.outputs if v.name == stacked)
        split = ir.Node("", "Split", [old], attributes={"num_outputs": ir.AttrInt64("num_outputs", layers)},
                        num_outputs=layers, name=f"{stacked}.Split")  # fmt: skip
        squeezes = [ir.Node("", "Squeeze", [split.outputs[i], axis0], name=f"{names.format(i)}.Squeeze")
                    for i in range(layers)]  # fmt: skip
        graph.extend([split, *squeezes])
        position = list(graph.outputs).index(old)
        graph.outputs.pop(position)
        for i, node in enumerate(squeezes):
            out = node.outputs[0]
            out.name = names.format(i)
            out.type = ir.TensorType(ir.DataType.FLOAT)
            graph.outputs.insert(position + i, out)


def genai_config(config, generation: dict | None, *, filename: str = MODEL_FILE) -> dict:
    """onnxruntime-genai's ``genai_config.json`` for a per-layer-cache graph of this HF config.

    The fields its model builder writes (``onnxruntime_genai/models/builders/base.py``
    ``make_genai_config``, 0.18): decoder shapes, I/O names, special tokens, greedy search.
    ``past_present_share_buffer`` is off: the graph returns the grown cache (past + seq).
    """
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads = text.num_attention_heads
    generation = generation or {}

    def first(*keys):
        for key in keys:
            for source in (generation, text.to_dict()):
                if source.get(key) is not None:
                    return source[key]
        return None

    eos = first("eos_token_id")
    model_type = str(getattr(text, "model_type", "llama"))
    return {
        "model": {
            "bos_token_id": first("bos_token_id"),
            "context_length": int(getattr(text, "max_position_embeddings", 2048)),
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "filename": filename,
                "head_size": int(getattr(text, "head_dim", None) or text.hidden_size // heads),
                "hidden_size": int(text.hidden_size),
                "inputs": {
                    "input_ids": "input_ids",
                    "attention_mask": "attention_mask",
                    "past_key_names": GENAI_PAST[0].replace("{}", "%d"),
                    "past_value_names": GENAI_PAST[1].replace("{}", "%d"),
                },
                "outputs": {
                    "logits": "logits",
                    "present_key_names": GENAI_PRESENT[0].replace("{}", "%d"),
                    "present_value_names": GENAI_PRESENT[1].replace("{}", "%d"),
                },
                "num_attention_heads": int(heads),
                "num_hidden_layers": int(text.num_hidden_layers),
                "num_key_value_heads": int(getattr(text, "num_key_value_heads", None) or heads),
            },
            "eos_token_id": eos,
            "pad_token_id": first("pad_token_id")
            if first("pad_token_id") is not None
            else (eos[0] if isinstance(eos, list) else eos),
            "type": model_type.split("_")[0] if model_type.startswith("gemma") else model_type,
            "vocab_size": int(text.vocab_size),
        },
        "search": {
            "diversity_penalty": 0.0,
            "do_sample": False,
            "early_stopping": True,
            "length_penalty": 1.0,
            "max_length": int(getattr(text, "max_position_embeddings", 2048)),
            "min_length": 0,
            "no_repeat_ngram_size": 0,
            "num_beams": 1,
            "num_return_sequences": 1,
            "past_present_share_buffer": False,
            "repetition_penalty": 1.0,
            "temperature": 1.0,
            "top_k": 1,
            "top_p": 1.0,
        },
    }


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


GENAI_PAST = ("past_key_values.{}.key", "past_key_values.{}.value")  # onnxruntime-genai names
GENAI_PRESENT = ("present.{}.key", "present.{}.value")


def _per_layer(sess) -> int:
    """Layers of a per-layer (onnxruntime-genai) cache graph; 0 for the stacked layout."""
    return sum(1 for i in sess.get_inputs() if i.name.startswith("past_key_values.")) // 2


def _empty_cache(sess, batch: int) -> np.ndarray:
    """(layers, batch, kv_heads, 0, head_dim) float32 zeros from the graph's input shape."""
    layers = _per_layer(sess)
    if layers:
        shape = next(i.shape for i in sess.get_inputs() if i.name == GENAI_PAST[0].format(0))
        _, kv_heads, _, head_dim = shape
    else:
        shape = next(i.shape for i in sess.get_inputs() if i.name == "past_keys")
        layers, _, kv_heads, _, head_dim = shape
    return np.zeros((layers, batch, kv_heads, 0, head_dim), dtype=np.float32)


def run_step(sess, ids: np.ndarray, mask: np.ndarray, keys: np.ndarray, values: np.ndarray):
    """One forward with a KV cache, whichever cache layout the graph has.

    Args:
        sess: an onnxruntime session of a :func:`write_onnx` graph.
        ids: (batch, seq) int64 new tokens; mask: (batch, past + seq) int64.
        keys, values: (layers, batch, kv_heads, past, head_dim) float32 cache.

    Returns:
        (logits (batch, seq, vocab), keys, values) with the cache grown by ``seq``.
    """
    layers = _per_layer(sess)
    feeds = {"input_ids": ids, "attention_mask": mask}
    if not layers:
        feeds.update(past_keys=keys, past_values=values)
        logits, keys, values = sess.run(None, feeds)
        return logits, keys, values
    for i in range(layers):
        feeds[GENAI_PAST[0].format(i)] = keys[i]
        feeds[GENAI_PAST[1].format(i)] = values[i]
    names = ["logits"] + [n.format(i) for i in range(layers) for n in GENAI_PRESENT]
    out = sess.run(names, feeds)
    return out[0], np.stack(out[1::2]), np.stack(out[2::2])


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
    return run_step(sess, ids, np.ones(ids.shape, dtype=np.int64), empty, empty)[0]


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
        mask = np.ones((1, total), dtype=np.int64)
        logits, keys, values = run_step(sess, step, mask, keys, values)
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
    _, k, v = run_step(sess, ids.numpy(), mask, empty, empty)
    nxt = run_step(
        sess, ids[:, :1].numpy(), np.ones((ids.shape[0], ids.shape[1] + 1), np.int64), k, v
    )[0][:, -1]
    return {
        "max_abs_dlogits": float(np.abs(got - ref.numpy()).max()),
        "max_abs_dlogits_cached_step": float(np.abs(nxt - ref_next.numpy()).max()),
        "max_abs_logit": float(ref.abs().max()),
        "input_shape": list(PARITY_SHAPE),
        "seed": PARITY_SEED,
        "reference": "torch float32 model of config.json with the dequantized GPTQ weights"
        " (+ the package's unmerged PEFT adapter, if any)",
    }


def _three_bit_info(plans: dict[str, LinearPlan]) -> dict:
    """How 3-bit units are stored and what it costs over a 3-bit packing."""
    three = [p.parts[0] for p in plans.values() if p.bits_requested == 3]
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


def storage_report(plans: dict[str, LinearPlan], lora: dict | None = None) -> dict:
    """Per requested width: how it is stored, its bytes, and what every alternative would cost.

    ``lora`` (:func:`_lora_storage`, units kept unmerged) adds a ``"lora"`` row last: the
    adapters' float32 A and B of those modules, on top of their MatMulNBits base.
    """
    out: dict[str, dict] = {}
    for plan in plans.values():
        row = out.setdefault(str(plan.bits_requested), {
            "storage": set(), "modules": 0, "bytes": 0, "alternatives": {}})  # fmt: skip
        row["storage"].add(plan.storage if plan.storage != "nbits" else
                           f"nbits{plan.parts[0].bits_stored}")  # fmt: skip
        row["modules"] += 1
        row["bytes"] += plan.bytes
        for key, value in plan.alternatives().items():
            row["alternatives"][key] = row["alternatives"].get(key, 0) + value
    for row in out.values():
        row["storage"] = "+".join(sorted(row["storage"]))
    report = dict(sorted(out.items(), key=lambda kv: int(kv[0])))
    if lora:
        report["lora"] = {"storage": f"{lora['dtype']} MatMul A and B", "dtype": lora["dtype"],
                          "modules": lora["modules"], "bytes": lora["bytes"],
                          "alternatives": {}}  # fmt: skip
    return report


def storage_line(report: dict, embedding: dict | None = None) -> str:
    """One printable line: bytes per width as stored, with the alternatives' bytes."""
    mib = 1 / 2**20
    parts = []
    for bits, row in report.items():
        if bits == "lora":  # the unmerged units' adapters, beside their quantized base
            parts.append(f"lora ({row['dtype']}) x{row['modules']} {row['bytes'] * mib:.1f} MiB")
            continue
        alts = ", ".join(f"{k} {v * mib:.1f}" for k, v in row["alternatives"].items())
        parts.append(f"{bits}-bit x{row['modules']} as {row['storage']} {row['bytes'] * mib:.1f} "
                     f"MiB ({alts})")  # fmt: skip
    if embedding:
        parts.append(f"embedding {embedding['dtype']} {embedding['bytes'] * mib:.1f} MiB "
                     f"(float32 {embedding['bytes_float32'] * mib:.1f})")  # fmt: skip
    return "ONNX weights: " + "; ".join(parts)


def write_onnx(
    gptq_dir: Path,
    dest: Path,
    *,
    progress: bool = True,
    accuracy_level: int = 0,
    eight_bit: EightBit | str = EightBit.SPLIT,
    embedding_dtype: str = "float16",
    cache_io: str = "genai",
    two_bit_storage: int = LOW_BIT_STORAGE,
) -> dict:
    """Export a GPTQModel checkpoint to ``dest/model.onnx`` (+ ``model.onnx.data``) and tokenizer.

    ``dest`` must exist and be empty (the packager writes into a temp dir and renames it).
    Returns JSON-ready info for the manifest: per-node stored vs requested bits, the 3-bit
    storage choice and its byte cost, block sizes, opset, versions, the onnxruntime-vs-torch
    max |Δlogits| on a fixed input, and the file list.

    ``accuracy_level`` is MatMulNBits' compute type for the activations: 0 (default) computes
    in float32; 4 lets onnxruntime quantize A to int8 per block (faster on CPUs with int8 dot
    products, small extra error, measured by the parity check). The weights are the same.

    Storage (every choice keeps the GPTQ weights exactly): 2- and 3-bit codes in 4-bit
    MatMulNBits (onnxruntime's fast kernel); 8-bit per ``eight_bit`` (``split``: two 4-bit
    nodes, 8-bit bytes, about 2x the 4-bit time; ``float32``: a float MatMul, 4 bytes per
    weight, the fastest; ``native``: 8-bit MatMulNBits, slow on CPU). The token embedding
    (tied: also lm_head) is stored once in ``embedding_dtype`` (float16 by default; int8:
    per-row symmetric codes, half the bytes again; the rounding is reported, and the parity
    reference holds the same table).

    ``cache_io`` ``genai`` (default) names the cache per layer as onnxruntime-genai and
    Optimum do (``past_key_values.{i}.key`` → ``present.{i}.key``) and writes
    ``genai_config.json``; ``stacked`` keeps edgeqra's (layers, ...) ``past_keys`` tensors.
    :func:`onnx_logits` / :func:`greedy_generate` run either. ``two_bit_storage`` 2 keeps
    2-bit codes in the 2-bit kernel (the slow layout before issue 21, for comparison).

    A package whose merge kept units unmerged (``gptq_dir/adapter/``, a PEFT adapter) keeps
    them so: their LoRA branch y += s·(x Aᵀ) Bᵀ is traced from PEFT's own layers (eval) as two
    float32 MatMuls, a Mul and an Add beside the MatMulNBits base; the info's ``lora`` (and
    the storage report's ``lora`` row) counts their bytes, the parity reference includes them.
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
    try:
        eight_bit = EightBit(eight_bit)
    except ValueError:
        raise ConfigError(
            f"`eight_bit`={eight_bit!r} is unknown; use one of {[e.value for e in EightBit]}"
        ) from None
    if cache_io not in ("genai", "stacked"):
        raise ConfigError(f"`cache_io`={cache_io!r} is unknown; use `genai` or `stacked`")
    if embedding_dtype not in EMBEDDING_DTYPES:
        raise ConfigError(
            f"`embedding_dtype`={embedding_dtype!r} is unknown; use one of {EMBEDDING_DTYPES}"
        )

    steps = [
        "read and re-pack the GPTQ integers",
        "build the float torch model (dequantized GPTQ weights, unmerged LoRA)",
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

        if two_bit_storage not in (2, 4):
            raise ConfigError(f"`two_bit_storage`={two_bit_storage} must be 4 (fast) or 2")
        plans = {p.name: p for p in _gptq_modules(gptq_dir, eight_bit, two_bit_storage)}
        advance(1)
        model = float_model(gptq_dir)  # + the unmerged units' LoRA (PEFT, eval), if any
        lora = _lora_summary(model)
        if lora:
            log.info("onnx export: %d module(s) kept unmerged, their LoRA in the graph", len(lora))
        from edgeqra.gptq import dequantized_weights

        w_hat = dequantized_weights(gptq_dir)
        for name, p in plans.items():  # the MatMulNBits values are the GPTQ values, exactly
            got = p.dequantized()
            if got is not None and not np.array_equal(got, w_hat[name].numpy()):
                raise ModelError(f"re-packing `{name}` changed its dequantized weight (bug)")
        advance(2)
        t_export = time.perf_counter()
        onnx_model = _export_float(model)
        export_s = time.perf_counter() - t_export
        advance(3)
        swapped = _swap_matmuls(onnx_model, plans, w_hat, accuracy_level)
        del w_hat
        lora_storage = _lora_storage(onnx_model, lora) if lora else None
        embedding, table = _embedding_to(onnx_model, embedding_dtype)
        if cache_io == "genai":
            _per_layer_io(onnx_model, model.config.num_hidden_layers)
        advance(4)
        ir.save(onnx_model, dest / MODEL_FILE, external_data=DATA_FILE)
        opset = int(onnx_model.opset_imports.get("", 0))
        io_names = (
            [v.name for v in onnx_model.graph.inputs],
            [v.name for v in onnx_model.graph.outputs],
        )
        del onnx_model
        copied = []
        for name in _SIDE_FILES:
            if (gptq_dir / name).is_file():
                shutil.copy2(gptq_dir / name, dest / name)
                copied.append(name)
        if cache_io == "genai":
            import json

            gen = gptq_dir / "generation_config.json"
            cfg = genai_config(model.config, json.loads(gen.read_text()) if gen.is_file() else None)
            (dest / GENAI_CONFIG).write_text(json.dumps(cfg, indent=2) + "\n")
        advance(5)
        with torch.no_grad():  # the reference holds the table the graph computes with
            model.get_input_embeddings().weight.copy_(torch.from_numpy(table))
        parity = _parity(dest, model)
        advance(6)

    import onnxruntime

    nodes = [
        {
            "module": name,
            "node": swapped[name],
            "bits_requested": p.bits_requested,
            "storage": p.storage,
            "bits_stored": p.parts[0].bits_stored if p.parts else 32,
            "group_size": p.group_size,
            "block_size": p.parts[0].block_size if p.parts else None,
            "K": p.k,
            "N": p.n,
            "bytes": p.bytes,
            "lora_rank": (lora or {}).get(name, {}).get("rank", 0),  # 0: merged (no branch)
        }
        for name, p in sorted(plans.items())
    ]
    storage = storage_report(plans, lora_storage)
    line = storage_line(storage, embedding)
    log.info("%s", line)
    files = sorted(p for p in dest.iterdir() if p.is_file())
    return {
        "format": "onnx",
        "model_file": MODEL_FILE,
        "external_data": DATA_FILE,
        "op": f"{MS_DOMAIN}.MatMulNBits",
        "nodes": nodes,
        "bits_stored": sorted({n["bits_stored"] for n in nodes if n["block_size"]}),
        "bits_requested": sorted({n["bits_requested"] for n in nodes}),
        "block_sizes": sorted({n["block_size"] for n in nodes if n["block_size"]}),
        "three_bit": _three_bit_info(plans),
        "eight_bit": eight_bit.value,
        "storage": storage,
        "storage_line": line,
        "embedding": embedding,
        "values": "GPTQ integers, scales and zero points (no re-quantization)"
        + ("; the unmerged units' LoRA A and B as float32" if lora else ""),
        "lora": lora_storage,
        "accuracy_level": accuracy_level,
        "kv_cache": True,
        "cache_io": cache_io,
        "inputs": io_names[0],
        "outputs": io_names[1],
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
