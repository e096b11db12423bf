"""The GPTQ checkpoint as the ONNX export reads it: planned linears and the float twin.

The twin (:func:`float_model`) is the float32 torch model whose linears hold the
*dequantized* GPTQ weights: ``torch.onnx.export`` traces it, and the planned linears
(:func:`gptq_modules`) replace its MatMuls afterwards. Only sequential groups are supported
(``desc_act`` off: ``g_idx[i] == i // group_size``); an act-order ``g_idx`` would need a
permuted activation and is refused. A package's unmerged units (``adapter/``) are loaded
onto the twin with PEFT, unmerged and in eval (no dropout).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch
from edgeqra.exporters.gptq import UNMERGED_ADAPTER
from edgeqra.exporters.onnx.nbits import LOW_BIT_STORAGE, EightBit, LinearPlan, plan_linear
from torch import nn

from edgeqra.errors import ConfigError, ModelError

__all__ = ["float_model", "gptq_modules", "lora_summary", "unmerged_adapter"]


def _quantize_config(gptq_dir: Path) -> dict:
    """The checkpoint's quantization config, checked for a layout this exporter reads."""
    from edgeqra.gptq import quantize_config

    qcfg = quantize_config(gptq_dir)
    method = str(qcfg.get("quant_method", "gptq")).lower()
    fmt = str(qcfg.get("checkpoint_format") or qcfg.get("format") or "gptq").lower()
    if method != "gptq" or fmt not in {"gptq", "gptq_v2"}:
        raise ModelError(
            f"{gptq_dir} is a `{method}`/`{fmt}` checkpoint; the ONNX export reads GPTQ "
            "(v1 or v2) checkpoints as GPTQModel writes them"
        )
    return qcfg


