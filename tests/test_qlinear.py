"""The recompute backward of GPTQModel QuantLinear layers (issue 15), on a tiny random GPTQ Llama.

Claims: (1) GPTQModel's own training path saves one dense (d_in, d_out) weight per layer for
backward (the measured 13 GiB on Llama-3.1-8B); (2) with ``enable_recompute_backward`` no
such tensor is saved; (3) LoRA and input gradients equal the old path's (stated tolerance),
for every bit-width 2/3/4/8, with and without gradient checkpointing; (4) PEFT still wraps
the layers and the classes GPTQModel owns are untouched.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig

from edgeqra.gptq import load_gptq, meta_model, write_random_checkpoint
from edgeqra.models import find_units
from edgeqra.qlinear import (
    disable_recompute_backward,
    enable_recompute_backward,
    is_recompute_backward,
    quant_linears,
)
from edgeqra.space import Config
from edgeqra.tune import TuneSettings, attach_lora

VOCAB = 512
CONFIG = Config.from_pairs([(2, 4), (3, 0), (4, 8), (8, 16)])  # every bit-width; a rank-0 unit
# CPU runs the very same kernel call for W in forward and backward: the results are
# bit-identical in practice; the tolerance allows a different matmul blocking (fp32 / bf16).
RTOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}


@pytest.fixture(autouse=True, scope="module")
def _one_thread_no_compile():
    """One intra-op thread; GPTQModel's torch.compile of dequantize off (a 10 s compile per
    fresh model on this CPU; both paths call the same function either way)."""
    import torch._dynamo

    threads, disabled = torch.get_num_threads(), torch._dynamo.config.disable
    torch.set_num_threads(1)
    torch._dynamo.config.disable = True
    yield
    torch.set_num_threads(threads)
    torch._dynamo.config.disable = disabled


def _hf() -> LlamaConfig:
    return LlamaConfig(
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=VOCAB,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A random-weight GPTQ checkpoint of CONFIG (no GPTQ run: memory and grads only)."""
    return write_random_checkpoint(
        _hf(), CONFIG, tmp_path_factory.mktemp("qlin") / "ck", group_size=64, seed=3
    )


def _model(checkpoint: Path, dtype: torch.dtype):
    """GPTQ base (torch kernel) + the config's LoRA with non-zero B (so every path has grad)."""
    base = load_gptq(checkpoint, device="cpu", dtype=dtype)
    model = attach_lora(base, find_units(meta_model(_hf())), CONFIG, TuneSettings(steps=0))
    g = torch.Generator().manual_seed(0)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data = (torch.randn(p.shape, generator=g) * 0.1).to(p.dtype)
    return model.train()


def _step(model, ids: torch.Tensor) -> tuple[list[torch.Tensor], dict, torch.Tensor]:
    """One forward/backward: (tensors saved for backward, LoRA grads, input-embedding grad)."""
    model.zero_grad(set_to_none=True)
    embeds = model.get_base_model().model.embed_tokens(ids).detach().requires_grad_(True)
    saved: list[torch.Tensor] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        logits = model(inputs_embeds=embeds, use_cache=False).logits
        loss = logits.float().square().mean()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return saved, grads, embeds.grad.clone()


def _dense_weights(model, saved: list[torch.Tensor]) -> list[tuple[int, ...]]:
    """Saved floating tensors shaped like a QuantLinear's (d_in, d_out) or (d_out, d_in)
    that are not a model parameter (the lm_head's own weight is saved by F.linear, free)."""
    shapes = set()
    for _, q in quant_linears(model):
        shapes |= {(q.in_features, q.out_features), (q.out_features, q.in_features)}
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    return [
        tuple(t.shape)
        for t in saved
        if t.is_floating_point()
        and tuple(t.shape) in shapes
        and t.untyped_storage().data_ptr() not in params
    ]


