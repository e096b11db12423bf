"""The real quantized fine-tuning path and random GPTQ checkpoints, on a tiny random Llama (CPU).

One GPTQ run (mixed 2/3/4/8 bits, ~5 s) is shared by the module. GPU-only checks skip cleanly.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from edgeqra.errors import ConfigError
from edgeqra.gptq import (
    allowed_kernels,
    checkpoint_plan,
    kernels_by_bits,
    load_gptq,
    module_bytes,
    quantize_to_checkpoint,
    safetensors_headers,
    write_random_checkpoint,
)
from edgeqra.memory import ModelSpec, estimate
from edgeqra.profiles import BudgetMode, InferenceWorkload
from edgeqra.quantized_tune import quantized_lora
from edgeqra.space import Config
from edgeqra.tune import TrainBatches, TuneSettings, adapter_ranks, train

VOCAB = 512
GROUP = 64
CONFIG = Config.from_pairs([(2, 4), (3, 0), (4, 8), (8, 16)])


@pytest.fixture(autouse=True, scope="module")
def _two_threads():
    """Keep the tiny model off the other helpers' cores; restore the setting after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(threads)


def _hf_config() -> LlamaConfig:
    """Tiny Llama: 4 layers, hidden 128; q/k/v/o biases on so the byte counts cover `bias`."""
    return LlamaConfig(
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=VOCAB,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        attention_bias=True,
    )


@pytest.fixture(scope="module")
def dense(tmp_path_factory) -> Path:
    """A seeded tiny Llama saved as fp32 safetensors (no tokenizer)."""
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("qtune") / "dense"
    LlamaForCausalLM(_hf_config()).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def checkpoint(dense) -> Path:
    """The config's GPTQ checkpoint, written by quantize_to_checkpoint (real GPTQ)."""
    g = torch.Generator().manual_seed(1)
    calibration = torch.randint(0, VOCAB, (16, 64), generator=g)
    bits = {f"model.layers.{i}": c.bits for i, c in enumerate(CONFIG)}
    return quantize_to_checkpoint(
        dense, dense.parent / "q", calibration, bits=bits, group_size=GROUP
    )


