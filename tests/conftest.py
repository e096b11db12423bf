"""Shared fixtures: tiny random models of the supported architectures, built offline."""

from __future__ import annotations

import pytest
import torch

TINY = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=256,
    max_position_embeddings=256,
)


def tiny_model(arch: str = "llama", seed: int = 0, **overrides):
    """A seeded random causal LM of the given architecture with TINY's shapes."""
    import transformers as tf

    kwargs = {**TINY, **overrides}
    if arch == "llama":
        config = tf.LlamaConfig(**kwargs)
        cls = tf.LlamaForCausalLM
    elif arch == "qwen2":
        config = tf.Qwen2Config(**kwargs)
        cls = tf.Qwen2ForCausalLM
    elif arch == "gemma3":
        config = tf.Gemma3TextConfig(head_dim=16, sliding_window=32, **kwargs)
        cls = tf.Gemma3ForCausalLM
    else:
        raise ValueError(arch)
    torch.manual_seed(seed)
    return cls(config).eval()


@pytest.fixture(params=["llama", "qwen2", "gemma3"])
def any_tiny_model(request):
    """Each supported architecture in turn."""
    return request.param, tiny_model(request.param)
