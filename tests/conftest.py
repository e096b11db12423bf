"""Shared fixtures: tiny random models of the supported architectures, built offline."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

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


# ----------------------------------------------------------------------------- a finished run

MIXED = "4/8,3/4,16/8"  # a 4-bit, a 3-bit and a dense unit; two LoRA ranks
MIXED_STEPS = 4


@dataclass(frozen=True)
class TinyRun:
    """A finished tiny search: its run directory, model folder and bank cache."""

    out: Path
    model: Path
    cache: Path


@pytest.fixture(scope="session")
def tiny_search_run(tmp_path_factory, tokenizer) -> TinyRun:
    """A real tiny search (sensitivity, evolution, final tuning, baselines) on a random Llama:
    a run directory every entry of which the pipeline wrote, for the export and
    run-directory tests (built once per session: seconds on 2 cores).

    The exporters need one config mixing widths, a dense unit and two ranks, which no
    search of a 3-layer model reliably picks: the search runs for real and only its pick is
    steered to MIXED, test-side (``pipeline._chosen``); MIXED's final tuning, adapter,
    chosen.json and summary.json are the pipeline's own. The budget is MIXED's predicted
    memory plus one byte, so MIXED just fits and raising any of its widths does not.
    """
    import dataclasses

    from transformers import AutoConfig

    from edgeqra import pipeline
    from edgeqra.evaluate import EvalSettings
    from edgeqra.memory import ModelSpec, estimate_for_profile
    from edgeqra.profiles import load_profile
    from edgeqra.search.driver import SearchSettings
    from edgeqra.search.evolution import EvolutionSettings
    from edgeqra.space import Config
    from edgeqra.tune import TuneSettings

    root = tmp_path_factory.mktemp("tinyrun")
    folder, cache, out = root / "model", root / "cache", root / "run"
    tiny_model("llama", vocab_size=len(tokenizer)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    spec = ModelSpec.from_config(AutoConfig.from_pretrained(folder))
    profile = load_profile("t4-16gb")
    need = estimate_for_profile(spec, Config.parse(MIXED), profile, group_size=32).total
    job = pipeline.SearchJob(
        eval=pipeline.EvalJob(
            model=str(folder), task="arc_easy", bits=(3, 4), ranks=(0, 4, 8), group_size=32,
            calib_samples=8, calib_seq_len=64, tune=TuneSettings(lr=5e-3),
            eval=EvalSettings(n_train=16, n_eval=8, seq_len=96), device="cpu",
            profile=profile.name,
        ),
        search=SearchSettings(
            steps=MIXED_STEPS, evals=6, rungs=1, use_bayes=False,
            evolution=EvolutionSettings(population=3, children=3, generations=1),
        ),
        budget_gb=(need + 1) / 2**30,  # exact in a float: the budget is need + 1 bytes
    )  # fmt: skip
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("EDGEQRA_CACHE", str(cache))
        mp.setenv("GPTQMODEL_CPU_WORKERS", "2")
        mp.setattr(
            pipeline,
            "_chosen",
            lambda outcome, alpha: dataclasses.replace(outcome.best, config=MIXED),
        )
        pipeline.open_run_dir(out, job, resume=False)
        pipeline.run_search_job(job, out, progress=False)
    return TinyRun(out, folder, cache)