def _batches(n: int = 4, seq: int = 32) -> TrainBatches:
    """One batch of random rows, the first 8 tokens unlabelled."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, VOCAB, (n, seq), generator=g)
    labels = ids.clone()
    labels[:, :8] = -100
    return TrainBatches(ids, labels, torch.ones_like(ids))


def _packed_state(model) -> dict[str, torch.Tensor]:
    """Copies of every QuantLinear packed tensor."""
    from gptqmodel.nn_modules.qlinear import BaseQuantLinear

    out = {}
    for name, module in model.named_modules():
        if isinstance(module, BaseQuantLinear):
            for leaf in ("qweight", "qzeros", "scales", "g_idx"):
                out[f"{name}.{leaf}"] = getattr(module, leaf).detach().clone()
    return out


def test_quantized_lora_trains_only_adapters_through_quantlinear(dense, checkpoint):
    from gptqmodel.nn_modules.qlinear import BaseQuantLinear

    settings = TuneSettings(steps=25, lr=1e-2, batch_size=4)
    q = quantized_lora(dense, CONFIG, settings, checkpoint=checkpoint)
    # CPU: GPTQModel's torch kernel for every bit-width.
    assert q.kernels == {2: "TorchLinear", 3: "TorchLinear", 4: "TorchLinear", 8: "TorchLinear"}
    base = q.model.get_base_model()
    for unit, choice in zip(q.units, CONFIG, strict=True):
        for lin in unit.linears:
            layer = base.get_submodule(lin.name)
            inner = getattr(layer, "base_layer", layer)
            assert isinstance(inner, BaseQuantLinear) and inner.bits == choice.bits, lin.name
    assert adapter_ranks(q.model) == {
        lin.name: c.rank
        for u, c in zip(q.units, CONFIG, strict=True)
        if c.rank
        for lin in u.linears
    }

    # One backward: every adapter gets a gradient (B starts at 0, so A's is 0 but present),
    # nothing else does.
    batches = _batches()
    q.model.train()
    q.model(input_ids=batches.input_ids, labels=batches.input_ids).loss.backward()
    grads = {n: p.grad for n, p in q.model.named_parameters() if p.grad is not None}
    lora = {n for n, _ in q.model.named_parameters() if ".lora_" in n}
    assert set(grads) == lora and lora
    assert all(grads[n].abs().sum() > 0 for n in lora if ".lora_B." in n)
    q.model.zero_grad(set_to_none=True)

    before = _packed_state(base)
    log = train(q.model, batches, settings)
    # Random init: loss ~ ln(512) = 6.24; memorising 4 rows of a quantized base takes it
    # below (measured on the CPU dev machine: 6.25 -> 4.91 in 25 steps); 1.0 is asserted.
    assert not log.diverged and len(log.losses) == 25
    assert log.losses[0] == pytest.approx(math.log(VOCAB), abs=0.3)
    assert log.losses[-1] < log.losses[0] - 1.0
    after = _packed_state(base)
    assert after.keys() == before.keys() and len(before) == 4 * 7 * 4
    assert all(torch.equal(after[k], before[k]) for k in before)


def test_quantized_lora_quantizes_when_no_checkpoint(dense, tmp_path):
    config = Config.from_pairs([(4, 4), (4, 4), (8, 4), (16, 4)])
    g = torch.Generator().manual_seed(2)
    calibration = torch.randint(0, VOCAB, (8, 32), generator=g)
    q = quantized_lora(
        dense, config, TuneSettings(steps=0), calibration=calibration, out_dir=tmp_path / "c"
    )
    assert q.checkpoint == tmp_path / "c" and (q.checkpoint / "quantize_config.json").is_file()
    assert q.kernels == {4: "TorchLinear", 8: "TorchLinear"}
    layer3 = q.model.get_base_model().model.layers[3].self_attn.q_proj
    assert type(layer3.base_layer) is torch.nn.Linear  # the 16-bit unit stays dense


def test_checkpoint_of_another_config_is_rejected(dense, checkpoint):
    other = Config.from_pairs([(4, 4), (3, 0), (4, 8), (8, 16)])
    with pytest.raises(ConfigError, match="model.layers.0"):
        quantized_lora(dense, other, TuneSettings(steps=0), checkpoint=checkpoint)
    with pytest.raises(ConfigError, match="16-bit"):
        quantized_lora(dense, Config.uniform(4, 16, 8), TuneSettings(steps=0))
    with pytest.raises(ConfigError, match="calibration"):
        quantized_lora(dense, CONFIG, TuneSettings(steps=0))


def test_random_checkpoint_matches_gptqmodel_layout(checkpoint, tmp_path):
    """Same tensor names, shapes and packed dtypes as a real GPTQModel checkpoint."""
    random_dir = write_random_checkpoint(_hf_config(), CONFIG, tmp_path / "r", group_size=GROUP)
    real, mine = safetensors_headers(checkpoint), safetensors_headers(random_dir)
    assert set(real) == set(mine)
    for key, entry in real.items():
        assert mine[key]["shape"] == entry["shape"], key
        if key.rsplit(".", 1)[-1] in ("qweight", "qzeros", "scales", "g_idx"):
            assert mine[key]["dtype"] == entry["dtype"], key
    qcfg = json.loads((random_dir / "quantize_config.json").read_text())
    real_qcfg = json.loads((checkpoint / "quantize_config.json").read_text())
    assert qcfg["dynamic"] == real_qcfg["dynamic"]
    for key in ("group_size", "desc_act", "sym", "format", "checkpoint_format", "pack_dtype"):
        assert qcfg[key] == real_qcfg[key], key
    with pytest.raises(ConfigError, match="exists"):
        write_random_checkpoint(_hf_config(), CONFIG, random_dir)


def test_built_model_bytes_equal_the_memory_model(tmp_path):
    """Loaded QuantLinear packed tensors and dense parameters = memory.py's weight terms, exactly."""
    config = Config.from_pairs([(2, 8), (3, 4), (8, 0), (16, 16)])
    hf = _hf_config()
    path = write_random_checkpoint(hf, config, tmp_path / "r", group_size=GROUP)
    model = load_gptq(path, device="cpu", dtype=torch.bfloat16)
    got = module_bytes(model)
    predicted = estimate(
        ModelSpec.from_config(hf),
        config,
        mode=BudgetMode.INFERENCE,
        inference=InferenceWorkload(batch=1, context=16),
        group_size=GROUP,
    ).components
    assert got["quantized"] == predicted["quantized_weights"]
    assert got["dense"] == predicted["unquantized_weights"]
    # Not in the memory model: TorchLinear's shift tables (2 small int32 tensors per module)
    # and rotary inv_freq; measured 1,696 B here, 0.20 % of the weights (bound 0.3 %).
    assert 0 < got["other"] < 0.003 * (got["quantized"] + got["dense"])
    # ... and the memory model's kernel_caches term (issue 15) bounds them.
    assert got["other"] <= predicted["kernel_caches"]
    plan = checkpoint_plan(hf, config, group_size=GROUP)
    on_disk = sum(
        e["data_offsets"][1] - e["data_offsets"][0] for e in safetensors_headers(path).values()
    )
    assert sum(t.nbytes for t in plan.values()) == on_disk
    # The random values run: finite logits of a sane size.
    with torch.no_grad():
        logits = model(torch.arange(16).view(1, 16)).logits.float()
    assert torch.isfinite(logits).all() and logits.abs().max() < 50


