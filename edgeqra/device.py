"""The device a job runs on: ``auto``, ``cpu`` or ``cuda[:N]``, checked once (a leaf module:
the pipeline and the pruner both resolve devices, and neither imports the other for it)."""

from __future__ import annotations

import torch

from edgeqra.errors import ConfigError

__all__ = ["resolve_device"]


def resolve_device(device: str) -> str:
    """``auto`` -> cuda when available, else cpu; anything else is checked."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"`device` is {device!r} but no CUDA GPU is visible; use `cpu` or `auto`")
    if device != "cpu" and not device.startswith("cuda"):
        raise ConfigError(f"`device` {device!r} is not one of auto, cpu, cuda[:N]")
    return device
