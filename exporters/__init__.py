"""Checkpoint, adapter, ONNX and package writers (installed as ``edgeqra.exporters``).

``package`` turns a finished run directory into a verifiable package folder; ``gptq`` writes
the merged and the adapter-form GPTQ checkpoints; ``onnx`` (optional) the MatMulNBits graph.
Heavy imports (torch, GPTQModel, onnx) wait until a name is used.
"""

from __future__ import annotations

import importlib
import importlib.util

__all__ = [
    "FORMATS",
    "available_formats",
    "export_package",
    "export_run",
    "verify_package",
]

FORMATS: tuple[str, ...] = ("gptq", "adapter", "onnx")
_LAZY = {"export_package", "export_run", "verify_package"}


def available_formats() -> tuple[str, ...]:
    """The formats this installation can write (``onnx`` needs ``edgeqra.exporters.onnx``)."""
    has_onnx = importlib.util.find_spec("edgeqra.exporters.onnx") is not None
    return tuple(f for f in FORMATS if f != "onnx" or has_onnx)


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module("edgeqra.exporters.package"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
