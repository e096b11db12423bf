"""A real GPTQModel base with a config's per-unit LoRA, ready for :func:`edgeqra.tune.train`.

The final-tuning and memory-measurement path (issue 4), unlike the bank's dequantized
stand-in that the search's evaluations use: every linear is a GPTQModel ``QuantLinear`` with
the config's bits (``dynamic`` per unit), so forward and backward run through the quantized
kernels; by default the base layers' backward dequantizes the packed weight again instead of
keeping it dense (:mod:`edgeqra.qlinear`, issue 15). Kept apart from :mod:`edgeqra.tune`
because it is the one part of tuning that needs GPTQModel.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from edgeqra.errors import ConfigError
from edgeqra.gptq import import_gptqmodel
from edgeqra.models import Unit, find_units
from edgeqra.space import Config
from edgeqra.tune import TuneSettings, attach_lora

__all__ = ["QuantizedLoRA", "quantized_lora"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, eq=False)
class QuantizedLoRA:
    """A real GPTQModel base with the config's adapters, ready for :func:`train`."""

    model: nn.Module  # PeftModel over the HF model whose linears are GPTQModel QuantLinear
    units: tuple[Unit, ...]
    checkpoint: Path  # the mixed-precision GPTQ checkpoint it was loaded from
    kernels: dict[int, str]  # bits -> QuantLinear class GPTQModel gave those modules
    recompute_backward: bool = True  # base layers rebuild W in backward (edgeqra.qlinear)


def _check_checkpoint_bits(checkpoint: Path, units: Sequence[Unit], config: Config) -> None:
    """Every linear of the checkpoint must carry the config's bits (16 = not quantized)."""
    import_gptqmodel()
    from gptqmodel.quantization.config import dynamic_get

    from edgeqra.gptq import quantize_config

    qcfg = quantize_config(checkpoint)
    wrong = []
    for unit, choice in zip(units, config, strict=True):
        for lin in unit.linears:
            got = dynamic_get(qcfg.get("dynamic"), lin.name, "bits", qcfg["bits"])
            got = 16 if got is False else int(got)
            if got != min(choice.bits, 16):
                wrong.append(f"{lin.name}: checkpoint {got}, config {choice.bits}")
    if wrong:
        raise ConfigError(
            f"checkpoint {checkpoint} does not hold the config's bits ({len(wrong)} modules, "
            f"e.g. {wrong[:3]}); pass the checkpoint written for this config, or none to "
            "quantize one"
        )


def quantized_lora(
    model_dir: Path,
    config: Config,
    settings: TuneSettings,
    *,
    calibration: torch.Tensor | None = None,
    checkpoint: Path | None = None,
    out_dir: Path | None = None,
    group_size: int = 64,
    device: str = "cpu",
    dtype: torch.dtype | None = None,
    kernels: Sequence[str] | None = None,
    recompute_backward: bool = True,
) -> QuantizedLoRA:
    """Load ``config`` as a real mixed-precision GPTQ model and attach its per-unit LoRA.

    The final-tuning / measurement path (issue 4), unlike the bank's dequantized stand-in:
    every linear is a GPTQModel ``QuantLinear`` with the config's bits (``dynamic`` per unit),
    so the forward and backward run through the quantized kernels. On CPU that is GPTQModel's
    torch kernel (float32 by default); on CUDA GPTQModel's fastest *trainable* kernel for each
    bit-width among ``kernels`` (bf16 by default; ``.kernels`` records the choice).

    Args:
        model_dir: dense HF folder (config.json + safetensors).
        config: one (bits, rank) per unit; 16-bit units stay dense.
        settings: LoRA seed, alpha ratio, dropout (and later the ``train`` settings).
        calibration: (n, seq) token ids for GPTQ when no ``checkpoint`` is given.
        checkpoint: an existing GPTQ checkpoint of this config (its bits are checked).
        out_dir: where the new checkpoint goes (must not exist) when one is quantized.
        group_size: GPTQ group size.
        device: "cpu" or "cuda" (GPTQ and the model both run there).
        dtype: compute dtype; float32 on CPU, bfloat16 on CUDA when None.
        kernels: profile kernel names GPTQModel may pick from on CUDA (None: all).
        recompute_backward: the base layers keep no dense weight for backward and
            dequantize it again there (``edgeqra.qlinear``, issue 15); False keeps
            GPTQModel's own autograd path (one dense weight per layer alive until backward).
    """
    from transformers import AutoConfig

    from edgeqra.gptq import (
        config_bits,
        kernels_by_bits,
        load_gptq,
        meta_model,
        quantize_to_checkpoint,
    )

    model_dir = Path(model_dir)
    units = find_units(meta_model(AutoConfig.from_pretrained(model_dir, local_files_only=True)))
    bits = config_bits(units, config)
    if not any(bits.values()):
        raise ConfigError(
            "every unit of the config is 16-bit: nothing to quantize; tune the dense model "
            "with `tune` instead"
        )
    if checkpoint is None:
        if calibration is None or out_dir is None:
            raise ConfigError(
                "`quantized_lora` needs `calibration` and `out_dir` to quantize the model, or "
                "an existing `checkpoint` of this config"
            )
        checkpoint = quantize_to_checkpoint(
            model_dir, Path(out_dir), calibration, bits=bits, group_size=group_size, device=device
        )
    checkpoint = Path(checkpoint)
    _check_checkpoint_bits(checkpoint, units, config)
    if dtype is None:
        dtype = torch.bfloat16 if str(device).startswith("cuda") else torch.float32
    base = load_gptq(checkpoint, device=device, dtype=dtype, trainable=True, kernels=kernels)
    chosen = kernels_by_bits(base)
    log.info("quantized base %s: kernels %s", checkpoint, chosen)
    if recompute_backward:
        from edgeqra.qlinear import enable_recompute_backward

        enable_recompute_backward(base)
    model = attach_lora(base, units, config, settings)
    return QuantizedLoRA(model, tuple(units), checkpoint, chosen, recompute_backward)
