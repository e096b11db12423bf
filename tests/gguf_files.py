"""Tiny GGUF files for tests: a valid header with a few tensors, and ways to break it."""

from __future__ import annotations

from pathlib import Path

import numpy as np

N_LAYERS = 3


def write_gguf(path: Path, n_layers: int = N_LAYERS) -> Path:
    """A small, complete GGUF (llama metadata, three tensors); not a loadable model."""
    import gguf

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(n_layers)
    writer.add_name("tiny")
    # Small shapes, so that transformers builds a tiny model when it tries to load this one.
    writer.add_context_length(32)
    writer.add_embedding_length(8)
    writer.add_feed_forward_length(16)
    writer.add_head_count(2)
    writer.add_head_count_kv(2)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_tensor("token_embd.weight", np.zeros((16, 8), dtype=np.float32))
    writer.add_tensor("blk.0.attn_q.weight", np.ones((8, 8), dtype=np.float16))
    writer.add_tensor("output_norm.weight", np.ones(8, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def data_offset(path: Path) -> int:
    """Byte where the tensor data starts (end of the header and its alignment padding)."""
    import gguf

    return int(gguf.GGUFReader(str(path)).data_offset)


def truncated(path: Path, size: int) -> Path:
    """``path`` cut to its first ``size`` bytes, in place."""
    data = path.read_bytes()
    path.write_bytes(data[:size])
    return path