def gptq_modules(
    gptq_dir: Path, eight_bit: EightBit = EightBit.SPLIT, two_bit_storage: int = LOW_BIT_STORAGE
) -> Iterator[LinearPlan]:
    """Each quantized linear of the checkpoint, unpacked and planned for the ONNX graph."""
    from edgeqra.gptq import import_gptqmodel, packed_tensors

    import_gptqmodel()
    from gptqmodel.quantization.config import dynamic_get
    from gptqmodel.utils.model_dequant import unpack_cols, unpack_rows

    qcfg = _quantize_config(gptq_dir)
    v1 = str(qcfg.get("checkpoint_format") or qcfg.get("format") or "gptq").lower() == "gptq"
    tensors = packed_tensors(gptq_dir)
    prefixes = sorted(k[: -len(".qweight")] for k in tensors if k.endswith(".qweight"))
    if not prefixes:
        raise ModelError(f"{gptq_dir} holds no `qweight` tensors; is it a GPTQ checkpoint?")
    for prefix in prefixes:
        bits = int(dynamic_get(qcfg.get("dynamic"), prefix, "bits", qcfg["bits"]))
        group = int(dynamic_get(qcfg.get("dynamic"), prefix, "group_size", qcfg["group_size"]))
        g_idx = tensors[f"{prefix}.g_idx"].long()  # (d_in,)
        scales = tensors[f"{prefix}.scales"]  # (groups, d_out) fp16
        d_in, d_out = g_idx.numel(), scales.shape[1]
        group = d_in if group <= 0 else group
        if not torch.equal(g_idx, torch.arange(d_in) // group):
            raise ConfigError(
                f"`{prefix}` has a non-sequential `g_idx` (act-order / desc_act=True); "
                "MatMulNBits needs sequential groups: re-quantize with `desc_act=False`"
            )
        codes = unpack_rows(tensors[f"{prefix}.qweight"], bits)[:d_in]  # (d_in, d_out)
        zeros = unpack_cols(tensors[f"{prefix}.qzeros"], bits)[:, :d_out]  # (groups, d_out)
        if v1:
            zeros = (zeros + 1) & ((1 << bits) - 1)  # v1 stores zero - 1
        yield plan_linear(
            prefix,
            codes.numpy(),
            zeros.numpy(),
            scales.float().numpy(),
            bits=bits,
            group_size=group,
            eight_bit=eight_bit,
            two_bit_storage=two_bit_storage,
        )


def float_model(gptq_dir: Path, *, adapter: bool = True) -> nn.Module:
    """The float32 HF model of config.json: the checkpoint's dense tensors, W_hat in every linear.

    The torch reference of the export (what the ONNX graph is traced from). With ``adapter``
    (default) a package's unmerged adapter (``adapter/``) is applied on top by PEFT, unmerged,
    as :func:`edgeqra.exporters.gptq.load_checkpoint` does: the twin computes what the package
    loads as. The result is the plain HF model (PEFT's LoRA layers injected in place).
    """
    import transformers

    from edgeqra.gptq import dequantized_weights, restore_dense_tensors

    gptq_dir = Path(gptq_dir)
    config = transformers.AutoConfig.from_pretrained(gptq_dir)
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the float twin; no quantizer
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    restore_dense_tensors(model, gptq_dir)
    weights = dequantized_weights(gptq_dir)
    with torch.no_grad():
        for name, w_hat in weights.items():
            model.get_submodule(name).weight.copy_(w_hat)  # (d_out, d_in)
    if adapter and unmerged_adapter(gptq_dir) is not None:
        model = _with_adapter(model, unmerged_adapter(gptq_dir))
    return model.eval()


def unmerged_adapter(gptq_dir: Path) -> Path | None:
    """The PEFT adapter of the units a merged package kept unmerged (None: every unit merged)."""
    folder = Path(gptq_dir) / UNMERGED_ADAPTER
    return folder if (folder / "adapter_config.json").is_file() else None


def _with_adapter(model: nn.Module, adapter_dir: Path) -> nn.Module:
    """``model`` with the PEFT adapter injected, unmerged and in eval (dropout off).

    Every module that has LoRA weights in the adapter file must get a LoRA layer whose rank
    is that tensor's (PEFT only warns on unexpected keys, e.g. a ``target_modules`` that
    misses a module); LoRA variants (DoRA, ...) are refused: the graph holds plain LoRA.
    """
    from edgeqra.gptq import import_gptqmodel

    import_gptqmodel()  # PEFT's LoRA imports GPTQModel: quietly, once
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer
    from safetensors import safe_open

    ranks: dict[str, int] = {}  # module name -> rank, from the adapter file itself
    for path in sorted(adapter_dir.glob("adapter_model*.safetensors")):
        with safe_open(str(path), framework="pt") as reader:
            for key in reader.keys():  # noqa: SIM118 - safe_open has no __iter__
                if ".lora_A." in key:  # base_model.model.<module>.lora_A.weight: (r, d_in)
                    name = key.split(".lora_A.")[0].removeprefix("base_model.model.")
                    ranks[name] = int(reader.get_slice(key).get_shape()[0])
    if not ranks:
        raise ModelError(
            f"{adapter_dir} holds no LoRA weights (`adapter_model.safetensors` with lora_A "
            "tensors); re-export the package"
        )
    peft_model = PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=False)
    peft_model.eval()
    base = peft_model.get_base_model()
    layers = {n: m for n, m in base.named_modules() if isinstance(m, LoraLayer)}
    for name, layer in layers.items():
        if any(layer.lora_variant.values()):
            raise ConfigError(
                f"`{name}` in {adapter_dir} is a LoRA variant "
                f"({type(next(iter(layer.lora_variant.values()))).__name__}); the ONNX "
                "export holds plain LoRA only: merge it or export `--format gptq`"
            )
    got = {n: int(m.lora_A[m.active_adapters[0]].weight.shape[0]) for n, m in layers.items()}
    if got != ranks:
        missing = sorted(set(ranks) - set(got)) or sorted(n for n in got if got[n] != ranks.get(n))
        raise ModelError(
            f"the adapter in {adapter_dir} did not load as saved: {len(missing)} module(s) "
            f"differ, e.g. `{missing[0]}` (rank in file {ranks.get(missing[0])}, loaded "
            f"{got.get(missing[0])}); check its `target_modules` / `rank_pattern`"
        )
    return base.eval()


def lora_summary(model: nn.Module) -> dict[str, dict] | None:
    """{module: {"rank", "scaling", "d_in", "d_out"}} of the PEFT LoRA layers (None: none)."""
    from edgeqra.gptq import import_gptqmodel

    import_gptqmodel()
    from peft.tuners.lora import LoraLayer

    out = {}
    for name, m in model.named_modules():
        if isinstance(m, LoraLayer):
            adapter = m.active_adapters[0]
            a, b = m.lora_A[adapter].weight, m.lora_B[adapter].weight  # (r, d_in), (d_out, r)
            out[name] = {"rank": int(a.shape[0]), "scaling": float(m.scaling[adapter]),
                         "d_in": int(a.shape[1]), "d_out": int(b.shape[0])}  # fmt: skip
    return out or None
