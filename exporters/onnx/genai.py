"""What onnxruntime-genai (and Optimum) expect of the folder: file names, cache I/O, config.

The traced graph's cache is two stacked tensors; :func:`per_layer_io` renames it to
``past_key_values.{i}.key`` / ``.value`` -> ``present.{i}.key`` / ``.value`` per layer, and
:func:`genai_config` writes the ``genai_config.json`` its model builder would.
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "DATA_FILE",
    "GENAI_CONFIG",
    "GENAI_PAST",
    "GENAI_PRESENT",
    "MODEL_FILE",
    "genai_config",
    "per_layer_io",
]

MODEL_FILE = "model.onnx"
GENAI_CONFIG = "genai_config.json"
DATA_FILE = "model.onnx.data"
GENAI_PAST = ("past_key_values.{}.key", "past_key_values.{}.value")  # onnxruntime-genai names
GENAI_PRESENT = ("present.{}.key", "present.{}.value")


def per_layer_io(model, layers: int) -> None:
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
