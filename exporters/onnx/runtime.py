"""Running an exported folder in onnxruntime (CPU): cached sessions, KV-cache steps, decoding.

Either cache layout runs (per-layer, onnxruntime-genai's; or the older stacked tensors).
``EDGEQRA_ORT_THREADS`` sets onnxruntime's intra-op threads (unset: one per core).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from edgeqra.exporters.onnx.genai import GENAI_PAST, GENAI_PRESENT, MODEL_FILE

from edgeqra.errors import ConfigError, ModelError

__all__ = ["empty_cache", "greedy_generate", "onnx_logits", "ort_session", "run_step"]

_SESSIONS: dict[tuple[str, int, int], object] = {}


def ort_session(dest: Path):
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


def _per_layer(sess) -> int:
    """Layers of a per-layer (onnxruntime-genai) cache graph; 0 for the stacked layout."""
    return sum(1 for i in sess.get_inputs() if i.name.startswith("past_key_values.")) // 2


def empty_cache(sess, batch: int) -> np.ndarray:
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
    sess = ort_session(Path(dest))
    ids = _as_ids(input_ids)
    empty = empty_cache(sess, ids.shape[0])
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
    sess = ort_session(Path(dest))
    ids = _as_ids(input_ids)
    if ids.shape[0] != 1:
        raise ConfigError(f"`input_ids` must hold one prompt, got batch {ids.shape[0]}")
    keys = values = empty_cache(sess, 1)
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
