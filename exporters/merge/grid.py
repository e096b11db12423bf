"""One linear's merge onto a fixed GPTQ grid: GPTQ's error feedback with the grid held fixed.

Pure functions of tensors: the bank's scales, zero points and groups stay; only the integer
codes of W* = W_hat + (alpha/r)·B·A are chosen, column by column, over the layer's Hessian.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from edgeqra.errors import ConfigError
from edgeqra.gptq import import_gptqmodel

__all__ = ["GridLayout", "gptq_on_grid", "output_error", "round_on_grid"]


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
