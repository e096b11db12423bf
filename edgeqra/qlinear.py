"""Memory-saving backward for GPTQModel ``QuantLinear`` layers (issue 15, the QLoRA pattern).

In training mode GPTQModel 7.6's trainable kernels (``TorchLinear``, and ``TritonV2Linear``,
which falls back to ``TorchLinear.forward`` when ``self.training``) dequantize the weight and
call ``torch.matmul(x, W)`` under autograd, so autograd keeps every layer's dense
(d_in, d_out) weight until backward: 13 GiB for Llama-3.1-8B, more than the packed weights
save (``../shared/measurements/README.md``). The frozen base needs no weight gradient, only
``grad_input = grad_output @ Wᵀ``, and W can be rebuilt from the packed tensors that live on
the module anyway (QLoRA, Dettmers et al. 2023, §3: "dequantize in the backward pass").

:class:`_RecomputeBackward` does exactly that: its forward runs the module's own GPTQModel
kernel forward (whatever class GPTQModel picked for those bits) with autograd off, and saves
no tensor at all — not even the input, since the frozen weight's gradient is never computed;
its backward dequantizes W again, computes ``grad_input`` and drops W, so at most one layer's
dense weight is alive at a time. Which kernel rebuilds W is ``dequant``: ``triton`` (the
default: GPTQModel's Triton dequant kernel where it runs, else the module's own) or
``module`` (the module's own ``dequantize_weight``, the call its training forward makes).
They differ in speed only; ``bench/throughput.py`` measures both (configs ``u4`` and
``u4-moddq``) next to GPTQModel's saved path, which dequantizes once per step.

:func:`enable_recompute_backward` installs it per *instance* (an instance ``forward``
attribute): GPTQModel's classes and kernel tables are untouched, ``isinstance`` checks (PEFT's
``dispatch_gptq``) still see a ``BaseQuantLinear``, and :func:`disable_recompute_backward`
removes it. Every bit-width GPTQModel's trainable kernels run (2/3/4/8) goes through it.
"""

from __future__ import annotations

import logging
import types
from collections.abc import Iterator

import torch
from torch import nn

from edgeqra.gptq import import_gptqmodel

__all__ = [
    "DEQUANTS",
    "disable_recompute_backward",
    "enable_recompute_backward",
    "is_recompute_backward",
    "quant_linears",
]

log = logging.getLogger(__name__)

_FLAG = "_edgeqra_recompute_backward"
_DEQUANT = "_edgeqra_recompute_dequant"
DEQUANTS = ("triton", "module")


def quant_linears(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """(name, module) of every GPTQModel ``BaseQuantLinear`` in ``model``."""
    import_gptqmodel()
    from gptqmodel.nn_modules.qlinear import BaseQuantLinear

    for name, module in model.named_modules():
        if isinstance(module, BaseQuantLinear):
            yield name, module


def _num_itr(module: nn.Module, d_in: int) -> int:
    """GPTQModel's ``num_itr`` (g_idx length over the input width; 1 unless sharded)."""
    return max(1, module.g_idx.shape[0] // d_in)


def _dense_weight(module: nn.Module, d_in: int, dequant: str = "triton") -> torch.Tensor:
    """The layer's dequantized weight (d_in, d_out), rebuilt from its packed tensors.

    ``triton``: GPTQModel's Triton dequant kernel where the module could use it at inference
    (CUDA, bits 2/3/4/8; GPTQModel only disables it in training mode, which does not matter
    for a dequantization), else the module's own ``dequantize_weight``. ``module``: always
    the latter — the call the module's training forward makes, so values are the forward's.
    """
    can_triton = getattr(module, "_can_use_triton_dequant", None)
    if dequant == "triton" and can_triton is not None and module.qweight.is_cuda:
        training = module.training
        module.training = False  # the attribute only: GPTQModel's train() hooks are not run
        try:
            usable = can_triton()
        finally:
            module.training = training
        if usable:
            return module._dequantize_weight_triton()
    return module.dequantize_weight(num_itr=_num_itr(module, d_in))


class _RecomputeBackward(torch.autograd.Function):
    """y = QuantLinear(x) with nothing saved; backward: grad_x = grad_y · W(packed)ᵀ."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, module: nn.Module, kernel_forward) -> torch.Tensor:  # noqa: D102
        ctx.module = module  # the packed tensors live on the module: nothing to save
        ctx.x_dtype = x.dtype
        ctx.d_in = x.shape[-1]
        with torch.no_grad():
            return kernel_forward(x)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):  # noqa: D102
        if not ctx.needs_input_grad[0]:
            return None, None, None
        module = ctx.module
        dequant = getattr(module, _DEQUANT, "triton")
        weight = _dense_weight(module, ctx.d_in, dequant)  # (d_in, d_out), freed on return
        if weight.device != grad_out.device or weight.dtype != grad_out.dtype:
            weight = weight.to(device=grad_out.device, dtype=grad_out.dtype)
        shape = grad_out.shape[:-1] + (ctx.d_in,)
        grad_x = grad_out.reshape(-1, grad_out.shape[-1]) @ weight.t()  # (tokens, d_in)
        return grad_x.reshape(shape).to(ctx.x_dtype), None, None


def _trains_own_params(module: nn.Module) -> bool:
    """Whether a floating parameter of the layer itself (e.g. its bias) requires grad."""
    return any(p.requires_grad and p.is_floating_point() for p in module.parameters(recurse=False))


def _recompute_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Instance ``forward``: the recompute path under autograd, the kernel's own otherwise."""
    kernel_forward = types.MethodType(type(self).forward, self)
    if not torch.is_grad_enabled() or _trains_own_params(self):
        # No graph is built (inference, no_grad), or a trainable bias needs the kernel's
        # own autograd graph: leave it to GPTQModel.
        return kernel_forward(x)
    return _RecomputeBackward.apply(x, self, kernel_forward)


def enable_recompute_backward(model: nn.Module, *, dequant: str = "triton") -> int:
    """Give every QuantLinear of ``model`` the recompute backward; returns how many.

    ``dequant`` picks the kernel that rebuilds W in backward (module docstring). Idempotent
    (a second call only sets ``dequant``); PEFT's GPTQ LoRA wrappers may be attached before or
    after (they call the wrapped module, whose instance ``forward`` this sets).
    """
    if dequant not in DEQUANTS:
        raise ValueError(f"`dequant`={dequant!r} must be one of {DEQUANTS}")
    n = 0
    for _, module in quant_linears(model):
        if not getattr(module, _FLAG, False):
            module.forward = types.MethodType(_recompute_forward, module)
            setattr(module, _FLAG, True)
        setattr(module, _DEQUANT, dequant)
        n += 1
    log.debug("recompute backward on %d QuantLinear modules", n)
    return n


def disable_recompute_backward(model: nn.Module) -> int:
    """Remove what :func:`enable_recompute_backward` set; returns how many were restored."""
    n = 0
    for _, module in quant_linears(model):
        if getattr(module, _FLAG, False):
            del module.forward
            delattr(module, _FLAG)
            delattr(module, _DEQUANT)
            n += 1
    return n


def is_recompute_backward(module: nn.Module) -> bool:
    """Whether ``module`` (a QuantLinear) runs the recompute backward."""
    return bool(getattr(module, _FLAG, False))
