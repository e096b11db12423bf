"""The ONNX graph: the float twin traced with a KV cache, then its MatMuls swapped.

``torch.onnx.export(dynamo=True)`` traces a wrapper whose cache is plain tensors; every
quantized linear's ``MatMul`` (found by name scope *and* checked by content) becomes one or two
``com.microsoft`` ``MatMulNBits`` nodes; the token embedding is stored once in a small dtype;
LoRA branches of unmerged units stay float32 MatMuls, counted here.
"""

from __future__ import annotations

import ast
import logging

import numpy as np
import torch
from edgeqra.exporters.gptq import UNMERGED_ADAPTER
from edgeqra.exporters.onnx.nbits import EightBit, LinearPlan, PackedLinear
from torch import nn

from edgeqra.errors import ModelError

__all__ = [
    "EMBEDDING_DTYPES",
    "MS_DOMAIN",
    "embedding_storage",
    "embedding_to",
    "export_float",
    "lora_storage",
    "swap_matmuls",
]

MS_DOMAIN = "com.microsoft"
EMBEDDING_DTYPES = ("float16", "bfloat16", "int8", "float32")
_WRAPPER_ATTR = "lm"  # the wrapper's attribute: exported name scopes read "lm.model.layers..."
_INPUTS = ("input_ids", "attention_mask", "past_keys", "past_values")
_OUTPUTS = ("logits", "present_keys", "present_values")


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


def export_float(model: nn.Module):
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


def lora_storage(model, lora: dict[str, dict]) -> dict:
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


def swap_matmuls(
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


def embedding_to(model, dtype: str) -> tuple[dict, np.ndarray]:
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
