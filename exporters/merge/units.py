"""Merge LoRA adapters onto the bank's GPTQ grid (issue 21): W' on the stored scales and zeros.

The old merge (``MergeMethod.REQUANTIZE``, :func:`edgeqra.exporters.gptq.write_merged_checkpoint`)
runs GPTQModel again on W* = Dequant(Q(W)) + (alpha/r)·B·A: GPTQModel re-fits scales and zero
points to W*, so every weight is rounded a second time on a fresh grid, and the tuned model's
score drops (bench/RESULTS.md, exporters: 0.325 -> 0.225 on SmolLM2). ``MergeMethod.GRID``
keeps the grid the search tuned on: the bank's scales, zero points and groups for that unit
and width, and only chooses new integer codes for W*, with GPTQ's error feedback over the
layer's Hessian H = 2·XᵀX (inputs of the tuned model on calibration rows), so that what the
adapter changed in the layer's *outputs* survives the rounding. A unit whose adapter barely
moves any weight by half a step keeps nearly the bank's codes, and the error the rounding
leaves is measured on the outputs, per layer, in the manifest.

Per unit (a decoder layer), the merge error is ``lost = ‖X(W' − W*)‖ / ‖X(W* − W_hat)‖``
summed over the unit's linears: the fraction of the adapter's effect on the outputs that the
merge loses (0: all kept; 1: as if the adapter were dropped). Above ``threshold`` the
settings choose: ``unmerged`` (the default: keep the bank's codes and ship that unit's adapter
unmerged, so the package loads as base + adapter), ``report`` (merge anyway, flagged), or
``upbits`` (merge onto the bank's grid of the next width up, if the bank has it and the budget
allows). ``unmerged`` is the default because on SmolLM2 a 32-step adapter moves weights by less
than a grid step: merged on the grid, 0.96-0.98 of its effect is lost and the package scores
9-14 points below the adapter form on 570 ARC-Easy items, while the unmerged package scores
what the adapter form does (H200, bench/RESULTS.md, issue 21).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from enum import Enum
from typing import Any

import torch
from torch import nn

from edgeqra.errors import ConfigError
from edgeqra.gptq import import_gptqmodel
from edgeqra.models import Unit
from edgeqra.settings import setting
from edgeqra.space import FP16_BITS, Choice, Config

__all__ = [
    "GridLayout",
    "LayerInputs",
    "LayerMerge",
    "MergeMethod",
    "MergeSettings",
    "OverThreshold",
    "collect_hessians",
    "gptq_on_grid",
    "merge_units",
    "output_error",
]

log = logging.getLogger(__name__)


class MergeMethod(str, Enum):
    """How adapters are merged into the GPTQ checkpoint."""

    GRID = "grid"  # onto the bank's scales/zeros with error feedback (this module)
    REQUANTIZE = "requantize"  # GPTQModel again on the merged dense weights (the old path)


class OverThreshold(str, Enum):
    """What to do with a unit whose merge loses more than ``threshold`` of its adapter."""

    REPORT = "report"  # merge anyway; the manifest flags it
    UNMERGED = "unmerged"  # keep the bank's codes, ship the unit's adapter unmerged
    UPBITS = "upbits"  # merge onto the next bit-width's grid if the bank and budget allow


@dataclass(frozen=True)
class MergeSettings:
    """The export's merge choices (``edgeqra export --merge ...``; a job file's ``[merge]``)."""

    method: MergeMethod = setting(
        MergeMethod.GRID,
        help="gptq/onnx: round W+BA onto the bank's own grid with GPTQ error feedback (grid) "
        "or run GPTQModel again on the merged weights (requantize, the old way)",
        key="merge.method",
        flag="--merge",
    )
    threshold: float = setting(  # fraction of the adapter's output effect a merge may lose
        0.5,
        help="a layer whose merge loses more than this fraction of its adapter's effect on "
        "its outputs is kept unmerged (see --over-threshold)",
        key="merge.threshold",
        flag="--merge-threshold",
    )
    over_threshold: OverThreshold = setting(  # module docstring says why
        OverThreshold.UNMERGED,
        help="layers over the threshold: keep their adapter unmerged (unmerged: the package "
        "loads as base + adapter), merge anyway (report), or merge at the next bit-width up "
        "if the budget allows (upbits)",
        key="merge.over_threshold",
    )
    hessian_rows: int = setting(  # the run's calibration rows, plus fresh windows if fewer
        64,
        help="calibration rows for each layer's merge Hessian (the run's, plus fresh windows "
        "of the same source if it had fewer); fewer is faster, on CPU especially",
        key="merge.hessian_rows",
        flag="--hessian-rows",
    )
    damp: float = 0.01  # GPTQ's dampening, a fraction of mean(diag H)
    block_size: int = 128  # GPTQ's lazy-batch block (speed only, same result)

    def __post_init__(self) -> None:
        for name, enum in (("method", MergeMethod), ("over_threshold", OverThreshold)):
            value = getattr(self, name)
            try:
                object.__setattr__(self, name, enum(value))
            except ValueError:
                raise ConfigError(
                    f"`{name}` {value!r} is unknown; use one of {[e.value for e in enum]}"
                ) from None
        if not (self.threshold >= 0 and math.isfinite(self.threshold)):
            raise ConfigError(f"`threshold` {self.threshold} must be a finite number >= 0")
        if self.hessian_rows < 1:
            raise ConfigError(f"`hessian_rows` {self.hessian_rows} must be >= 1, e.g. 8 or 64")
        if not 0 <= self.damp < 1:
            raise ConfigError(f"`damp` {self.damp} must be in [0, 1), e.g. 0.01")
        if self.block_size < 1:
            raise ConfigError(f"`block_size` {self.block_size} must be >= 1")

    def to_json(self) -> dict[str, Any]:
        """JSON-ready fields (enums as their strings)."""
        out = asdict(self)
        out["method"], out["over_threshold"] = self.method.value, self.over_threshold.value
        return out


# ----------------------------------------------------------------------------- the grid


@dataclass(frozen=True)
class GridLayout:
    """One GPTQ linear's fixed grid as the bank stored it (GPTQ orientation, K = d_in)."""

    bits: int
    scales: torch.Tensor  # (groups, d_out) float32 (the checkpoint's fp16, exact)
    zeros: torch.Tensor  # (groups, d_out) int64 true zero points (v1's ``zero - 1`` undone)
    g_idx: torch.Tensor  # (d_in,) int64 group of each input feature
    v1: bool  # the checkpoint stores ``zero - 1`` (GPTQ v1)

    @classmethod
    def from_packed(cls, packed: Mapping[str, torch.Tensor], prefix: str, bits: int, v1: bool):
        """Read a module's scales / zeros / g_idx out of its checkpoint tensors."""
        import_gptqmodel()
        from gptqmodel.utils.model_dequant import unpack_cols

        scales = packed[f"{prefix}.scales"]  # (groups, d_out) fp16
        d_out = scales.shape[1]
        zeros = unpack_cols(packed[f"{prefix}.qzeros"], bits)[:, :d_out].long()
        if v1:
            zeros = (zeros + 1) & ((1 << bits) - 1)
        return cls(bits, scales.float(), zeros, packed[f"{prefix}.g_idx"].long(), v1)

    @property
    def maxq(self) -> int:
        return (1 << self.bits) - 1

    def dequantize(self, codes: torch.Tensor) -> torch.Tensor:
        """(d_out, d_in) float32 weight of (d_out, d_in) codes: scale·(code − zero), per group."""
        s = self.scales[self.g_idx].t()  # (d_out, d_in)
        z = self.zeros[self.g_idx].t()
        return s * (codes.float() - z.float())

    def codes_of(self, packed: Mapping[str, torch.Tensor], prefix: str) -> torch.Tensor:
        """The stored (d_out, d_in) integer codes of ``prefix``."""
        import_gptqmodel()
        from gptqmodel.utils.model_dequant import unpack_rows

        d_in = self.g_idx.numel()
        return unpack_rows(packed[f"{prefix}.qweight"], self.bits)[:d_in].t().long()

    def pack(self, codes: torch.Tensor) -> torch.Tensor:
        """(d_out, d_in) codes -> GPTQ ``qweight`` int32 (ceil(d_in·bits/32), d_out)."""
        import_gptqmodel()
        from gptqmodel.utils.model_dequant import pack_cols

        # pack_cols packs along its last dim; on (d_out, d_in) that is GPTQ's row packing.
        return (
            pack_cols(codes.int().contiguous(), self.bits, pack_dtype=torch.int32).t().contiguous()
        )


