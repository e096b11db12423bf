"""The device a job runs on: ``auto``, ``cpu`` or ``cuda[:N]``, checked once, and the two
model-side helpers every stage that runs a model needs (a leaf module: the pipeline, the
pruner, tuning, evaluation and sensitivity all use it, and none imports another for it)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from edgeqra.errors import ConfigError

__all__ = ["eval_mode", "model_device", "resolve_device"]


def resolve_device(device: str) -> str:
    """``auto`` -> cuda when available, else cpu; anything else is checked."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"`device` is {device!r} but no CUDA GPU is visible; use `cpu` or `auto`")
    if device != "cpu" and not device.startswith("cuda"):
        raise ConfigError(f"`device` {device!r} is not one of auto, cpu, cuda[:N]")
    return device


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (or buffer; CPU when it has neither)."""
    for tensor in (*model.parameters(), *model.buffers()):
        return tensor.device
    return torch.device("cpu")


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Every submodule in eval mode (no dropout), then each one's own flag restored: a model
    half in training mode (PEFT's adapters on a frozen base) comes back exactly as it was."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, flag in flags:
            module.training = flag
