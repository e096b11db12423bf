"""GPTQ checkpoints of the right shapes with random values, for memory and speed measurement.

Memory does not depend on weight values, so ``edgeqra.measure``, ``bench/memory_truth.py`` and
``plan --measure`` write a checkpoint of a config's *shapes* with seeded packed tensors
instead of running GPTQ on an 8B model. Its tensors, names and ``quantize_config.json`` are
those GPTQModel writes (``tests/test_quantized_tune.py`` checks them against a real
:func:`~edgeqra.gptq.quantize.quantize_to_checkpoint` output), and it loads through the same
``GPTQModel.load`` as a real one, so kernels, repacking and workspaces are the real ones.
"""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path

import torch

from edgeqra.errors import ConfigError
from edgeqra.gptq.format import (
    TensorPlan,
    checkpoint_plan,
    config_bits,
    default_bits,
    dynamic_overrides,
    meta_model,
)
from edgeqra.models import find_units
from edgeqra.space import Config

__all__ = ["write_random_checkpoint"]

_QUANTIZER = "gptqmodel:7.6.0"  # the `meta.quantizer` GPTQModel 7.6.0 writes


def _random_tensor(name: str, spec: TensorPlan, bits: int, group_size: int, gen: torch.Generator):
    """Values that load and run: any int32 is a valid packing; scales keep std(W) near 0.02."""
    leaf = name.rsplit(".", 1)[-1]
    if spec.dtype == torch.int32 and leaf == "g_idx":
        (d_in,) = spec.shape
        step = d_in if group_size <= 0 else group_size
        return (torch.arange(d_in, dtype=torch.int32) // step).contiguous()
    if spec.dtype == torch.int32:
        return torch.randint(-(2**31), 2**31 - 1, spec.shape, dtype=torch.int32, generator=gen)
    if leaf == "scales":
        # W = s·(q − z) with q, z uniform on [0, 2^b): std(q − z) ≈ 2^b/√6, so s = 0.02·√6/2^b.
        return torch.full(spec.shape, 0.02 * math.sqrt(6) / 2**bits, dtype=spec.dtype)
    if "norm" in name:
        return torch.ones(spec.shape, dtype=spec.dtype)
    if leaf == "bias":
        return torch.zeros(spec.shape, dtype=spec.dtype)
    return (torch.randn(spec.shape, generator=gen) * 0.02).to(spec.dtype)


def write_random_checkpoint(
    hf_config: object,
    config: Config,
    out_dir: Path,
    *,
    group_size: int = 64,
    dtype: torch.dtype = torch.bfloat16,
    seed: int = 0,
) -> Path:
    """Write a GPTQModel checkpoint of ``config`` with random packed tensors, atomically.

    The files are what :func:`~edgeqra.gptq.quantize.quantize_to_checkpoint` writes (config.json with its
    ``quantization_config``, quantize_config.json with per-unit ``dynamic`` bits,
    model.safetensors), so ``GPTQModel.load`` treats it as a real one. Bytes equal a real
    checkpoint's; values are seeded noise (for memory and speed measurement, not quality).
    """
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    if out_dir.exists():
        raise ConfigError(f"`out_dir` {out_dir} exists; remove it or choose another folder")
    units = find_units(meta_model(hf_config))
    bits_map = config_bits(units, config)
    default = default_bits(bits_map)
    plan = checkpoint_plan(hf_config, config, group_size=group_size, dtype=dtype)
    module_bits = {lin.name: bits_map[unit.name] for unit in units for lin in unit.linears}
    gen = torch.Generator().manual_seed(seed)
    tensors = {
        name: _random_tensor(
            name, spec, module_bits.get(name.rpartition(".")[0], 16), group_size, gen
        )
        for name, spec in plan.items()
    }
    qcfg = {
        "bits": default,
        "dynamic": dynamic_overrides(bits_map),
        "group_size": group_size,
        "desc_act": False,
        "sym": True,
        "lm_head": False,
        "method": "gptq",
        "quant_method": "gptq",
        "format": "gptq",
        "checkpoint_format": "gptq",
        "pack_dtype": "int32",
        "meta": {"quantizer": [_QUANTIZER], "note": "edgeqra random-weight checkpoint"},
    }
    cfg = hf_config.to_dict()
    cfg["quantization_config"] = qcfg
    cfg["dtype"] = str(dtype).removeprefix("torch.")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir.parent, prefix=f".{out_dir.name}.") as tmp:
        staged = Path(tmp) / "out"
        staged.mkdir()
        save_file(tensors, str(staged / "model.safetensors"), metadata={"format": "pt"})
        (staged / "config.json").write_text(json.dumps(cfg, indent=2))
        (staged / "quantize_config.json").write_text(json.dumps(qcfg, indent=2))
        staged.rename(out_dir)
    return out_dir
