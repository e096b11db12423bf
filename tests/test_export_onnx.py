"""ONNX export (issue 6, item 3) on a tiny random Llama quantized at 2/3/4/8 bits per layer.

One GPTQ checkpoint and one export per module (~70 s of CPU); the torch reference is the original dense model with
the dequantized GPTQ weights and the checkpoint's biases, built independently of the
exporter's float twin (tests/test_gptq.py shows it equals GPTQModel's float32 kernel).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from conftest import tiny_tokenizer
from edgeqra.exporters.onnx import (
    block_size_for,
    greedy_generate,
    onnx_logits,
    pack_matmul_nbits,
    write_onnx,
)
from onnx import helper
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, LlamaForCausalLM

from edgeqra.errors import ConfigError, ModelError
from edgeqra.gptq import dequantized_weights, quantize_to_checkpoint

BITS = {"model.layers.0": 2, "model.layers.1": 3, "model.layers.2": 4, "model.layers.3": 8}
STORED = {2: 4, 3: 4, 4: 4, 8: 4}  # 2/3-bit codes in the 4-bit kernel; 8-bit split in two
PARTS = {2: 1, 3: 1, 4: 1, 8: 2}  # MatMulNBits nodes per linear (8-bit: hi + lo nibbles)
GROUP = 64
LINEARS_PER_LAYER = 7


def _bits_of(module: str) -> int:
    """Bit-width the test's config assigns to a module name."""
    return BITS[".".join(module.split(".")[:3])]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """Mixed 2/3/4/8-bit GPTQ checkpoint of a seeded tiny tied Llama with biases and a tokenizer."""
    config = LlamaConfig(
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=512,
        max_position_embeddings=256,
        tie_word_embeddings=True,  # as SmolLM2: the export stores the table once
        attention_bias=True,
    )
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("onnx")
    LlamaForCausalLM(config).eval().save_pretrained(root / "dense")
    tiny_tokenizer().save_pretrained(root / "dense")
    g = torch.Generator().manual_seed(1)
    probs = torch.linspace(1.0, 0.01, 512) ** 3  # skewed unigram: correlated activations
    calibration = torch.multinomial(probs, 32 * 64, replacement=True, generator=g).view(32, 64)
    return quantize_to_checkpoint(
        root / "dense", root / "q", calibration, bits=BITS, group_size=GROUP
    )


@pytest.fixture(scope="module")
def exported(checkpoint) -> tuple[Path, dict]:
    """The ONNX folder and the info dict write_onnx returned."""
    dest = checkpoint.parent / "onnx"
    dest.mkdir()
    return dest, write_onnx(checkpoint, dest, progress=False)


@pytest.fixture(scope="module")
def dense_dequantized(checkpoint) -> LlamaForCausalLM:
    """The original dense model with W_hat in its linears and the checkpoint's (fp16) biases.

    It equals GPTQModel's float32 torch kernel (tests/test_gptq.py) and runs a forward in
    milliseconds where that kernel takes seconds on CPU. Its embedding table is rounded to
    float16, as the export stores it: the reference holds the package's weights.
    """
    model = LlamaForCausalLM.from_pretrained(checkpoint.parent / "dense").eval()
    stored = load_file(str(checkpoint / "model.safetensors"))
    with torch.no_grad():
        for name, w_hat in dequantized_weights(checkpoint).items():
            linear = model.get_submodule(name)
            linear.weight.copy_(w_hat)
            if linear.bias is not None:
                linear.bias.copy_(stored[f"{name}.bias"])
        table = model.get_input_embeddings().weight  # tied: lm_head too
        table.copy_(table.half().float())  # the export stores it in float16 (its default)
    return model


def _nbits_nodes(dest: Path) -> list[onnx.NodeProto]:
    model = onnx.load(str(dest / "model.onnx"), load_external_data=False)
    return [n for n in model.graph.node if n.op_type == "MatMulNBits"]


