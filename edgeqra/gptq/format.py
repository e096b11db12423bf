"""The GPTQ checkpoint format as GPTQModel 7.6 writes it: bit-widths, tensors, headers, W_hat.

Everything edgeqra knows about a checkpoint's layout lives here (no GPTQModel run, no model
load), so the quantizers, loaders, random checkpoints, bank and exporters agree on it.
Facts about GPTQModel 7.6.0 (measured, see ``tests/test_gptq.py`` and /work/shared/FINDINGS.md):

* The checkpoint is GPTQ "v1" format: per linear ``qweight`` int32 (ceil(d_in*bits/32), d_out),
  ``qzeros`` int32 (ceil(d_in/gs), ceil(d_out*bits/32)) holding ``zero - 1``, ``scales`` fp16
  (ceil(d_in/gs), d_out), ``g_idx`` int32 (d_in,) [written even without desc_act], ``bias``
  fp16 (d_out,). W_hat[o, i] = scales[g_idx[i], o] * (q[i, o] - ((qz[g_idx[i], o] + 1) & maxq)).
* Mixed widths are one top-level ``bits`` plus a ``dynamic`` rule per module prefix; GPTQModel
  applies the first rule that matches (:func:`dynamic_overrides`).
"""

from __future__ import annotations

import json
import math
import re
import struct
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from edgeqra.errors import ConfigError, ModelError
from edgeqra.gptq.runtime import import_gptqmodel
from edgeqra.models import find_units
from edgeqra.space import FP16_BITS, Config

__all__ = [
    "PACKED_SUFFIXES",
    "SUPPORTED_BITS",
    "TensorPlan",
    "check_3bit_shapes",
    "checkpoint_plan",
    "config_bits",
    "default_bits",
    "dequantize_packed",
    "dequantized_weights",
    "dynamic_overrides",
    "meta_model",
    "packed_module_bytes",
    "packed_tensors",
    "quantize_config",
    "quantized_prefixes",
    "safetensors_headers",
]

SUPPORTED_BITS = (2, 3, 4, 8)
"""The widths GPTQModel 7.6 packs (0 in a ``bits`` map leaves a module unquantized)."""
PACKED_SUFFIXES = ("qweight", "qzeros", "scales", "g_idx", "bias")
"""The tensors a quantized linear stores, as ``{module}.{suffix}``."""


def config_bits(units: Sequence, config: Config) -> dict[str, int]:
    """{unit prefix: bits} as :func:`dynamic_overrides` takes it; 16-bit units map to 0 (dense).

    Args:
        units: the model's units (``edgeqra.models.Unit``: ``.name`` is the module prefix).
        config: one (bits, rank) per unit, in unit order; ranks are ignored.
    """
    if len(config) != len(units):
        raise ConfigError(
            f"config has {len(config)} units but the model has {len(units)}; give one "
            f"`bits/rank` per decoder layer"
        )
    return {
        unit.name: (0 if choice.bits >= FP16_BITS else choice.bits)
        for unit, choice in zip(units, config, strict=True)
    }


def default_bits(bits: Mapping[str, int]) -> int:
    """The checkpoint's top-level ``bits``: the most common quantized width, ties to the wider.

    Every module also gets its own ``dynamic`` rule, so the default only has to be one of the
    widths and the same for the same map (the quantizer, the random checkpoints and the
    exporters all call this). Raises when every entry is 0 (nothing to quantize).
    """
    counts = Counter(b for b in bits.values() if b)
    if not counts:
        raise ConfigError(
            "every unit is 16-bit (`bits` maps every module to 0): there is nothing to "
            "quantize; keep the model dense"
        )
    return max(counts, key=lambda b: (counts[b], b))


def dynamic_overrides(bits: Mapping[str, int]) -> dict[str, dict[str, int]]:
    """GPTQModel ``dynamic`` dict: one ``+:`` name/prefix regex per entry (``-:`` for bits 0).

    GPTQModel applies the first matching pattern, so longer (more specific) names come first
    and every entry is written, even one equal to the default width.
    """
    dynamic: dict[str, dict[str, int]] = {}
    for name in sorted(bits, key=lambda n: (-len(n), n)):
        b = bits[name]
        pattern = f"^{re.escape(name)}(\\.|$)"  # a full module name or a unit prefix
        if b == 0:
            dynamic[f"-:{pattern}"] = {}
        elif b in SUPPORTED_BITS:
            dynamic[f"+:{pattern}"] = {"bits": b}
        else:
            raise ConfigError(
                f"`bits[{name!r}]`={b} is not supported; use one of {SUPPORTED_BITS} (0 skips)"
            )
    return dynamic