def gptq_on_grid(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    *,
    maxq: int,
    damp: float = 0.01,
    block_size: int = 128,
) -> torch.Tensor:
    """GPTQ (Frantar et al. 2022, Alg. 1) with a *fixed* grid: min ‖X(W − Q)‖² over codes only.

    Hand-written (the gpt-fast ``GPTQ.py`` shape) because GPTQModel's quantizer always fits
    scales and zero points to the weights it is given; here they are the bank's, so that the
    merged layer stays on the grid the search tuned on (issue 21). Columns are processed in
    order; each column's rounding error is spread over the not-yet-rounded columns through
    the Cholesky factor of H⁻¹, exactly as GPTQ does, in float32 on the tensors' device.

    Args:
        weight: (d_out, d_in) float target W* (the merged dense weight).
        hessian: (d_in, d_in) H = 2·XᵀX/n of the layer's inputs (undamped).
        scales: (d_out, d_in) per-weight scale (each column's group scale).
        zeros: (d_out, d_in) per-weight integer zero point.
        maxq: 2**bits − 1.
        damp: added to diag(H) as a fraction of its mean (GPTQ's percdamp).
        block_size: columns per lazy batch update (speed only).

    Returns:
        (d_out, d_in) int64 codes in [0, maxq]; Dequant = scales·(codes − zeros).
    """
    W = weight.detach().clone().float()  # (d_out, d_in)
    H = hessian.detach().clone().float()  # (d_in, d_in)
    S, Z = scales.float().to(W.device), zeros.float().to(W.device)
    safe_S = torch.where(S == 0, torch.ones_like(S), S)
    n = W.shape[1]
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0  # an input that is never active: no feedback through it
    eye = torch.eye(n, dtype=H.dtype, device=H.device)
    for attempt in range(4):  # float32 Cholesky of a near-singular H: damp more, as GPTQ users do
        L, info = torch.linalg.cholesky_ex(H + damp * 10**attempt * torch.mean(torch.diag(H)) * eye)
        if int(info) == 0:
            break
    else:
        raise ConfigError(
            f"the layer Hessian is not positive definite even with damp {damp * 1000}; pass "
            "more calibration rows (`hessian_rows`)"
        )
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True)  # upper factor of H⁻¹
    Q = torch.zeros_like(W)
    for i1 in range(0, n, block_size):
        i2 = min(i1 + block_size, n)
        W1 = W[:, i1:i2].clone()  # (d_out, b)
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            w, d = W1[:, i], Hinv1[i, i]
            s, z = S[:, i1 + i], Z[:, i1 + i]
            q = torch.clamp(torch.round(w / safe_S[:, i1 + i] + z), 0, maxq)
            q = torch.where(s == 0, z, q)  # a zero scale: every code dequantizes to 0
            Q[:, i1 + i] = q
            err = (w - s * (q - z)) / d  # (d_out,)
            W1[:, i:] -= err[:, None] * Hinv1[i, i:][None, :]
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    return Q.long()