def test_one_matmulnbits_per_quantized_linear_with_its_bits(exported, checkpoint):
    dest, info = exported
    nodes = _nbits_nodes(dest)
    assert len(dequantized_weights(checkpoint)) == 4 * LINEARS_PER_LAYER
    assert len(nodes) == LINEARS_PER_LAYER * sum(PARTS.values())
    seen: dict[str, int] = {}
    for node in nodes:
        assert node.domain == "com.microsoft"
        module = {p.key: p.value for p in node.metadata_props}["edgeqra.module"]
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        assert attrs["bits"] == STORED[_bits_of(module)], module
        assert attrs["block_size"] == GROUP
        seen[module] = seen.get(module, 0) + 1
    assert all(count == PARTS[_bits_of(m)] for m, count in seen.items())
    assert len(seen) == 4 * LINEARS_PER_LAYER
    for row in info["nodes"]:
        assert row["bits_requested"] == _bits_of(row["module"])
        assert row["bits_stored"] == STORED[row["bits_requested"]]
    assert info["three_bit"]["modules"] == LINEARS_PER_LAYER
    assert info["three_bit"]["stored_bits"] == 4
    # 3-bit at 4 bits costs K*N/8 bytes of B per module, plus the wider zero points.
    three = [r for r in info["nodes"] if r["bits_requested"] == 3]
    assert info["three_bit"]["extra_bytes"] >= sum(r["K"] * r["N"] // 8 for r in three)
    # Only lm_head keeps a float weight MatMul (the others take activations on both sides);
    # tied, it reads Transpose(embedding table), which is stored once.
    model = onnx.load(str(dest / "model.onnx"), load_external_data=False)
    inits = {t.name: tuple(t.dims) for t in model.graph.initializer}
    dtypes = {t.name: t.data_type for t in model.graph.initializer}
    cast = {n.output[0]: n.input[0] for n in model.graph.node if n.op_type == "Cast"}
    transposed = {  # Transpose(Cast(initializer)) outputs: the fp16 table, read as float32
        n.output[0]: cast.get(n.input[0], n.input[0])
        for n in model.graph.node
        if n.op_type == "Transpose" and cast.get(n.input[0], n.input[0]) in inits
    }
    float_weights = [
        inits.get(n.input[1]) or ("T", inits.get(transposed.get(n.input[1])))
        for n in model.graph.node
        if n.op_type == "MatMul" and (n.input[1] in inits or n.input[1] in transposed)
    ]
    assert float_weights in ([(128, 512)], [("T", (512, 128))]), float_weights
    tables = [name for name, shape in inits.items() if 512 in shape]
    assert [inits[t] for t in tables] in ([(512, 128)], [(128, 512)])
    assert dtypes[tables[0]] == onnx.TensorProto.FLOAT16  # the model's 16-bit dtype, once
    assert info["embedding"]["bytes"] == 512 * 128 * 2


def test_onnxruntime_dequantizes_to_the_gptq_weights_exactly(exported, checkpoint):
    """Each node's initializers run through onnxruntime's own kernel with A = I give W_hat^T."""
    import onnxruntime as ort

    dest, _ = exported
    model = onnx.load(str(dest / "model.onnx"))
    inits = {t.name: t for t in model.graph.initializer}
    w_hat = dequantized_weights(checkpoint)
    summed: dict[str, np.ndarray] = {}
    for node in _nbits_nodes(dest):
        module = {p.key: p.value for p in node.metadata_props}["edgeqra.module"]
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        k, n = attrs["K"], attrs["N"]
        single = helper.make_model(
            helper.make_graph(
                [
                    helper.make_node(
                        "MatMulNBits",
                        ["A", *node.input[1:]],
                        ["Y"],
                        domain="com.microsoft",
                        **attrs,
                    )
                ],
                "one",
                [helper.make_tensor_value_info("A", onnx.TensorProto.FLOAT, [k, k])],
                [helper.make_tensor_value_info("Y", onnx.TensorProto.FLOAT, [k, n])],
                initializer=[inits[name] for name in node.input[1:]],
            ),
            opset_imports=[helper.make_opsetid("", 20), helper.make_opsetid("com.microsoft", 1)],
        )
        sess = ort.InferenceSession(single.SerializeToString(), providers=["CPUExecutionProvider"])
        got = sess.run(None, {"A": np.eye(k, dtype=np.float32)})[0]  # (K, N) part of W_hat^T
        summed[module] = summed[module] + got if module in summed else got
    assert len(summed) == len(w_hat)
    for module, got in summed.items():  # 8-bit: hi + lo parts add up exactly
        np.testing.assert_array_equal(got, w_hat[module].t().numpy(), err_msg=module)


def test_onnx_logits_match_the_gptq_torch_model(exported, dense_dequantized):
    dest, info = exported
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 512, (3, 24), generator=g)
    with torch.no_grad():
        expected = dense_dequantized(ids).logits.numpy()  # (3, 24, 512), max |logit| ~ 1
    got = onnx_logits(dest, ids.numpy())
    assert got.shape == expected.shape
    # Same weights, fp32 on both sides, different kernels: measured max |Δ| ~4e-7.
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)
    assert info["parity"]["max_abs_dlogits"] < 1e-4
    assert info["parity"]["max_abs_dlogits_cached_step"] < 1e-4