def _ids() -> torch.Tensor:
    # 3 x 7 = 21 tokens: no activation is shaped like a (128, 256) weight.
    return torch.randint(0, VOCAB, (3, 7), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_recompute_saves_no_dense_weight_and_keeps_gradients(checkpoint, dtype):
    model = _model(checkpoint, dtype)
    n_quant = len(list(quant_linears(model)))
    assert n_quant == 4 * 7
    saved_old, grads_old, gx_old = _step(model, _ids())
    # The finding of issue 15: GPTQModel's training path keeps every layer's dense weight.
    assert len(_dense_weights(model, saved_old)) >= n_quant - 7  # all but maybe layer 0's

    assert enable_recompute_backward(model) == n_quant
    saved_new, grads_new, gx_new = _step(model, _ids())
    assert _dense_weights(model, saved_new) == []
    assert len(saved_new) < len(saved_old)
    assert grads_new.keys() == grads_old.keys() and grads_old
    rtol = RTOL[dtype]
    for name, g in grads_old.items():
        scale = g.abs().max().item()
        assert scale > 0, name
        assert (grads_new[name] - g).abs().max().item() <= rtol * scale, name
    assert (gx_new - gx_old).abs().max().item() <= rtol * gx_old.abs().max().item()


def test_recompute_with_gradient_checkpointing_matches(checkpoint):
    from edgeqra.tune import _set_checkpointing

    model = _model(checkpoint, torch.float32)
    _set_checkpointing(model.get_base_model(), True)
    _, grads_old, gx_old = _step(model, _ids())
    enable_recompute_backward(model)
    saved, grads_new, gx_new = _step(model, _ids())
    assert _dense_weights(model, saved) == []
    for name, g in grads_old.items():
        assert torch.allclose(grads_new[name], g, rtol=1e-5, atol=1e-7), name
    assert torch.allclose(gx_new, gx_old, rtol=1e-5, atol=1e-7)


def test_per_instance_and_reversible_and_peft_still_wraps(checkpoint):
    from gptqmodel.nn_modules.qlinear.torch import TorchLinear
    from peft.tuners.lora.gptq import GPTQLoraLinear

    class_forward = TorchLinear.forward
    model = _model(checkpoint, torch.float32)
    enable_recompute_backward(model)
    assert enable_recompute_backward(model) == 28  # idempotent
    assert TorchLinear.forward is class_forward  # GPTQModel's class is untouched
    wrapped = [m for m in model.modules() if isinstance(m, GPTQLoraLinear)]
    assert len(wrapped) == 3 * 7  # the rank-0 unit has no adapter
    assert all(is_recompute_backward(m.base_layer) for m in wrapped)
    # Inference and no_grad run the kernel's own forward: same logits as without it.
    ids = _ids()
    model.eval()
    with torch.no_grad():
        on = model(input_ids=ids).logits
    assert disable_recompute_backward(model) == 28
    assert not any(is_recompute_backward(q) for _, q in quant_linears(model))
    with torch.no_grad():
        off = model(input_ids=ids).logits
    assert torch.equal(on, off)


def test_dequant_choice_picks_the_kernel_that_rebuilds_w():
    """``triton`` asks the module whether Triton could dequantize (as at inference) and uses
    it; ``module`` always calls the module's own ``dequantize_weight`` (the forward's call)."""
    from types import SimpleNamespace

    from edgeqra.qlinear import _dense_weight

    calls, weight = [], torch.ones(8, 4)

    class Quant:  # GPTQModel's TorchLinear surface that _dense_weight reads
        training = True
        qweight = SimpleNamespace(is_cuda=True)
        g_idx = torch.zeros(16)  # twice d_in: num_itr 2

        def _can_use_triton_dequant(self):
            return not self.training  # GPTQModel: off in training mode

        def _dequantize_weight_triton(self):
            calls.append("triton")
            return weight

        def dequantize_weight(self, num_itr=1):
            calls.append(("module", num_itr))
            return weight

    q = Quant()
    assert _dense_weight(q, 8) is weight and calls == ["triton"]
    assert q.training  # the attribute is put back
    assert _dense_weight(q, 8, "module") is weight and calls[-1] == ("module", 2)
    q.qweight = SimpleNamespace(is_cuda=False)  # a CPU layer has no Triton
    _dense_weight(q, 8, "triton")
    assert calls[-1] == ("module", 2)


def test_dequant_choice_is_set_per_call_and_checked(checkpoint):
    model = _model(checkpoint, torch.float32)
    with pytest.raises(ValueError, match="`dequant`='cuda' must be one of"):
        enable_recompute_backward(model, dequant="cuda")
    assert not any(is_recompute_backward(q) for _, q in quant_linears(model))  # nothing set
    enable_recompute_backward(model)
    _, grads_triton, gx_triton = _step(model, _ids())
    enable_recompute_backward(model, dequant="module")  # a second call changes the choice
    assert {q._edgeqra_recompute_dequant for _, q in quant_linears(model)} == {"module"}
    _, grads_module, gx_module = _step(model, _ids())
    for name, grad in grads_triton.items():  # on CPU both run the module's own dequant
        torch.testing.assert_close(grads_module[name], grad, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(gx_module, gx_triton, rtol=1e-5, atol=1e-7)
    disable_recompute_backward(model)
    assert not any(hasattr(q, "_edgeqra_recompute_dequant") for _, q in quant_linears(model))


def test_trainable_bias_falls_back_to_the_kernel_graph(checkpoint):
    model = _model(checkpoint, torch.float32)
    enable_recompute_backward(model)
    _, q = next(iter(quant_linears(model)))
    q.bias = torch.nn.Parameter(torch.zeros(q.out_features))  # a user who trains biases
    _, grads, _ = _step(model, _ids())
    assert q.bias.grad is not None and q.bias.grad.abs().sum() > 0
    assert grads


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_recompute_on_cuda_kernels_matches_and_saves_no_weight(checkpoint):
    """Triton (2/4/8 bits) and torch (3 bits) kernels: same checks on the GPU, bf16."""
    base = load_gptq(checkpoint, device="cuda", dtype=torch.bfloat16, kernels=["triton", "torch"])
    model = attach_lora(base, find_units(meta_model(_hf())), CONFIG, TuneSettings(steps=0))
    g = torch.Generator().manual_seed(0)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data = (torch.randn(p.shape, generator=g) * 0.1).to(p.device, p.dtype)
    model.train()
    ids = _ids().cuda()
    saved_old, grads_old, gx_old = _step(model, ids)
    assert _dense_weights(model, saved_old)
    enable_recompute_backward(model)
    saved_new, grads_new, gx_new = _step(model, ids)
    assert _dense_weights(model, saved_new) == []
    _assert_within_2pct(grads_new, gx_new, grads_old, gx_old)
    # The forward's own dequant in backward (bench/throughput.py's u4-moddq): the same checks.
    enable_recompute_backward(model, dequant="module")
    saved_mod, grads_mod, gx_mod = _step(model, ids)
    assert _dense_weights(model, saved_mod) == []
    _assert_within_2pct(grads_mod, gx_mod, grads_old, gx_old)


def _assert_within_2pct(grads: dict, gx: torch.Tensor, grads_ref: dict, gx_ref: torch.Tensor):
    """Every LoRA grad and the input grad within 2 % of the reference's largest entry (bf16)."""
    for name, ref in grads_ref.items():
        scale = ref.abs().max().item()
        assert (grads[name] - ref).abs().max().item() <= 2e-2 * scale, name
    assert (gx - gx_ref).abs().max().item() <= 2e-2 * gx_ref.abs().max().item()
