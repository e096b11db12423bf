"""GPTQModel's QuantLinear kernels: which ones a load may pick, which it picked, what they hold.

On CPU every module gets GPTQModel's torch kernel (``TorchLinear``, all bit-widths,
trainable). On CUDA, GPTQModel's ``AUTO`` (inference) or ``AUTO_TRAINABLE`` (training) picks
per module the highest-priority kernel that supports its bits; ``kernels`` (names as in
device profiles: marlin, machete, exllama_v2, triton, torch) restricts the candidates
(:func:`allowed_kernels`, used by :func:`edgeqra.gptq.load.load_gptq`).
"""

from __future__ import annotations

import contextlib
import threading
from collections import Counter
from collections.abc import Iterator, Sequence

import torch
from torch import nn

from edgeqra.errors import ConfigError
from edgeqra.gptq.format import PACKED_SUFFIXES
from edgeqra.gptq.runtime import import_gptqmodel

__all__ = ["allowed_kernels", "kernels_by_bits", "module_bytes"]


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
            if quant and name in PACKED_SUFFIXES:
                add("quantized", tensor)
            elif isinstance(tensor, nn.Parameter) and not quant:
                add("dense", tensor)
            else:
                add("other", tensor)
    return dict(out)