def test_greedy_generation_matches_torch_greedy(exported, dense_dequantized):
    dest, _ = exported
    prompt = [5, 17, 42, 7, 99, 3]
    ids = torch.tensor([prompt])
    # (a random tiny model repeats its first greedy token; the cache test below has teeth)
    with torch.no_grad():  # full recompute each step: no cache on the torch side
        for _ in range(12):
            next_id = dense_dequantized(ids).logits[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat([ids, next_id], 1)
    assert greedy_generate(dest, prompt, 12) == ids[0, len(prompt) :].tolist()
    stop = ids[0, len(prompt) + 2].item()
    first = ids[0, len(prompt) :].tolist().index(stop)
    assert (
        greedy_generate(dest, prompt, 12, eos_token_id=stop)
        == ids[0, len(prompt) :][: first + 1].tolist()
    )


def test_kv_cache_steps_match_full_recompute(exported, dense_dequantized):
    """Teacher-forced decoding through the exported cache, step logits vs a full torch forward.

    A random tiny model's greedy output repeats one token, so this is the test with teeth for
    the cache: every step's logits, not only its argmax.
    """
    from edgeqra.exporters.onnx import empty_cache, ort_session, run_step

    dest, _ = exported
    g = torch.Generator().manual_seed(4)
    ids = torch.randint(0, 512, (2, 14), generator=g)  # 6 prompt tokens + 8 forced steps
    with torch.no_grad():
        expected = dense_dequantized(ids).logits.numpy()  # (2, 14, 512)
    sess = ort_session(dest)
    keys = values = empty_cache(sess, 2)
    got, start = [], 0
    for end in (6, *range(7, 15)):  # prefill 6 tokens, then one token per step
        mask = np.ones((2, end), dtype=np.int64)
        logits, keys, values = run_step(sess, ids[:, start:end].numpy(), mask, keys, values)
        got.append(logits)
        start = end
    assert keys.shape[3] == 14
    np.testing.assert_allclose(np.concatenate(got, 1), expected, atol=1e-4, rtol=0)


def test_files_tokenizer_and_info(exported, checkpoint):
    dest, info = exported
    names = {p.name for p in dest.iterdir()}
    assert {"model.onnx", "model.onnx.data", "tokenizer.json", "tokenizer_config.json"} <= names
    assert {f["path"]: f["bytes"] for f in info["files"]} == {
        p.name: p.stat().st_size for p in dest.iterdir()
    }
    assert (dest / "tokenizer.json").read_bytes() == (checkpoint / "tokenizer.json").read_bytes()
    assert info["onnxruntime_version"].startswith("1.")
    assert info["opset"] >= 18 and info["block_sizes"] == [GROUP]
    json.dumps(info)  # JSON-ready for the manifest


def test_non_sequential_g_idx_is_refused(checkpoint, tmp_path):
    bad = tmp_path / "act_order"
    shutil.copytree(checkpoint, bad)
    tensors = load_file(str(bad / "model.safetensors"))
    key = "model.layers.2.self_attn.q_proj.g_idx"
    tensors[key] = tensors[key].flip(0).contiguous()  # an act-order permutation
    save_file(tensors, str(bad / "model.safetensors"), metadata={"format": "pt"})
    (tmp_path / "out").mkdir()
    with pytest.raises(ConfigError, match=r"model\.layers\.2\.self_attn\.q_proj.*desc_act"):
        write_onnx(bad, tmp_path / "out", progress=False)


def test_unsupported_layouts_are_refused(checkpoint, tmp_path):
    awq = tmp_path / "awq"
    shutil.copytree(checkpoint, awq)
    qcfg = json.loads((awq / "quantize_config.json").read_text())
    (awq / "quantize_config.json").write_text(json.dumps({**qcfg, "checkpoint_format": "awq"}))
    (tmp_path / "out").mkdir()
    with pytest.raises(ModelError, match="awq"):
        write_onnx(awq, tmp_path / "out", progress=False)
    (tmp_path / "out" / "x").write_text("")
    with pytest.raises(ConfigError, match="empty"):
        write_onnx(checkpoint, tmp_path / "out", progress=False)
    assert [block_size_for(g) for g in (16, 32, 48, 64, 128, 256)] == [16, 32, 16, 64, 128, 128]
    with pytest.raises(ConfigError, match="group_size"):
        block_size_for(8)


def test_bad_storage_options_are_refused(checkpoint, tmp_path):
    (tmp_path / "o").mkdir()
    with pytest.raises(ConfigError, match="`eight_bit`='int4'"):
        write_onnx(checkpoint, tmp_path / "o", progress=False, eight_bit="int4")
    with pytest.raises(ConfigError, match="`embedding_dtype`='int4'"):
        write_onnx(checkpoint, tmp_path / "o", progress=False, embedding_dtype="int4")
    with pytest.raises(ConfigError, match="`stored_bits`=2"):
        pack_matmul_nbits("m", np.zeros((64, 8), int), np.zeros((1, 8), int),
                          np.ones((1, 8), np.float32), bits=4, group_size=64, stored_bits=2)  # fmt: skip


GENAI_PYTHON = Path(os.environ.get("EDGEQRA_GENAI_PYTHON", "/tmp/genai-venv/bin/python"))  # noqa: S108


def test_genai_config_describes_the_graph(exported, checkpoint):
    """genai_config.json names the graph's own per-layer cache inputs and outputs."""
    dest, info = exported
    cfg = json.loads((dest / "genai_config.json").read_text())["model"]
    decoder = cfg["decoder"]
    sess_inputs = info["inputs"]
    layers = decoder["num_hidden_layers"]
    assert layers == 4 and decoder["num_key_value_heads"] == 2 and decoder["head_size"] == 32
    for i in range(layers):
        assert decoder["inputs"]["past_key_names"] % i in sess_inputs
        assert decoder["inputs"]["past_value_names"] % i in sess_inputs
        assert decoder["outputs"]["present_key_names"] % i in info["outputs"]
    assert {"input_ids", "attention_mask"} <= set(sess_inputs) and info["cache_io"] == "genai"
    assert cfg["vocab_size"] == 512 and decoder["filename"] == "model.onnx"


@pytest.mark.slow
@pytest.mark.skipif(not GENAI_PYTHON.is_file(), reason="no onnxruntime-genai venv (README)")
def test_onnxruntime_genai_runs_the_package(exported):
    """In a venv holding only onnxruntime-genai, the package loads, gives onnxruntime's logits
    after the prompt (same kernels: ≤ 1e-4) and the same greedy tokens."""
    import subprocess

    dest, _ = exported
    prompt = [5, 17, 42, 7, 99, 3]
    script = Path(__file__).parents[1] / "bench" / "genai_generate.py"
    out = subprocess.run(  # noqa: S603 - fixed arguments
        [str(GENAI_PYTHON), str(script), str(dest), "--ids", ",".join(map(str, prompt)),
         "--new", "12"],
        capture_output=True, text=True, check=True, env={**os.environ, "PYTHONPATH": ""},
    )  # fmt: skip
    got = json.loads(out.stdout.strip().splitlines()[-1])
    want = onnx_logits(dest, np.array([prompt]))[0, -1]  # (vocab,)
    np.testing.assert_allclose(np.array(got["prompt_logits"]), want, atol=1e-4, rtol=0)
    assert got["tokens"] == greedy_generate(dest, prompt, 12)


def test_other_storage_options_end_to_end(checkpoint, dense_dequantized, tmp_path):
    """8-bit as a float32 MatMul, int8 embedding, stacked cache: onnxruntime equals torch
    holding the same weights (the int8 table read back), prefill and a cached step."""
    from edgeqra.exporters.onnx import embedding_storage

    dest = tmp_path / "other"
    dest.mkdir()
    info = write_onnx(checkpoint, dest, progress=False, eight_bit="float32",
                      embedding_dtype="int8", cache_io="stacked")  # fmt: skip
    eight = [n for n in info["nodes"] if n["bits_requested"] == 8]
    assert eight and all(n["storage"] == "float32" and n["bytes"] == n["K"] * n["N"] * 4
                         for n in eight)  # fmt: skip
    assert all(_bits_of(m) != 8 for n in _nbits_nodes(dest)
               for m in [{p.key: p.value for p in n.metadata_props}["edgeqra.module"]])  # fmt: skip
    assert info["inputs"][2:] == ["past_keys", "past_values"]
    assert not (dest / "genai_config.json").exists()
    assert info["embedding"]["bytes"] == 512 * 128 + 512 * 4
    model = LlamaForCausalLM.from_pretrained(checkpoint.parent / "dense").eval()
    model.load_state_dict(dense_dequantized.state_dict())
    with torch.no_grad():
        table = model.get_input_embeddings().weight
        original = LlamaForCausalLM.from_pretrained(checkpoint.parent / "dense")
        _, back = embedding_storage(original.get_input_embeddings().weight.numpy(), "int8")
        table.copy_(torch.from_numpy(back))
        ids = torch.randint(0, 512, (2, 20), generator=torch.Generator().manual_seed(8))
        expected = model(ids).logits.numpy()
    np.testing.assert_allclose(onnx_logits(dest, ids.numpy()), expected, atol=1e-4, rtol=0)
    assert info["parity"]["max_abs_dlogits_cached_step"] < 1e-4


# --- units kept unmerged (issue 21): their LoRA stays in the graph ---------------------------

KEPT_LAYERS = ("model.layers.1", "model.layers.3")  # 3-bit and 8-bit (split) units kept unmerged
LORA_RANKS = {"model.layers.1": 2, "model.layers.3": 8}  # rank_pattern per unit (default 4)
# The branch PEFT computes, per module: MatMul (x Aᵀ), MatMul (· Bᵀ), Mul (· s), Add (to base).
LORA_OPS_PER_MODULE = {"MatMul": 2, "Mul": 1, "Add": 1}
# The plain export (no adapter) of this checkpoint before the unmerged path existed: nodes and
# model.onnx.data bytes (measured with the parent commit's exporter; torch 2.13, onnxscript
# 0.7.2, onnxruntime 1.32): the unmerged path must leave it as it was.
PLAIN_NODES, PLAIN_DATA_BYTES = 416, 546_816


@pytest.fixture(scope="module")
def unmerged(checkpoint) -> Path:
    """The checkpoint as a merged package that kept units 1 and 3 unmerged: ``adapter/`` holds
    their PEFT adapter (rslora, dropout 0.1, two ranks), written as the merge writes it."""
    from edgeqra.exporters.gptq import write_partial_adapter
    from peft import LoraConfig, get_peft_model

    root = checkpoint.parent
    pkg = root / "unmerged"
    shutil.copytree(checkpoint, pkg)
    torch.manual_seed(5)
    config = LoraConfig(
        r=4, lora_alpha=8, lora_dropout=0.1, use_rslora=True, init_lora_weights=False,
        target_modules=r".*\.(q|k|v|o|gate|up|down)_proj",
        rank_pattern={rf"{re.escape(k)}\..*": r for k, r in LORA_RANKS.items()},
    )  # fmt: skip
    peft_model = get_peft_model(LlamaForCausalLM.from_pretrained(root / "dense"), config)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:  # default init: an effect ~10x the weights'; make it ~0.1x
                p.mul_(0.02)
    peft_model.save_pretrained(root / "full-adapter")
    kept = [n for n in dequantized_weights(checkpoint) if n.startswith(KEPT_LAYERS)]
    write_partial_adapter(root / "full-adapter", kept, pkg / "adapter")
    return pkg


@pytest.fixture(scope="module")
def exported_unmerged(unmerged) -> tuple[Path, dict]:
    dest = unmerged.parent / "onnx-unmerged"
    dest.mkdir()
    return dest, write_onnx(unmerged, dest, progress=False)


@pytest.fixture(scope="module")
def adapter_form(unmerged, dense_dequantized):
    """The torch adapter form, built apart from the exporter: base W_hat + the PEFT adapter."""
    import copy

    from peft import PeftModel

    base = copy.deepcopy(dense_dequantized)
    return PeftModel.from_pretrained(base, str(unmerged / "adapter"), is_trainable=False).eval()


def test_unmerged_units_keep_their_lora_and_match_the_adapter_form(
    exported_unmerged, adapter_form, dense_dequantized
):
    dest, info = exported_unmerged
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 512, (3, 24), generator=g)
    with torch.no_grad():
        expected = adapter_form(ids).logits.numpy()  # (3, 24, 512)
        without = dense_dequantized(ids).logits.numpy()
    got = onnx_logits(dest, ids.numpy())
    # The adapter moves the logits (teeth), and the graph computes it: same tolerance as above.
    assert np.abs(expected - without).max() > 1e-2
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)
    assert info["parity"]["max_abs_dlogits"] < 1e-4
    assert info["parity"]["max_abs_dlogits_cached_step"] < 1e-4
    prompt = [5, 17, 42, 7, 99, 3]
    ids = torch.tensor([prompt])
    with torch.no_grad():
        for _ in range(12):
            ids = torch.cat([ids, adapter_form(ids).logits[:, -1].argmax(-1, keepdim=True)], 1)
    assert greedy_generate(dest, prompt, 12) == ids[0, len(prompt) :].tolist()