def check_3bit_shapes(model_dir: Path, bits: int | Mapping[str, int], default: int) -> None:
    """Raise before GPTQModel crashes mid-run: its 3-bit packer needs d_in, d_out % 32 == 0.

    Args:
        model_dir: the dense HF folder about to be quantized.
        bits: one width for every linear, or {module name or unit prefix: bits}.
        default: the width of modules ``bits`` does not name.
    """
    header = safetensors_headers(model_dir)
    for key, entry in header.items():
        if not key.endswith(".weight") or len(entry["shape"]) != 2 or ".layers." not in key:
            continue
        module = key[: -len(".weight")]
        if isinstance(bits, int):
            width = bits
        else:  # the longest matching name or unit prefix decides, as in `dynamic_overrides`
            hits = [n for n in bits if module == n or module.startswith(n + ".")]
            width = bits[max(hits, key=len)] if hits else default
        d_out, d_in = entry["shape"]
        if width == 3 and (d_in % 32 or d_out % 32):
            raise ConfigError(
                f"3-bit `{module}` has shape ({d_out}, {d_in}); GPTQModel 7.6 packs 3-bit only "
                "when both dimensions are multiples of 32: give it 2, 4 or 8 bits"
            )


def safetensors_headers(checkpoint_dir: Path) -> dict[str, dict]:
    """{tensor name: {"dtype", "shape", "data_offsets"}} over every *.safetensors in the folder."""
    entries: dict[str, dict] = {}
    files = sorted(Path(checkpoint_dir).glob("*.safetensors"))
    if not files:
        raise ModelError(f"{checkpoint_dir} holds no .safetensors; is it a GPTQ checkpoint?")
    for path in files:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
        header.pop("__metadata__", None)
        entries.update(header)
    return entries


def quantized_prefixes(names: Sequence[str]) -> list[str]:
    """Module names that own a ``qweight`` tensor, sorted."""
    return sorted(n[: -len(".qweight")] for n in names if n.endswith(".qweight"))


def packed_module_bytes(checkpoint_dir: Path) -> dict[str, int]:
    """Bytes per quantized module (qweight, qzeros, scales, g_idx, bias) from safetensors headers."""
    header = safetensors_headers(Path(checkpoint_dir))
    out = {}
    for prefix in quantized_prefixes(list(header)):
        total = 0
        for suffix in PACKED_SUFFIXES:
            entry = header.get(f"{prefix}.{suffix}")
            if entry is not None:
                start, end = entry["data_offsets"]
                total += end - start
        out[prefix] = total
    return out


