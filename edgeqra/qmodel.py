"""Real GPTQModel models: which kernel runs each bit-width, and random-weight checkpoints.

Two uses, both with GPTQModel's own ``QuantLinear`` modules (not the bank's dequantized
stand-ins):

* the real quantized fine-tuning path (``tune.quantized_lora``): a mixed-precision checkpoint
  loaded with a trainable kernel per module;
* memory measurement (``edgeqra.measure``, ``bench/memory_truth.py``, ``plan --measure``):
  memory does not depend on weight values, so a checkpoint of the right *shapes* is written
  with random packed tensors (:func:`write_random_checkpoint`) instead of running GPTQ on an
  8B model. Its tensors, names and ``quantize_config.json`` are those GPTQModel writes (tested
  against a real ``quantize_to_checkpoint`` output), and it is loaded through the same
  ``GPTQModel.load`` as a real one, so kernels, repacking and workspaces are the real ones.

Kernel choice. On CPU every module gets GPTQModel's torch kernel (``TorchLinear``, all bit-
widths, trainable). On CUDA, GPTQModel's ``AUTO`` (inference) or ``AUTO_TRAINABLE`` (training)
picks per module the highest-priority kernel that supports its bits; ``kernels`` (names as in
device profiles: marlin, machete, exllama_v2, triton, torch) restricts the candidates.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
import threading
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from edgeqra.errors import ConfigError, ModelError
from edgeqra.gptq import import_gptqmodel
from edgeqra.models import find_units
from edgeqra.space import FP16_BITS, Config

__all__ = [
    "TensorPlan",
    "allowed_kernels",
    "checkpoint_plan",
    "config_bits",
    "kernels_by_bits",
    "load_gptq",
    "meta_model",
    "module_bytes",
    "write_random_checkpoint",
]

_QUANTIZER = "gptqmodel:7.6.0"
_PACKED = ("qweight", "qzeros", "scales", "g_idx", "bias")


@dataclass(frozen=True)
class TensorPlan:
    """One tensor a checkpoint holds: its shape and dtype (no data)."""

    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        """Bytes of the tensor."""
        return math.prod(self.shape) * torch.empty((), dtype=self.dtype).element_size()


def config_bits(units: Sequence, config: Config) -> dict[str, int]:
    """{unit prefix: bits} for ``quantize_to_checkpoint``; 16-bit units map to 0 (not quantized)."""
    if len(config) != len(units):
        raise ConfigError(
            f"config has {len(config)} units but the model has {len(units)}; give one "
            f"`bits/rank` per decoder layer"
        )
    return {
        unit.name: (0 if choice.bits >= FP16_BITS else choice.bits)
        for unit, choice in zip(units, config, strict=True)
    }


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

    The files are what ``quantize_to_checkpoint`` writes (config.json with its
    ``quantization_config``, quantize_config.json with per-unit ``dynamic`` bits,
    model.safetensors), so ``GPTQModel.load`` treats it as a real one. Bytes equal a real
    checkpoint's; values are seeded noise (for memory and speed measurement, not quality).
    """
    from safetensors.torch import save_file

    from edgeqra.gptq import dynamic_overrides

    out_dir = Path(out_dir)
    if out_dir.exists():
        raise ConfigError(f"`out_dir` {out_dir} exists; remove it or choose another folder")
    units = find_units(meta_model(hf_config))
    bits_map = config_bits(units, config)
    widths = [b for b in bits_map.values() if b]
    if not widths:
        raise ConfigError("every unit is 16-bit: there is nothing to quantize; build it dense")
    default = max(set(widths), key=lambda b: (widths.count(b), -b))
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


# ---------------------------------------------------------------- kernels


def _backend_values(names: Sequence[str]) -> set[str]:
    """Profile kernel names -> GPTQModel BACKEND values; unknown names raise."""
    from edgeqra.profiles import KERNELS

    bad = [n for n in names if n not in KERNELS]
    if bad:
        raise ConfigError(
            f"`kernels` {bad} are not GPTQModel kernels; use some of {sorted(KERNELS)}"
        )
    return {KERNELS[n].backend for n in names}


_KERNEL_TABLE_LOCK = threading.RLock()  # held while allowed_kernels filters the table