def test_unmerged_export_keeps_the_matmulnbits_bit_for_bit_and_counts_the_lora(
    exported_unmerged, exported
):
    """Same MatMulNBits nodes with the same initializers as the plain export; the LoRA
    branches are float32 MatMuls on top, and their bytes are reported."""
    from onnx import numpy_helper

    dest, info = exported_unmerged
    plain_dest, plain_info = exported

    def nbits(folder: Path) -> dict[str, list[np.ndarray]]:
        model = onnx.load(str(folder / "model.onnx"))
        inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
        return {n.name: [inits[i] for i in n.input[1:]] for n in model.graph.node
                if n.op_type == "MatMulNBits"}  # fmt: skip

    got, want = nbits(dest), nbits(plain_dest)
    assert got.keys() == want.keys() and len(got) == LINEARS_PER_LAYER * sum(PARTS.values())
    for name, arrays in got.items():
        for a, b in zip(arrays, want[name], strict=True):
            np.testing.assert_array_equal(a, b, err_msg=name)
    kept = [r for r in info["nodes"] if r["module"].startswith(KEPT_LAYERS)]
    assert len(kept) == 2 * LINEARS_PER_LAYER
    assert all(r["lora_rank"] == LORA_RANKS[".".join(r["module"].split(".")[:3])] for r in kept)
    assert all(r["lora_rank"] == 0 for r in info["nodes"] if r not in kept)
    lora_bytes = sum(4 * r["lora_rank"] * (r["K"] + r["N"]) for r in kept)  # float32 A and B
    assert info["lora"]["modules"] == len(kept) and info["lora"]["bytes"] == lora_bytes
    assert info["lora"]["ranks"] == [2, 8]
    scalings = sorted(round(8 / r**0.5, 6) for r in (2, 8))  # rslora: alpha / sqrt(r)
    assert info["lora"]["scalings"] == scalings
    assert info["storage"]["lora"]["bytes"] == lora_bytes
    assert f"lora (float32) x{len(kept)} " in info["storage_line"]
    with_lora = onnx.load(str(dest / "model.onnx"), load_external_data=False)
    plain = onnx.load(str(plain_dest / "model.onnx"), load_external_data=False)
    ops = Counter(n.op_type for n in with_lora.graph.node)
    ops.subtract(Counter(n.op_type for n in plain.graph.node))
    added = {op: k for op, k in ops.items() if k}  # node count per op type, LoRA minus plain
    assert added == {op: k * len(kept) for op, k in LORA_OPS_PER_MODULE.items()}
    data = {f["path"]: f["bytes"] for f in info["files"]}
    plain_data = {f["path"]: f["bytes"] for f in plain_info["files"]}
    assert data["model.onnx.data"] - plain_data["model.onnx.data"] >= lora_bytes


