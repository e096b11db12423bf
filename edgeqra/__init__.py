"""edgeqra: joint per-layer GPTQ bit-width and LoRA rank search under a device memory budget."""

from __future__ import annotations

__all__ = ["__version__"]

__version__ = "0.1.0"
