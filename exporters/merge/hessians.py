"""Each linear's merge Hessian H = 2·XᵀX, from the tuned model's inputs on calibration rows.

Captured layer by layer: :class:`LayerInputs` runs the model once to a layer's input, then
advances one decoder layer at a time, so each layer sees the outputs of the layers already
merged (as the package will compute them).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from edgeqra.errors import ConfigError
from edgeqra.models import Unit

__all__ = ["LayerInputs", "collect_hessians"]


class _Hessians:
    """Accumulates H = 2·XᵀX/n per linear from forward pre-hooks; modules fed the same
    tensor (q/k/v, gate/up) share one matrix. Lifecycle: attach → forwards → detach."""

    def __init__(self, model: nn.Module, names: Sequence[str]) -> None:
        self.model, self.names = model, list(names)
        self.sums: dict[str, torch.Tensor] = {}  # owner name -> Σ XᵀX (d_in, d_in) float64
        self.owner: dict[str, str] = {}  # module name -> owner of its matrix
        self.tokens: dict[str, int] = {}
        # This forward's inputs, held so that their memory cannot be reused by a later tensor
        # of the same shape (which would then be taken for the same input).
        self._seen: dict[tuple[int, tuple[int, ...]], tuple[str, torch.Tensor]] = {}
        self._handles: list[Any] = []

    def attach(self) -> _Hessians:
        for name in self.names:
            module = self.model.get_submodule(name)
            self._handles.append(module.register_forward_pre_hook(self._hook(name)))
        return self

    def new_batch(self) -> None:
        self._seen.clear()

    def _hook(self, name: str):
        def hook(_module, args):
            x = args[0].detach()
            key = (x.data_ptr(), tuple(x.shape))
            owner = self._seen.get(key, (None, None))[0]
            if owner is not None and self.owner.setdefault(name, owner) == owner:
                return  # the same input tensor as `owner`: its matrix covers this module
            self._seen[key] = (name, x)
            self.owner[name] = name
            x2 = x.reshape(-1, x.shape[-1]).double()  # (tokens, d_in)
            if name not in self.sums:
                self.sums[name] = torch.zeros(x2.shape[1], x2.shape[1], dtype=torch.float64)
                self.tokens[name] = 0
            self.sums[name] += (x2.t() @ x2).cpu()
            self.tokens[name] += x2.shape[0]

        return hook

    def detach(self) -> dict[str, torch.Tensor]:
        """Remove the hooks; {module name: H (d_in, d_in) float32}, shared where inputs are."""
        for h in self._handles:
            h.remove()
        self._handles.clear()
        done = {o: (2.0 * self.sums[o] / self.tokens[o]).float() for o in self.sums}
        return {name: done[self.owner[name]] for name in self.names if name in self.owner}


@torch.no_grad()
def collect_hessians(
    model: nn.Module, names: Sequence[str], rows: torch.Tensor, *, batch_size: int = 4
) -> dict[str, torch.Tensor]:
    """H = 2·XᵀX/n of every named linear's inputs over (n, seq) token rows, one forward pass.

    Args:
        model: the tuned dense model (adapters merged in float): its inputs are the target's.
        names: full module names of the linears.
        rows: (n, seq) token ids (calibration rows).
        batch_size: rows per forward.
    """
    if rows.ndim != 2 or rows.shape[0] == 0:
        raise ConfigError(f"`rows` must be a non-empty (n, seq) tensor, got {tuple(rows.shape)}")
    device = next(model.parameters()).device
    acc = _Hessians(model, names).attach()
    try:
        for start in range(0, rows.shape[0], batch_size):
            acc.new_batch()
            model(input_ids=rows[start : start + batch_size].to(device), use_cache=False)
    finally:
        hessians = acc.detach()
    missing = [n for n in names if n not in hessians]
    if missing:
        raise ConfigError(f"no input reached `{missing[0]}` during the calibration forward")
    return hessians


class _Stop(Exception):  # noqa: N818 - control flow, never escapes
    """Ends a capture forward once the inputs are recorded."""


class LayerInputs:
    """GPTQ's sequential order for the merge: each decoder layer's inputs as the layers merged
    before it produce them, so that a layer's rounding is fed back into the next layers'.

    Lifecycle: ``capture()`` (one forward of the tuned model: layer 0's hidden states and
    every layer's other arguments, which are shared tensors such as position embeddings)
    → per layer in order: ``hessians(unit)`` → the caller writes that unit's merged weights
    into the model → ``advance(unit)`` (run the layer: the next layer's inputs) → ``free()``.
    """

    def __init__(self, model: nn.Module, layers: Sequence[str], rows: torch.Tensor,
                 batch_size: int = 4) -> None:  # fmt: skip
        if rows.ndim != 2 or rows.shape[0] == 0:
            raise ConfigError(
                f"`rows` must be a non-empty (n, seq) tensor, got {tuple(rows.shape)}"
            )
        self.model, self.layers, self.rows, self.batch_size = model, list(layers), rows, batch_size
        self.hidden: list[torch.Tensor] = []  # per batch: (b, seq, hidden) input of the next layer
        self.calls: dict[
            str, list[tuple[tuple, dict]]
        ] = {}  # layer -> per batch (args[1:], kwargs)

    @torch.no_grad()
    def capture(self) -> LayerInputs:
        device = next(self.model.parameters()).device
        last = self.layers[-1]
        for start in range(0, self.rows.shape[0], self.batch_size):

            def hook(module, args, kwargs, name):  # noqa: ARG001
                if name == self.layers[0]:
                    self.hidden.append(args[0].detach())
                self.calls.setdefault(name, []).append((tuple(args[1:]), dict(kwargs)))
                if name == last:
                    raise _Stop

            handles = [
                self.model.get_submodule(n).register_forward_pre_hook(
                    lambda m, a, k, n=n: hook(m, a, k, n), with_kwargs=True
                )
                for n in self.layers
            ]
            try:
                self.model(input_ids=self.rows[start : start + self.batch_size].to(device),
                           use_cache=False)  # fmt: skip
            except _Stop:
                pass
            finally:
                for h in handles:
                    h.remove()
        return self

    def _run(self, layer: str, keep: bool) -> None:
        module = self.model.get_submodule(layer)
        for i, (args, kwargs) in enumerate(self.calls[layer]):
            out = module(self.hidden[i], *args, **kwargs)
            if keep:
                self.hidden[i] = (out[0] if isinstance(out, tuple) else out).detach()

    @torch.no_grad()
    def hessians(self, unit: Unit) -> dict[str, torch.Tensor]:
        """H of the unit's linears on its inputs as the merged layers before it produce them."""
        acc = _Hessians(self.model, [lin.name for lin in unit.linears]).attach()
        try:
            for i, (args, kwargs) in enumerate(self.calls[unit.name]):
                acc.new_batch()
                self.model.get_submodule(unit.name)(self.hidden[i], *args, **kwargs)
        finally:
            hessians = acc.detach()
        return hessians

    @torch.no_grad()
    def advance(self, unit: Unit) -> None:
        """Run the unit's layer (with the weights now in it): the next layer's inputs."""
        self._run(unit.name, keep=True)
        self.calls.pop(unit.name, None)

    def free(self) -> None:
        self.hidden.clear()
        self.calls.clear()
