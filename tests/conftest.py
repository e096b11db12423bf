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


def tiny_tokenizer():
    """A tiny byte-level BPE built offline (no hub), GPT-2 style spaces and an EOS token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    corpus = ["Question: what is the answer?\nAnswer: yes no the a of to in"] * 20
    tok.train_from_iterator(corpus, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>"
    )


@pytest.fixture(scope="session")
def tokenizer():
    """The tiny BPE tokenizer, built once per test session."""
    return tiny_tokenizer()


@pytest.fixture(params=["llama", "qwen2", "gemma3"])
def any_tiny_model(request):
    """Each supported architecture in turn."""
    return request.param, tiny_model(request.param)
