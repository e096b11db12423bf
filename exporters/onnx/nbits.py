"""MatMulNBits storage of GPTQ linears: packing, the per-linear plan, and its byte report.

Pure functions of numpy arrays (no graph, no model): GPTQ integers, scales and zero points go
into onnxruntime's ``MatMulNBits`` initializers with their values unchanged. Layout
(onnxruntime 1.32 contrib op spec and ``matmul_nbits_quantizer.py``):

* ``B`` uint8 (N, k_blocks, block_size * bits / 8), codes packed low bits first along K;
* ``scales`` (N, k_blocks) in A's dtype (float32 here: the fp16 GPTQ scales upcast exactly);
* ``zero_points`` uint8 (N, ceil(k_blocks * bits / 8)), packed the same way as ``B``;
* ``block_size`` a power of two >= 16; ``bits`` per node. The CPU kernel takes 2, 4 and 8.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

import numpy as np

from edgeqra.errors import ConfigError

__all__ = [
    "LOW_BIT_STORAGE",
    "ORT_BITS",
    "THREE_BIT_STORAGE",
    "EightBit",
    "LinearPlan",
    "PackedLinear",
    "block_size_for",
    "nbits_bytes",
    "pack_matmul_nbits",
    "plan_linear",
    "split_eight_bit",
    "storage_line",
    "storage_report",
    "three_bit_info",
]

ORT_BITS = (2, 4, 8)  # what the onnxruntime CPU kernel of MatMulNBits executes
THREE_BIT_STORAGE = 4
LOW_BIT_STORAGE = 4  # 2- and 3-bit codes run in the 4-bit kernel (the only fast fp32 one)


class EightBit(str, Enum):
    """How 8-bit linears are stored (measured per kernel in bench/onnx_speed.py)."""

    SPLIT = "split"  # q = 16·hi + lo: two 4-bit MatMulNBits (scales 16s, s) + Add; lossless
    FLOAT32 = "float32"  # the dequantized weight as a float32 MatMul initializer; lossless, 4 B/w
    NATIVE = "native"  # one 8-bit MatMulNBits (a slow fallback kernel on CPU at level 0)


@dataclass(frozen=True)
class PackedLinear:
    """One GPTQ linear in MatMulNBits layout (K = d_in, N = d_out)."""

    name: str
    bits_requested: int  # the checkpoint's width for this module
    bits_stored: int  # the MatMulNBits ``bits`` attribute
    group_size: int  # GPTQ group (d_in for per-channel)
    block_size: int  # MatMulNBits block, a power of two dividing the group
    k: int
    n: int
    b: np.ndarray  # (N, k_blocks, block_size * bits / 8) uint8
    scales: np.ndarray  # (N, k_blocks) float32
    zero_points: np.ndarray  # (N, ceil(k_blocks * bits / 8)) uint8

    def dequantized(self) -> np.ndarray:
        """The float32 weight (N, K) that onnxruntime computes with: (code - zero) * scale."""
        codes = _unpack_low_first(self.b.reshape(self.n, -1), self.bits_stored)[:, : self.k]
        k_blocks = self.scales.shape[1]
        zeros = _unpack_low_first(self.zero_points, self.bits_stored)[:, :k_blocks]
        block = np.arange(self.k) // self.block_size  # (K,) block of each input feature
        return self.scales[:, block] * (codes.astype(np.float32) - zeros[:, block])


def _pack_low_first(values: np.ndarray, bits: int) -> np.ndarray:
    """Pack (rows, cols) ints < 2**bits into (rows, ceil(cols * bits / 8)) uint8, low bits first.

    The order MatMulNBits reads ``B`` and ``zero_points`` in: value j of a byte sits at bit
    ``j * bits`` (onnxruntime's ``pack_on_row_fast_248bit`` does the same along K).
    """
    per_byte = 8 // bits
    rows, cols = values.shape
    pad = -cols % per_byte
    v = np.pad(values.astype(np.uint8), ((0, 0), (0, pad)))  # (rows, cols + pad)
    v = v.reshape(rows, -1, per_byte)  # (rows, bytes, per_byte)
    shifts = (np.arange(per_byte, dtype=np.uint8) * bits).astype(np.uint8)
    return np.bitwise_or.reduce(v << shifts, axis=-1).astype(np.uint8)  # (rows, bytes)


def _unpack_low_first(packed: np.ndarray, bits: int) -> np.ndarray:
    """Inverse of :func:`_pack_low_first`: (rows, bytes) uint8 -> (rows, bytes * 8 / bits)."""
    per_byte = 8 // bits
    shifts = (np.arange(per_byte, dtype=np.uint8) * bits).astype(np.uint8)
    out = (packed[..., None] >> shifts) & np.uint8((1 << bits) - 1)  # (rows, bytes, per_byte)
    return out.reshape(packed.shape[0], -1)


def block_size_for(group_size: int, name: str = "module") -> int:
    """Largest power of two dividing the GPTQ group, capped at 128; MatMulNBits needs >= 16.

    A block inside one group gets that group's scale and zero point, so any power-of-two
    divisor of the group is lossless; per-channel groups (the whole of K) take 128.
    """
    if group_size <= 0:
        raise ConfigError(f"`group_size`={group_size} of `{name}` must be positive")
    block = min(group_size & -group_size, 128)  # lowest set bit = largest power-of-two divisor
    if block < 16:
        raise ConfigError(
            f"`group_size`={group_size} of `{name}` has no power-of-two divisor >= 16, which "
            "onnxruntime's MatMulNBits needs as its block_size; re-quantize with group size "
            "32, 64 or 128"
        )
    return block


def pack_matmul_nbits(
    name: str,
    codes: np.ndarray,
    zeros: np.ndarray,
    scales: np.ndarray,
    *,
    bits: int,
    group_size: int,
    stored_bits: int | None = None,
) -> PackedLinear:
    """GPTQ integers -> MatMulNBits initializers, values unchanged.

    Args:
        codes: (K, N) integer codes in [0, 2**bits), GPTQ's (d_in, d_out) orientation.
        zeros: (groups, N) true zero points (already v1-corrected).
        scales: (groups, N) float scales (fp16 in the checkpoint; stored as float32).
        bits: the checkpoint's width; 2 and 3 are stored at 4 bits by default.
        group_size: input features per group, sequential (group of feature i is i // group).
        stored_bits: the MatMulNBits width (>= ``bits``; 2, 4 or 8); default 4 for 2/3 bits.
    """
    k, n = codes.shape
    if bits not in (2, 3, 4, 8):
        raise ConfigError(
            f"`{name}` has {bits}-bit weights; the ONNX export handles 2, 3, 4 and 8 bits"
        )
    stored = stored_bits or (LOW_BIT_STORAGE if bits in (2, 3) else bits)
    if stored < bits or stored not in ORT_BITS:
        raise ConfigError(f"`stored_bits`={stored} for {bits}-bit `{name}`; use one of {ORT_BITS}")
    if group_size >= k:  # one group per column (per-channel): any block size shares its scale
        block = min(128, max(16, 1 << (k - 1).bit_length()))
    else:
        block = block_size_for(group_size, name)
    k_blocks = -(-k // block)
    group_of_block = (np.arange(k_blocks) * block) // group_size  # (k_blocks,)
    padded = np.zeros((k_blocks * block, n), dtype=np.uint8)  # (K padded, N); pad codes = 0
    padded[:k] = codes
    b = _pack_low_first(padded.T, stored).reshape(n, k_blocks, block * stored // 8)
    scales_nb = np.ascontiguousarray(np.asarray(scales, np.float32)[group_of_block].T)
    zeros_nb = np.asarray(zeros)[group_of_block].T  # (N, k_blocks)
    return PackedLinear(
        name=name,
        bits_requested=bits,
        bits_stored=stored,
        group_size=group_size,
        block_size=block,
        k=k,
        n=n,
        b=b,
        scales=scales_nb,
        zero_points=_pack_low_first(zeros_nb, stored),
    )


def split_eight_bit(
    name: str, codes: np.ndarray, zeros: np.ndarray, scales: np.ndarray, *, group_size: int
) -> tuple[PackedLinear, PackedLinear]:
    """An 8-bit linear as two 4-bit MatMulNBits whose outputs add up to the 8-bit one.

    q = 16·hi + lo and z = 16·zh + zl give s·(q − z) = 16s·(hi − zh) + s·(lo − zl): both parts
    and their sum are exact in float32 (an fp16 scale times an integer below 2**8 needs 19
    mantissa bits), so the weights are the GPTQ ones; only the summation order differs.
    Args as :func:`pack_matmul_nbits` (codes (K, N), zeros and scales (groups, N)).
    """
    codes, zeros = np.asarray(codes), np.asarray(zeros)
    scales = np.asarray(scales, np.float32)
    hi = pack_matmul_nbits(name, codes >> 4, zeros >> 4, 16 * scales, bits=4, group_size=group_size)
    lo = pack_matmul_nbits(name, codes & 15, zeros & 15, scales, bits=4, group_size=group_size)
    return hi, lo


def nbits_bytes(k: int, n: int, block: int, bits: int) -> int:
    """Bytes of one MatMulNBits' B, float32 scales and zero points (K, N, block, stored bits)."""
    k_blocks = -(-k // block)
    return n * k_blocks * block * bits // 8 + n * k_blocks * 4 + n * -(-k_blocks * bits // 8)


@dataclass(frozen=True)
class LinearPlan:
    """How one GPTQ linear is stored in the graph: MatMulNBits part(s) or a float MatMul."""

    name: str
    bits_requested: int
    storage: str  # "nbits" (one node), "split" (two 4-bit nodes + Add), "float32" (MatMul)
    parts: tuple[PackedLinear, ...]  # () for float32
    group_size: int
    k: int
    n: int

    @property
    def bytes(self) -> int:
        """Bytes this choice stores for the weight (initializers)."""
        if self.storage == EightBit.FLOAT32.value:
            return self.k * self.n * 4
        return sum(int(p.b.nbytes + p.scales.nbytes + p.zero_points.nbytes) for p in self.parts)

    def alternatives(self) -> dict[str, int]:
        """Bytes of each storage this linear could have had (for the export's size report)."""
        block = block_size_for(self.group_size, self.name) if self.group_size < self.k else 128
        out = {
            f"nbits{self.bits_requested}": nbits_bytes(self.k, self.n, block, self.bits_requested)
        }
        if self.bits_requested in (2, 3):
            out["nbits4"] = nbits_bytes(self.k, self.n, block, 4)
        if self.bits_requested == 8:
            out["split"] = 2 * nbits_bytes(self.k, self.n, block, 4)
            out["float32"] = self.k * self.n * 4
        if self.bits_requested == 3:
            out.pop("nbits3")  # not run by onnxruntime
        return out

    def dequantized(self) -> np.ndarray | None:
        """(N, K) float32 weight the stored parts compute with (None for a float MatMul)."""
        if not self.parts:
            return None
        out = self.parts[0].dequantized()
        for part in self.parts[1:]:
            out = out + part.dequantized()
        return out


def plan_linear(
    name: str,
    codes: np.ndarray,
    zeros: np.ndarray,
    scales: np.ndarray,
    *,
    bits: int,
    group_size: int,
    eight_bit: EightBit = EightBit.SPLIT,
    two_bit_storage: int = LOW_BIT_STORAGE,
) -> LinearPlan:
    """The storage of one GPTQ linear: 2/3/4 bits as 4-bit MatMulNBits, 8 bits per ``eight_bit``.

    Args as :func:`pack_matmul_nbits`; ``two_bit_storage`` 2 keeps 2-bit codes in the
    (slow on CPU) 2-bit kernel, for comparison.
    """
    k, n = np.asarray(codes).shape
    common = {"name": name, "bits_requested": bits, "group_size": group_size, "k": k, "n": n}
    if bits == 8 and eight_bit is EightBit.SPLIT:
        parts = split_eight_bit(name, codes, zeros, scales, group_size=group_size)
        return LinearPlan(storage="split", parts=parts, **common)
    if bits == 8 and eight_bit is EightBit.FLOAT32:
        return LinearPlan(storage="float32", parts=(), **common)
    stored = two_bit_storage if bits == 2 else None
    part = pack_matmul_nbits(
        name, codes, zeros, scales, bits=bits, group_size=group_size, stored_bits=stored
    )
    return LinearPlan(storage="nbits", parts=(part,), **common)


# --- the byte report ---------------------------------------------------------------------


def three_bit_info(plans: dict[str, LinearPlan]) -> dict:
    """How 3-bit units are stored and what it costs over a 3-bit packing."""
    three = [p.parts[0] for p in plans.values() if p.bits_requested == 3]
    extra = sum(p.b.nbytes + p.zero_points.nbytes for p in three) - sum(
        -(-p.b.nbytes * 3 // 4) + -(-p.zero_points.nbytes * 3 // 4) for p in three
    )
    return {
        "modules": len(three),
        "stored_bits": THREE_BIT_STORAGE,
        "lossless": True,
        "extra_bytes": int(extra),
        "note": (
            "onnxruntime's MatMulNBits CPU kernel runs 2, 4 and 8 bits, not 3: 3-bit codes "
            "(0..7) are stored at 4 bits with the same scales and zero points, so the weights "
            "are unchanged and B takes K*N/8 more bytes per 3-bit module"
        ),
    }


def storage_report(plans: dict[str, LinearPlan], lora: dict | None = None) -> dict:
    """Per requested width: how it is stored, its bytes, and what every alternative would cost.

    ``lora`` (:func:`lora_storage`, units kept unmerged) adds a ``"lora"`` row last: the
    adapters' float32 A and B of those modules, on top of their MatMulNBits base.
    """
    out: dict[str, dict] = {}
    for plan in plans.values():
        row = out.setdefault(str(plan.bits_requested), {
            "storage": set(), "modules": 0, "bytes": 0, "alternatives": {}})  # fmt: skip
        row["storage"].add(plan.storage if plan.storage != "nbits" else
                           f"nbits{plan.parts[0].bits_stored}")  # fmt: skip
        row["modules"] += 1
        row["bytes"] += plan.bytes
        for key, value in plan.alternatives().items():
            row["alternatives"][key] = row["alternatives"].get(key, 0) + value
    for row in out.values():
        row["storage"] = "+".join(sorted(row["storage"]))
    report = dict(sorted(out.items(), key=lambda kv: int(kv[0])))
    if lora:
        report["lora"] = {"storage": f"{lora['dtype']} MatMul A and B", "dtype": lora["dtype"],
                          "modules": lora["modules"], "bytes": lora["bytes"],
                          "alternatives": {}}  # fmt: skip
    return report


def storage_line(report: dict, embedding: dict | None = None) -> str:
    """One printable line: bytes per width as stored, with the alternatives' bytes."""
    mib = 1 / 2**20
    parts = []
    for bits, row in report.items():
        if bits == "lora":  # the unmerged units' adapters, beside their quantized base
            parts.append(f"lora ({row['dtype']}) x{row['modules']} {row['bytes'] * mib:.1f} MiB")
            continue
        alts = ", ".join(f"{k} {v * mib:.1f}" for k, v in row["alternatives"].items())
        parts.append(f"{bits}-bit x{row['modules']} as {row['storage']} {row['bytes'] * mib:.1f} "
                     f"MiB ({alts})")  # fmt: skip
    if embedding:
        parts.append(f"embedding {embedding['dtype']} {embedding['bytes'] * mib:.1f} MiB "
                     f"(float32 {embedding['bytes_float32'] * mib:.1f})")  # fmt: skip
    return "ONNX weights: " + "; ".join(parts)
