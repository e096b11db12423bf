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

Modules: ``nbits`` (packing GPTQ integers into MatMulNBits initializers, the per-linear
storage plan and its byte report; numpy only), ``weights`` (reading the checkpoint, the float
twin), ``graph`` (tracing and the MatMul swap), ``genai`` (onnxruntime-genai's names and
config), ``runtime`` (onnxruntime sessions, cached steps, decoding), ``writer``
(:func:`write_onnx` and its checks). Everything is re-exported here; the modules import each
other, never this ``__init__``.
"""

from __future__ import annotations

from edgeqra.exporters.onnx.genai import (
    DATA_FILE,
    GENAI_CONFIG,
    GENAI_PAST,
    GENAI_PRESENT,
    MODEL_FILE,
    genai_config,
)
from edgeqra.exporters.onnx.graph import EMBEDDING_DTYPES, MS_DOMAIN, embedding_storage
from edgeqra.exporters.onnx.nbits import (
    LOW_BIT_STORAGE,
    ORT_BITS,
    THREE_BIT_STORAGE,
    EightBit,
    LinearPlan,
    PackedLinear,
    block_size_for,
    nbits_bytes,
    pack_matmul_nbits,
    plan_linear,
    split_eight_bit,
    storage_line,
    storage_report,
)
from edgeqra.exporters.onnx.runtime import (
    empty_cache,
    greedy_generate,
    onnx_logits,
    ort_session,
    run_step,
)
from edgeqra.exporters.onnx.weights import float_model, unmerged_adapter
from edgeqra.exporters.onnx.writer import PARITY_SEED, PARITY_SHAPE, write_onnx

__all__ = [
    "DATA_FILE",
    "EMBEDDING_DTYPES",
    "GENAI_CONFIG",
    "GENAI_PAST",
    "GENAI_PRESENT",
    "LOW_BIT_STORAGE",
    "MODEL_FILE",
    "MS_DOMAIN",
    "ORT_BITS",
    "PARITY_SEED",
    "PARITY_SHAPE",
    "THREE_BIT_STORAGE",
    "EightBit",
    "LinearPlan",
    "PackedLinear",
    "block_size_for",
    "embedding_storage",
    "empty_cache",
    "float_model",
    "genai_config",
    "greedy_generate",
    "nbits_bytes",
    "onnx_logits",
    "ort_session",
    "pack_matmul_nbits",
    "plan_linear",
    "run_step",
    "split_eight_bit",
    "storage_line",
    "storage_report",
    "unmerged_adapter",
    "write_onnx",
]