def round_on_grid(weight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, maxq: int):
    """Round-to-nearest onto a fixed grid (the no-feedback reference): (d_out, d_in) codes."""
    safe = torch.where(scales == 0, torch.ones_like(scales), scales)
    q = torch.clamp(torch.round(weight / safe + zeros), 0, maxq)
    return torch.where(scales == 0, zeros.to(q.dtype), q).long()


def output_error(delta: torch.Tensor, hessian: torch.Tensor) -> float:
    """‖X·Δᵀ‖_F / sqrt(n) from H = 2XᵀX/n: sqrt(tr(Δ H Δᵀ) / 2), Δ (d_out, d_in)."""
    d = delta.double()
    value = float(((d @ hessian.double()) * d).sum())  # tr(Δ H Δᵀ)
    return math.sqrt(max(value, 0.0) / 2)


# ----------------------------------------------------------------------------- Hessians


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


# ----------------------------------------------------------------------------- per unit


@dataclass(frozen=True)
class LayerMerge:
    """What the merge did to one unit, and what it cost on the unit's outputs."""

    unit: int
    name: str
    bits: int  # the run's width for the unit
    rank: int
    bits_written: int  # the width in the package (``bits``, or higher after ``upbits``)
    action: str  # merged | unmerged | merged_upbits | no_adapter | dense
    lost: float  # ‖X(W'−W*)‖ / ‖X(W*−W_hat)‖ over the unit's linears (0 when no adapter;
    # for ``unmerged`` what merging would have lost: the package keeps the adapter exactly)
    lost_rtn: float  # the same for round-to-nearest on the grid (no error feedback)
    output_error: float  # ‖X(W'−W*)‖ / ‖X W*‖: the merged unit's relative output error
    adapter_effect: float  # ‖X(W*−W_hat)‖ / ‖X W*‖: how much the adapter moves the outputs
    codes_changed: float  # fraction of codes that differ from the bank's
    flagged: bool  # lost > threshold at the width finally written

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class _Try:
    """One merge attempt of a unit at one width."""

    bits: int
    tensors: dict[str, torch.Tensor]  # checkpoint tensors (qweight new, the rest the bank's)
    lost: float
    lost_rtn: float
    output_error: float
    adapter_effect: float
    codes_changed: float
    weights: dict[str, torch.Tensor]  # {module: (d_out, d_in) W' the package computes with}