def test_quantized_lora_recomputes_the_base_backward_by_default(dense, checkpoint):
    """Issue 15: every QuantLinear gets edgeqra.qlinear's backward; False keeps GPTQModel's."""
    from edgeqra.qlinear import is_recompute_backward, quant_linears

    on = quantized_lora(dense, CONFIG, TuneSettings(steps=0), checkpoint=checkpoint)
    layers = [q for _, q in quant_linears(on.model)]
    assert on.recompute_backward and len(layers) == 4 * 7
    assert all(is_recompute_backward(q) for q in layers)
    off = quantized_lora(
        dense, CONFIG, TuneSettings(steps=0), checkpoint=checkpoint, recompute_backward=False
    )
    assert not off.recompute_backward
    assert not any(is_recompute_backward(q) for _, q in quant_linears(off.model))


def test_allowed_kernels_restricts_auto_and_restores(checkpoint):
    """On CPU GPTQModel's AUTO gives 4-bit to TorchAtenLinear; allowing only torch changes it."""
    from gptqmodel import BACKEND, GPTQModel
    from gptqmodel.quantization import FORMAT, METHOD
    from gptqmodel.utils.importer import AUTO_BACKEND_KERNEL_MAPPING

    from edgeqra.gptq import quiet_gptqmodel, staged

    table = AUTO_BACKEND_KERNEL_MAPPING[METHOD.GPTQ][FORMAT.GPTQ]
    order = list(table)

    def kernels(names):
        with allowed_kernels(names), quiet_gptqmodel():
            stage = checkpoint.parent / f"stage-{len(names or ())}"
            stage.mkdir()
            source = staged(checkpoint, stage)
            model = GPTQModel.load(
                str(source), device="cpu", dtype=torch.bfloat16, backend=BACKEND.AUTO
            ).model
        return kernels_by_bits(model)

    assert kernels(None)[4] == "TorchAtenLinear"
    assert kernels(["torch"]) == {b: "TorchLinear" for b in (2, 3, 4, 8)}
    assert list(table) == order  # restored
    with allowed_kernels(None, trainable_only=True):
        # Marlin, Machete, ExLlamaV2, BitBLAS, ... are gone: they would JIT-build for nothing.
        assert table and all(cls.SUPPORTS_TRAINING for cls in table.values())
        assert len(table) < len(order)
    assert list(table) == order
    with pytest.raises(RuntimeError, match="mid-load"), allowed_kernels(["torch"]):
        assert [cls.__name__ for cls in table.values()] == ["TorchLinear"]
        raise RuntimeError("mid-load")
    assert list(table) == order  # restored on the way out of a failed load too
    with pytest.raises(ConfigError, match="cuda_magic"):
        with allowed_kernels(["cuda_magic"]):
            pass


def test_cpu_load_needs_the_torch_kernel(checkpoint):
    with pytest.raises(ConfigError, match="torch"):
        load_gptq(checkpoint, device="cpu", kernels=["marlin"])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_picks_trainable_kernels_and_trains(dense, checkpoint):
    from gptqmodel.nn_modules.qlinear import BaseQuantLinear

    settings = TuneSettings(steps=10, lr=1e-2, batch_size=4)
    q = quantized_lora(dense, CONFIG, settings, checkpoint=checkpoint, device="cuda")
    assert set(q.kernels) == {2, 3, 4, 8}
    for module in q.model.modules():
        if isinstance(module, BaseQuantLinear):
            assert module.SUPPORTS_TRAINING, type(module).__name__
    log = train(q.model, _batches(), settings)
    assert not log.diverged and log.losses[-1] < log.losses[0]
