"""Loading a GPTQModel checkpoint as the HF model inside, on CPU or CUDA.

Two loads: :func:`load_quantized` (the reference: every width through GPTQModel's torch
kernel, float32 by default, for scoring and parity) and :func:`load_gptq` (real QuantLinear
modules with a trainable or per-width kernel, for quantized fine-tuning and memory
measurement). Facts about GPTQModel 7.6.0 (``tests/test_gptq.py``): ``GPTQModel.load``
cannot build float32 kernels (TorchLinear only takes fp16/bf16 and the fp32 path selects the
4-bit-only TorchFused kernel), so a float32 load is an fp16 load with the torch kernel whose
buffers are upcast, which keeps the fp16 scales exact.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from edgeqra.errors import ConfigError, ModelError
from edgeqra.gptq.kernels import allowed_kernels
from edgeqra.gptq.runtime import import_gptqmodel, quiet_gptqmodel, staged

__all__ = ["load_gptq", "load_quantized", "restore_dense_tensors"]


def load_quantized(
    checkpoint_dir: Path, device: str = "cpu", *, dtype: torch.dtype = torch.float32
) -> nn.Module:
    """Load a GPTQModel checkpoint and return the HF model inside, in ``dtype`` (fp32 by default).

    float32: loads fp16 with GPTQModel's torch kernel (TorchLinear, every bit-width) and upcasts
    (fp16 scales are exact in fp32). bf16/fp16: GPTQModel's own choice of kernels (on CPU the
    4-bit modules get TorchAtenLinear, the others TorchLinear); scales are rounded to ``dtype``.
    """
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")
    import_gptqmodel()
    from gptqmodel import BACKEND, GPTQModel

    checkpoint_dir = Path(checkpoint_dir)
    with tempfile.TemporaryDirectory(prefix="edgeqra-gptq-load-") as tmp:
        source = staged(checkpoint_dir, Path(tmp))
        if dtype == torch.float32:
            with quiet_gptqmodel():  # GPTQModel prints its config dumps to stdout
                qmodel = GPTQModel.load(
                    str(source), device=device, dtype=torch.float16, backend=BACKEND.TORCH
                )
            model = qmodel.model.float()
            restore_dense_tensors(model, checkpoint_dir)  # fp16 load rounded embeddings/norms
        elif dtype in (torch.float16, torch.bfloat16):
            with quiet_gptqmodel():
                model = GPTQModel.load(str(source), device=device, dtype=dtype).model
        else:
            raise ConfigError(f"`dtype`={dtype} is not supported; use float32, float16 or bfloat16")
    model.eval()
    return model


def restore_dense_tensors(model: nn.Module, checkpoint_dir: Path) -> None:
    """Copy the checkpoint's unquantized float tensors (embeddings, norms, lm_head) in exactly.

    An fp16 load rounds them; a float32 model built from the checkpoint gets them back here.
    """
    from safetensors import safe_open

    state = model.state_dict()
    with torch.no_grad():
        for path in sorted(Path(checkpoint_dir).glob("*.safetensors")):
            with safe_open(str(path), framework="pt") as reader:
                for key in reader.keys():  # noqa: SIM118 - safe_open has no __iter__
                    target = state.get(key)
                    if target is not None and target.is_floating_point():
                        target.copy_(reader.get_tensor(key))


def load_gptq(
    checkpoint_dir: Path,
    *,
    device: str = "cpu",
    dtype: torch.dtype = torch.bfloat16,
    trainable: bool = True,
    kernels: Sequence[str] | None = None,
) -> nn.Module:
    """Load a GPTQModel checkpoint as real QuantLinear modules; return the HF model inside.

    CPU: the torch kernel for every module (float32 upcasts it after an fp16 load, as
    :func:`load_quantized` does). CUDA: GPTQModel's ``AUTO_TRAINABLE`` (``trainable``) or
    ``AUTO`` choice per module among ``kernels``; ``kernels_by_bits`` says what it picked.
    A trainable load never validates (hence never JIT-builds) an inference-only kernel.
    """
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")
    import_gptqmodel()
    from gptqmodel import BACKEND, GPTQModel

    checkpoint_dir = Path(checkpoint_dir)
    on_cuda = str(device).startswith("cuda")
    if not on_cuda:
        if kernels is not None and "torch" not in kernels:
            raise ConfigError(
                f"`kernels` = {list(kernels)} has no `torch`: on CPU only GPTQModel's torch "
                "kernel runs every bit-width; add `torch`"
            )
        if dtype == torch.float32:
            with quiet_gptqmodel():  # GPTQModel prints its config dumps to stdout
                return load_quantized(checkpoint_dir, device, dtype=torch.float32)
        backend = BACKEND.TORCH
    else:
        if not torch.cuda.is_available():
            raise ModelError(f"`device` = {device!r} but no CUDA GPU is visible; use `cpu`")
        backend = BACKEND.AUTO_TRAINABLE if trainable else BACKEND.AUTO
    if dtype not in (torch.float16, torch.bfloat16):
        raise ConfigError(f"`dtype`={dtype} is not supported here; use bfloat16 or float16")
    with tempfile.TemporaryDirectory(prefix="edgeqra-gptq-load-") as tmp:
        source = staged(checkpoint_dir, Path(tmp))
        restrict = allowed_kernels(kernels, trainable_only=trainable) if on_cuda else None
        with restrict or contextlib.nullcontext(), quiet_gptqmodel():
            qmodel = GPTQModel.load(str(source), device=device, dtype=dtype, backend=backend)
    model = qmodel.model
    model.eval()
    return model