@contextlib.contextmanager
def allowed_kernels(names: Sequence[str] | None, *, trainable_only: bool = False) -> Iterator[None]:
    """Restrict GPTQModel's AUTO kernel choice to ``names`` while a model loads.

    ``None`` keeps every kernel; ``trainable_only`` also drops kernels without
    ``SUPPORTS_TRAINING``. The one place edgeqra edits a GPTQModel global, because GPTQModel
    7.6 (pinned ``<7.7``) has no per-call way to say "AUTO, among these kernels": ``backend=``
    names one kernel for every module, while a mixed-bit config needs one per width (on CUDA
    with a profile's list, trainable: Triton for 2/4/8 bits, the torch kernel for 3), which
    only AUTO's per-module choice gives; and AUTO walks ``AUTO_BACKEND_KERNEL_MAPPING`` in
    priority order, validating each candidate, which JIT-compiles its CUDA extension (minutes
    for Marlin or Machete) before it checks bits or trainability. So the table is filtered
    for the ``with`` block only and restored (same entries, same order) on the way out,
    exceptions included; a lock keeps concurrent loads in threads (the TUI's workers) from
    seeing each other's filter. CPU loads never get here (``backend=BACKEND.TORCH``).
    """
    if names is None and not trainable_only:
        yield
        return
    import_gptqmodel()
    from gptqmodel.quantization import FORMAT, METHOD
    from gptqmodel.utils.importer import AUTO_BACKEND_KERNEL_MAPPING

    keep = None if names is None else _backend_values(names)
    with _KERNEL_TABLE_LOCK:
        table = AUTO_BACKEND_KERNEL_MAPPING[METHOD.GPTQ][FORMAT.GPTQ]
        saved = list(table.items())
        for backend, cls in saved:
            if (keep is not None and backend.value not in keep) or (
                trainable_only and not getattr(cls, "SUPPORTS_TRAINING", False)
            ):
                del table[backend]
        try:
            yield
        finally:
            table.clear()
            table.update(saved)


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
    ``gptq.load_quantized`` does). CUDA: GPTQModel's ``AUTO_TRAINABLE`` (``trainable``) or
    ``AUTO`` choice per module among ``kernels``; ``kernels_by_bits`` says what it picked.
    A trainable load never validates (hence never JIT-builds) an inference-only kernel.
    """
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")
    import_gptqmodel()
    from gptqmodel import BACKEND, GPTQModel

    from edgeqra.gptq import _quiet, _staged, load_quantized

    checkpoint_dir = Path(checkpoint_dir)
    on_cuda = str(device).startswith("cuda")
    if not on_cuda:
        if kernels is not None and "torch" not in kernels:
            raise ConfigError(
                f"`kernels` = {list(kernels)} has no `torch`: on CPU only GPTQModel's torch "
                "kernel runs every bit-width; add `torch`"
            )
        if dtype == torch.float32:
            with _quiet():  # GPTQModel prints its config dumps to stdout
                return load_quantized(checkpoint_dir, device, dtype=torch.float32)
        backend = BACKEND.TORCH
    else:
        if not torch.cuda.is_available():
            raise ModelError(f"`device` = {device!r} but no CUDA GPU is visible; use `cpu`")
        backend = BACKEND.AUTO_TRAINABLE if trainable else BACKEND.AUTO
    if dtype not in (torch.float16, torch.bfloat16):
        raise ConfigError(f"`dtype`={dtype} is not supported here; use bfloat16 or float16")
    with tempfile.TemporaryDirectory(prefix="edgeqra-gptq-load-") as tmp:
        source = _staged(checkpoint_dir, Path(tmp))
        restrict = allowed_kernels(kernels, trainable_only=trainable) if on_cuda else None
        with restrict or contextlib.nullcontext(), _quiet():
            qmodel = GPTQModel.load(str(source), device=device, dtype=dtype, backend=backend)
    model = qmodel.model
    model.eval()
    return model


def kernels_by_bits(model: nn.Module) -> dict[int, str]:
    """{bits: QuantLinear class name} of a loaded model ("A+B" if one width got two kernels)."""
    import_gptqmodel()
    from gptqmodel.nn_modules.qlinear import BaseQuantLinear

    seen: dict[int, set[str]] = {}
    for module in model.modules():
        if isinstance(module, BaseQuantLinear):
            seen.setdefault(int(module.bits), set()).add(type(module).__name__)
    return {bits: "+".join(sorted(names)) for bits, names in sorted(seen.items())}


def module_bytes(model: nn.Module) -> dict[str, int]:
    """Bytes a loaded model holds, split the way the memory model counts them.

    ``quantized``: the packed tensors of every QuantLinear (qweight, qzeros, scales, g_idx,
    bias); ``dense``: every other parameter, tied tensors once; ``other``: remaining buffers
    (kernel shift tables, rotary ``inv_freq``, kernel workspaces), which the memory model
    does not count. Storage shared between tensors is counted once.
    """
    import_gptqmodel()
    from gptqmodel.nn_modules.qlinear import BaseQuantLinear

    seen: set[tuple[int, int]] = set()
    out = Counter({"quantized": 0, "dense": 0, "other": 0})

    def add(kind: str, tensor: torch.Tensor | None) -> None:
        if tensor is None or tensor.device.type == "meta":
            return
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset())
        if key in seen:
            return
        seen.add(key)
        out[kind] += tensor.numel() * tensor.element_size()

    for module in model.modules():
        quant = isinstance(module, BaseQuantLinear)
        for name, tensor in list(module.named_parameters(recurse=False)) + list(
            module.named_buffers(recurse=False)
        ):
            if quant and name in _PACKED:
                add("quantized", tensor)
            elif isinstance(tensor, nn.Parameter) and not quant:
                add("dense", tensor)
            else:
                add("other", tensor)
    return dict(out)