def packed_tensors(checkpoint_dir: Path) -> dict[str, torch.Tensor]:
    """Every quantized module's stored tensors (qweight, qzeros, scales, g_idx, bias), by key.

    These are the exact numbers GPTQModel wrote; the bank keeps them per unit so that an
    exported base checkpoint holds what the search tuned on (no second GPTQ run).
    """
    from safetensors import safe_open

    tensors: dict[str, torch.Tensor] = {}
    for path in sorted(Path(checkpoint_dir).glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as reader:
            names = list(reader.keys())
            prefixes = set(quantized_prefixes(names))
            for key in names:
                prefix, suffix = key.rsplit(".", 1)
                if prefix in prefixes and suffix in PACKED_SUFFIXES:
                    tensors[key] = reader.get_tensor(key)
    return tensors


def quantize_config(checkpoint_dir: Path) -> dict:
    """The checkpoint's quantization config (quantize_config.json or config.json's entry)."""
    checkpoint_dir = Path(checkpoint_dir)
    path = checkpoint_dir / "quantize_config.json"
    if path.is_file():
        return json.loads(path.read_text())
    cfg = json.loads((checkpoint_dir / "config.json").read_text()).get("quantization_config")
    if not cfg:
        raise ModelError(
            f"{checkpoint_dir} has no quantize_config.json; not a GPTQModel checkpoint"
        )
    return cfg


def dequantized_weights(checkpoint_dir: Path) -> dict[str, torch.Tensor]:
    """Dense float32 W_hat (d_out, d_in) per quantized linear, as GPTQModel's torch kernel sees it."""
    return dequantize_packed(packed_tensors(checkpoint_dir), quantize_config(checkpoint_dir))


def dequantize_packed(
    tensors: Mapping[str, torch.Tensor], qcfg: Mapping[str, object]
) -> dict[str, torch.Tensor]:
    """Dense float32 W_hat (d_out, d_in) per module from its packed GPTQ tensors, by module name.

    ``tensors`` holds ``{module}.qweight/.qzeros/.scales/.g_idx`` as a checkpoint stores them;
    ``qcfg`` is its quantization config (``bits``, ``dynamic``, ``checkpoint_format``).
    """
    import_gptqmodel()
    from gptqmodel.quantization.config import dynamic_get
    from gptqmodel.utils.model_dequant import unpack_cols, unpack_rows

    fmt = str(qcfg.get("checkpoint_format") or qcfg.get("format") or "gptq").lower()
    if fmt not in {"gptq", "gptq_v2"}:
        raise ModelError(f"checkpoint format {fmt!r} is not gptq/gptq_v2")
    out = {}
    for prefix in quantized_prefixes(list(tensors)):
        # Per-module bits from `dynamic` (GPTQModel's own dequantize_model ignores it).
        bits = int(dynamic_get(qcfg.get("dynamic"), prefix, "bits", qcfg["bits"]))
        g_idx = tensors[f"{prefix}.g_idx"].long()  # (d_in,)
        scales = tensors[f"{prefix}.scales"].float()  # (groups, d_out)
        d_in, d_out = g_idx.numel(), scales.shape[1]
        q = unpack_rows(tensors[f"{prefix}.qweight"], bits)[:d_in]  # (d_in, d_out) codes
        z = unpack_cols(tensors[f"{prefix}.qzeros"], bits)[:, :d_out]  # (groups, d_out)
        if fmt == "gptq":
            z = (z + 1) & ((1 << bits) - 1)  # v1 stores zero - 1; the torch kernel uses v2
        w = scales[g_idx] * (q.float() - z[g_idx].float())  # (d_in, d_out)
        out[prefix] = w.t().contiguous()  # (d_out, d_in)
    return out


# ---------------------------------------------------------------- layout without a checkpoint


@dataclass(frozen=True)
class TensorPlan:
    """One tensor a checkpoint holds: its shape and dtype (no data)."""

    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        """Bytes of the tensor."""
        return math.prod(self.shape) * torch.empty((), dtype=self.dtype).element_size()


def meta_model(hf_config: object) -> nn.Module:
    """The architecture on PyTorch's meta device: names and shapes, no memory."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(hf_config)


def checkpoint_plan(
    hf_config: object, config: Config, *, group_size: int, dtype: torch.dtype = torch.bfloat16
) -> dict[str, TensorPlan]:
    """Every tensor a GPTQModel checkpoint of ``config`` holds, in GPTQ v1 format.

    Per quantized linear (d_in -> d_out, q bits, G = group size): ``qweight`` int32
    (ceil(d_in·q/32), d_out), ``qzeros`` int32 (ceil(d_in/G), ceil(d_out·q/32)), ``scales``
    fp16 (ceil(d_in/G), d_out), ``g_idx`` int32 (d_in,), ``bias`` fp16 (d_out,). Everything
    else (embeddings, norms, 16-bit units, an untied lm_head) at ``dtype``; a tied lm_head
    is not stored.
    """
    model = meta_model(hf_config)
    units = find_units(model)
    bits = {
        lin.name: choice.bits
        for unit, choice in zip(units, config, strict=True)
        for lin in unit.linears
        if choice.bits < FP16_BITS
    }
    if len(config) != len(units):
        raise ConfigError(f"config has {len(config)} units but the model has {len(units)}")
    plan: dict[str, TensorPlan] = {}
    for name, param in model.named_parameters():  # de-duplicates tied tensors
        module, _, leaf = name.rpartition(".")
        if module not in bits:
            plan[name] = TensorPlan(tuple(param.shape), dtype)
            continue
        if leaf == "bias":
            plan[name] = TensorPlan(tuple(param.shape), torch.float16)
            continue
        q = bits[module]
        d_out, d_in = param.shape
        groups = 1 if group_size <= 0 else math.ceil(d_in / group_size)
        plan[f"{module}.qweight"] = TensorPlan((math.ceil(d_in * q / 32), d_out), torch.int32)
        plan[f"{module}.qzeros"] = TensorPlan((groups, math.ceil(d_out * q / 32)), torch.int32)
        plan[f"{module}.scales"] = TensorPlan((groups, d_out), torch.float16)
        plan[f"{module}.g_idx"] = TensorPlan((d_in,), torch.int32)
    return plan
