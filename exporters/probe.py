"""The parity probe: a fixed token input and the logits a package gave, to re-run later.

At export the package is reloaded with its format's own loader (:func:`package_logits`) and
its logits at a spread of vocab ids are stored in the manifest; ``verify`` reloads and
compares them within ``atol + rtol·|ref|``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from edgeqra.exporters.files import PackageError
from torch import nn

__all__ = [
    "PARITY_ATOL",
    "PARITY_RTOL",
    "PARITY_TOKENS",
    "cpu_logits",
    "logits",
    "max_diff",
    "onnx_module",
    "package_logits",
    "probe_ids",
    "probe_record",
]

# verify: the same loader on the same token input in another process (or machine) gives the
# same logits up to matmul reduction order (identical in the tests on one CPU machine; thread
# counts and BLAS builds move them ~1e-6 relative), so 1e-3 + 1e-3·|ref| flags real change.
# The reference is always a CPU float32 load, also when the export ran on a GPU.
PARITY_ATOL, PARITY_RTOL = 1e-3, 1e-3
PARITY_TOKENS = 16
_PROBE_SPREAD = 32  # vocab ids sampled evenly for the stored reference, plus each row's top 4


def onnx_module():
    """The ONNX writer, imported lazily (a separate module with its own heavy imports)."""
    try:
        from edgeqra.exporters import onnx
    except ModuleNotFoundError as exc:
        if exc.name == "edgeqra.exporters.onnx":
            raise PackageError(
                "`--format onnx` is not available in this build (edgeqra.exporters.onnx is "
                "not installed); use `--format gptq` or `--format adapter`"
            ) from None
        raise
    return onnx


def probe_ids(vocab: int) -> torch.Tensor:
    """The fixed parity input: (1, PARITY_TOKENS) seeded token ids."""
    generator = torch.Generator().manual_seed(0)
    return torch.randint(0, vocab, (1, PARITY_TOKENS), generator=generator)


@torch.no_grad()
def logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """(seq, vocab) float32 logits of a (1, seq) input on the model's device."""
    device = next(model.parameters()).device
    return model(input_ids=ids.to(device)).logits[0].float().cpu()  # (seq, vocab)


def probe_record(ids: torch.Tensor, reference: torch.Tensor, loader: str) -> dict[str, object]:
    """The parity record: input, a vocab subset and the reference logits there (seq, k)."""
    vocab = reference.shape[-1]
    spread = set(range(0, vocab, max(1, vocab // _PROBE_SPREAD)))
    top = set(reference.topk(min(4, vocab), dim=-1).indices.flatten().tolist())
    vocab_ids = sorted(spread | top)
    return {
        "input_ids": ids.tolist(),
        "vocab_ids": vocab_ids,
        "reference": reference[:, vocab_ids].tolist(),  # (seq, k)
        "argmax": reference.argmax(-1).tolist(),  # (seq,)
        "atol": PARITY_ATOL,
        "rtol": PARITY_RTOL,
        "loader": loader,
    }


def cpu_logits(
    model: nn.Module, device: str, ids: torch.Tensor, load_cpu: Callable[[], nn.Module]
) -> torch.Tensor:
    """Logits from a CPU float32 load, as ``verify`` re-runs them (``model`` itself on CPU)."""
    return logits(model if device == "cpu" else load_cpu(), ids)


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| over every element."""
    return float((a - b).abs().max())


def package_logits(root: Path, fmt: str, ids: torch.Tensor) -> torch.Tensor:
    """(seq, vocab) logits of the package on ``ids``, through the format's own loader."""
    if fmt == "onnx":
        return torch.as_tensor(onnx_module().onnx_logits(root, ids.numpy()))[0].float()
    from edgeqra.exporters.gptq import load_adapter_form, load_checkpoint

    if fmt == "adapter":
        adapter = root / "adapter" if (root / "adapter").is_dir() else None
        model = load_adapter_form(root / "base", adapter)
    else:
        model = load_checkpoint(root)
    return logits(model, ids)