def _merge_unit(
    unit: Unit,
    bits: int,
    packed: Mapping[str, torch.Tensor],
    v1: bool,
    target: Mapping[str, torch.Tensor],
    w_hat: Mapping[str, torch.Tensor],
    hessians: Mapping[str, torch.Tensor],
    settings: MergeSettings,
    device: str = "cpu",
) -> _Try:
    """GPTQ-on-grid every linear of ``unit`` at ``bits`` (on ``device``); the unit's errors."""
    tensors = dict(packed)
    err2 = rtn2 = eff2 = ref2 = 0.0
    changed = total = 0
    weights: dict[str, torch.Tensor] = {}
    for lin in unit.linears:
        grid = GridLayout.from_packed(packed, lin.name, bits, v1)
        s = grid.scales[grid.g_idx].t().to(device)  # (d_out, d_in)
        z = grid.zeros[grid.g_idx].t().to(device)
        w_star = target[lin.name].float().to(device)  # (d_out, d_in)
        h = hessians[lin.name].to(device)
        codes = gptq_on_grid(
            w_star, h, s, z, maxq=grid.maxq, damp=settings.damp, block_size=settings.block_size
        )
        err2 += output_error(s * (codes - z) - w_star, h) ** 2
        rtn = round_on_grid(w_star, s, z, grid.maxq)
        rtn2 += output_error(s * (rtn - z) - w_star, h) ** 2
        eff2 += output_error(w_star - w_hat[lin.name].float().to(device), h) ** 2
        ref2 += output_error(w_star, h) ** 2
        codes = codes.cpu()
        tensors[f"{lin.name}.qweight"] = grid.pack(codes)
        weights[lin.name] = grid.dequantize(codes)
        changed += int((grid.codes_of(packed, lin.name) != codes).sum())  # vs the bank's codes
        total += codes.numel()
    eff = math.sqrt(eff2)
    return _Try(
        bits=bits,
        tensors=tensors,
        lost=math.sqrt(err2) / eff if eff > 0 else 0.0,
        lost_rtn=math.sqrt(rtn2) / eff if eff > 0 else 0.0,
        output_error=math.sqrt(err2 / ref2) if ref2 > 0 else 0.0,
        adapter_effect=eff / math.sqrt(ref2) if ref2 > 0 else 0.0,
        codes_changed=changed / total if total else 0.0,
        weights=weights,
    )