def test_a_package_without_adapter_exports_as_before(exported):
    """No adapter: the graph the plain path wrote before the unmerged path (node count), no
    LoRA row, no LoRA node."""
    dest, info = exported
    model = onnx.load(str(dest / "model.onnx"), load_external_data=False)
    assert len(model.graph.node) == PLAIN_NODES
    assert (dest / "model.onnx.data").stat().st_size == PLAIN_DATA_BYTES
    assert info["lora"] is None and "lora" not in info["storage"]
    assert "lora" not in info["storage_line"]
    assert not any("lora_" in p.value for n in model.graph.node for p in n.metadata_props)


def test_an_adapter_that_does_not_load_as_saved_is_refused(unmerged, tmp_path):
    """A ``target_modules`` that misses a saved module: PEFT only warns; the export refuses."""
    from edgeqra.exporters.onnx import float_model

    bad = tmp_path / "bad"
    shutil.copytree(unmerged, bad)
    path = bad / "adapter" / "adapter_config.json"
    cfg = json.loads(path.read_text())
    cfg["target_modules"] = cfg["target_modules"].replace(
        re.escape("model.layers.3.mlp.up_proj") + "|", ""
    )
    path.write_text(json.dumps(cfg))
    with pytest.raises(ModelError, match=r"did not load as saved.*model\.layers\.3\.mlp\.up_proj"):
        float_model(bad)
