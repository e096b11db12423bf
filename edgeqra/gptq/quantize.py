"""GPTQModel's own quantization loop on a saved HF folder: one checkpoint per call.

The reference path (the bank's ``hessian="sequential"``, the requantizing merge, the
benchmarks); the bank's default build is :mod:`edgeqra.gptq.shared_hessian`. Quantization
runs in float32 (``dtype=torch.float32``): on CPU it is ~10x faster than GPTQModel's bf16
default and keeps the Hessian in full precision.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from edgeqra.errors import ConfigError, DataError, ModelError
from edgeqra.gptq.format import SUPPORTED_BITS, check_3bit_shapes, default_bits, dynamic_overrides
from edgeqra.gptq.runtime import (
    STUB_TOKENIZER_FILES,
    has_tokenizer,
    import_gptqmodel,
    quiet_gptqmodel,
    staged,
)

__all__ = ["quantize_to_checkpoint"]


def _normalize_calibration(
    calibration: Sequence[dict] | Sequence[str] | torch.Tensor,
) -> list[dict] | list[str]:
    """Turn a (n, seq) LongTensor or a list of rows into GPTQModel's list-of-dicts / list-of-str."""
    if isinstance(calibration, torch.Tensor):
        if calibration.ndim != 2 or calibration.dtype != torch.long:
            raise DataError(
                f"`calibration` tensor must be a (n, seq) LongTensor, got {calibration.dtype} "
                f"{tuple(calibration.shape)}"
            )
        return [{"input_ids": row.tolist()} for row in calibration]  # n rows of (seq,)
    rows = list(calibration)
    if not rows:
        raise DataError("`calibration` is empty; pass at least one sample")
    if all(isinstance(r, str) for r in rows):
        return rows
    out = []
    for r in rows:
        if isinstance(r, Mapping) and ("input_ids" in r or "text" in r):
            out.append(dict(r))
        elif isinstance(r, torch.Tensor | list | tuple):
            out.append({"input_ids": torch.as_tensor(r, dtype=torch.long).tolist()})
        else:
            raise DataError(
                f"`calibration` row of type {type(r).__name__} is not supported; use dicts with "
                "`input_ids`, strings, lists of ints, or a (n, seq) LongTensor"
            )
    return out


def quantize_to_checkpoint(
    model_dir: Path,
    out_dir: Path,
    calibration: list[dict] | list[str] | torch.LongTensor,
    *,
    bits: int | dict[str, int],
    group_size: int,
    desc_act: bool = False,
    sym: bool = True,
    seed: int = 0,
    batch_size: int = 16,
    device: str = "cpu",
) -> Path:
    """Run GPTQModel on a saved HF folder and write its GPTQ checkpoint to ``out_dir`` atomically.

    Args:
        model_dir: HF folder (config.json + dense safetensors; tokenizer optional).
        out_dir: destination folder; must not exist yet.
        calibration: (n, seq) LongTensor, list of {"input_ids": ...} dicts, lists of ints, or
            strings (strings need a real tokenizer in ``model_dir``).
        bits: one width for all linears, or {full module name or unit prefix: bits}; modules
            not named get the most common width (:func:`~edgeqra.gptq.format.default_bits`);
            0 leaves a module unquantized.
        group_size: input features per group (-1: per channel); 2/3/4/8 and 32/64/128 tested.
        desc_act: act-order (GPTQModel stores the permutation in ``g_idx``).
        sym: symmetric quantization (zero point fixed at 2**(bits-1)).
        seed: torch seed set before quantizing.
        device: where GPTQModel runs ("cpu" or "cuda"); weights stay float32 either way.
        batch_size: calibration rows per forward pass (GPTQModel's default of 1 is ~Nx slower on CPU).
    """
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    if out_dir.exists():
        raise ConfigError(f"`out_dir` {out_dir} exists; remove it or choose another folder")
    if not (model_dir / "config.json").is_file():
        raise ModelError(f"`model_dir` {model_dir} has no config.json; pass a saved HF folder")
    if isinstance(bits, int):
        default, dynamic = bits, {}
        if bits not in SUPPORTED_BITS:
            raise ConfigError(f"`bits`={bits} is not supported; use one of {SUPPORTED_BITS}")
    else:
        default = default_bits(bits)
        dynamic = dynamic_overrides(bits)
    check_3bit_shapes(model_dir, bits, default)
    rows = _normalize_calibration(calibration)
    if rows and isinstance(rows[0], str) and not has_tokenizer(model_dir):
        raise DataError(
            f"`calibration` is text but {model_dir} has no tokenizer; pass token ids instead"
        )

    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")  # else "requests 2 workers" on 1-2 cores
    import_gptqmodel()
    from gptqmodel import GPTQModel, QuantizeConfig

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir.parent, prefix=f".{out_dir.name}.") as tmp:
        tmp_path = Path(tmp)
        qcfg = QuantizeConfig(
            bits=default,
            group_size=group_size,
            desc_act=desc_act,
            sym=sym,
            dynamic=dynamic or None,
            # GPTQModel's default offload dir is a /tmp folder it leaves behind; keep it in ours.
            offload_to_disk_path=str(tmp_path / "offload"),
        )
        source = staged(model_dir, tmp_path)
        torch.manual_seed(seed)
        written = tmp_path / "out"
        with quiet_gptqmodel(out_dir.parent / "gptqmodel.log"):
            qmodel = GPTQModel.load(str(source), qcfg, dtype=torch.float32, device=device)
            qmodel.quantize(rows, calibration_data_min_length=1, batch_size=batch_size)
            qmodel.save(str(written))
        if source is not model_dir:  # the stub tokenizer stays out of the checkpoint
            for name in STUB_TOKENIZER_FILES:
                (written / name).unlink(missing_ok=True)
        del qmodel
        written.rename(out_dir)
    return out_dir