def merge_units(
    bank: Any,
    units: Sequence[Unit],
    config: Config,
    target: Mapping[str, torch.Tensor],
    w_hat: Mapping[str, torch.Tensor],
    hessians: Mapping[str, torch.Tensor] | Callable[[Unit], Mapping[str, torch.Tensor]],
    settings: MergeSettings,
    *,
    fits: Callable[[Config], bool] | None = None,
    device: str = "cpu",
    on_unit: Callable[[Unit, Mapping[str, torch.Tensor]], None] | None = None,
) -> tuple[dict[int, tuple[int, dict[str, torch.Tensor]]], list[LayerMerge]]:
    """Merge every quantized, adapted unit onto the bank's grid; apply ``over_threshold``.

    Args:
        bank: the run's :class:`edgeqra.bank.Bank` (``packed``, ``quantize_config``).
        units: the model's units, in config order.
        config: the run's (bits, rank) per unit.
        target: {module: (d_out, d_in) W*}: the merged dense weights (tuned model).
        w_hat: {module: (d_out, d_in) W_hat}: the bank's dequantized weights the run tuned on.
        hessians: {module: (d_in, d_in) H} (:func:`collect_hessians` on the tuned model), or
            a function of the unit giving them (:class:`LayerInputs`: GPTQ's sequential
            order, each layer's inputs through the layers merged before it).
        settings: threshold and what to do above it.
        fits: whether a config (after raising one unit's bits) fits the run's budget;
            ``upbits`` is refused for a unit where it says no (None: anything fits).
        device: where the GPTQ loops run (a GPU is much faster; float32 either way).
        on_unit: called after each unit, in order, with {module: the weight the package
            computes with} (W' where merged; W* where dense or kept unmerged).

    Returns:
        ({unit index: (bits written, checkpoint tensors)} for quantized units, per-unit report);
        16-bit units are absent from the first (their dense W* is written) and ``unmerged``
        units hold the bank's own tensors.
    """
    written: dict[int, tuple[int, dict[str, torch.Tensor]]] = {}
    report: list[LayerMerge] = []
    current = list(config)  # the config as written so far (``upbits`` raises entries)
    for pos, (unit, choice) in enumerate(zip(units, config, strict=True)):
        common = {"unit": unit.index, "name": unit.name, "bits": choice.bits, "rank": choice.rank}
        computes_with = {lin.name: target[lin.name] for lin in unit.linears}  # W*
        if choice.bits >= FP16_BITS:  # dense: W* itself is written
            report.append(LayerMerge(**common, **_EXACT, bits_written=choice.bits, action="dense"))
        elif choice.rank == 0:  # W* is W_hat: the bank's codes are the exact merge
            written[unit.index] = (choice.bits, bank.packed(unit.index, choice.bits))
            report.append(
                LayerMerge(**common, **_EXACT, bits_written=choice.bits, action="no_adapter")
            )
        else:
            h = hessians(unit) if callable(hessians) else hessians
            attempt, action = _merge_adapted(
                bank, unit, pos, choice, current, target, w_hat, h, settings, fits, device
            )
            if action == "unmerged":
                written[unit.index] = (choice.bits, bank.packed(unit.index, choice.bits))
                log.info("%s: merge would lose %.2f of the adapter; kept unmerged (base + "
                         "adapter)", unit.name, attempt.lost)  # fmt: skip
            else:
                written[unit.index] = (attempt.bits, attempt.tensors)
                computes_with = attempt.weights
            report.append(
                LayerMerge(
                    **common,
                    bits_written=attempt.bits,
                    action=action,
                    lost=attempt.lost,
                    lost_rtn=attempt.lost_rtn,
                    output_error=0.0 if action == "unmerged" else attempt.output_error,
                    adapter_effect=attempt.adapter_effect,
                    codes_changed=0.0 if action == "unmerged" else attempt.codes_changed,
                    flagged=action != "unmerged" and attempt.lost > settings.threshold,
                )
            )
        if on_unit is not None:
            on_unit(unit, computes_with)
    return written, report


_EXACT = {"lost": 0.0, "lost_rtn": 0.0, "output_error": 0.0, "adapter_effect": 0.0,
          "codes_changed": 0.0, "flagged": False}  # fmt: skip


def _merge_adapted(
    bank: Any,
    unit: Unit,
    pos: int,
    choice: Choice,
    current: list[Choice],
    target: Mapping[str, torch.Tensor],
    w_hat: Mapping[str, torch.Tensor],
    hessians: Mapping[str, torch.Tensor],
    settings: MergeSettings,
    fits: Callable[[Config], bool] | None,
    device: str,
) -> tuple[_Try, str]:
    """Merge one adapted unit; apply ``over_threshold``. Returns (attempt, action);
    ``current[pos]`` is raised in place when ``upbits`` writes a higher width."""
    v1 = _is_v1(bank.quantize_config(choice.bits))
    packed = bank.packed(unit.index, choice.bits)
    attempt = _merge_unit(unit, choice.bits, packed, v1, target, w_hat, hessians, settings, device)
    if attempt.lost <= settings.threshold or settings.over_threshold is OverThreshold.REPORT:
        return attempt, "merged"
    if settings.over_threshold is OverThreshold.UNMERGED:
        return attempt, "unmerged"
    action = "merged"
    for up in sorted(b for b in bank.spec.bits if b > choice.bits and bank.done(b)):
        trial = list(current)
        trial[pos] = Choice(up, choice.rank)
        if fits is not None and not fits(Config(tuple(trial))):
            log.info("%s: a %d-bit merge would not fit the budget", unit.name, up)
            break
        attempt = _merge_unit(
            unit, up, bank.packed(unit.index, up), _is_v1(bank.quantize_config(up)),
            target, w_hat, hessians, settings, device,
        )  # fmt: skip
        current[pos], action = trial[pos], "merged_upbits"
        if attempt.lost <= settings.threshold:
            break
    return attempt, action


def _is_v1(qcfg: Mapping[str, Any]) -> bool:
    """Whether a GPTQModel config's checkpoint stores ``zero - 1`` (GPTQ v1)."""
    fmt = str(qcfg.get("checkpoint_format") or qcfg.get("format") or "gptq").lower()
    if fmt not in {"gptq", "gptq_v2"}:
        raise ConfigError(f"bank checkpoint format {fmt!r} is not gptq/gptq_v2; rebuild the bank")
    return fmt == "gptq"
