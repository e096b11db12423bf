"""Read a GGUF file's header without loading its weights, and check that the file is whole.

A truncated or corrupt download otherwise fails deep inside the ``gguf`` reader (a
``struct.error`` or a numpy reshape error naming no file); :func:`read_header` turns every
such case into one :class:`~edgeqra.errors.ModelError` naming the file and the problem. It is
also the cheap way to learn a GGUF model's number of decoder layers (``{arch}.block_count``).

Layout (GGUF v2/v3, ggml ``docs/gguf.md``): magic ``GGUF``, uint32 version, uint64 tensor
count, uint64 metadata count; the metadata key/values; one info per tensor (name, n_dims,
dims, ggml type, offset into the data section); padding to ``general.alignment`` (default
32); the tensor data.
"""

from __future__ import annotations

import math
import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path

from edgeqra.errors import ModelError

__all__ = ["GGUFHeader", "read_header"]

_MAGIC = b"GGUF"
_VERSIONS = (2, 3)
_DEFAULT_ALIGNMENT = 32
# GGUF metadata value types -> struct format of the scalar (8 = string, 9 = array).
_SCALARS = {
    0: "B",
    1: "b",
    2: "H",
    3: "h",
    4: "I",
    5: "i",
    6: "f",
    7: "?",
    10: "Q",
    11: "q",
    12: "d",
}
_STRING, _ARRAY = 8, 9


class _Truncated(Exception):
    """The file ended inside the header."""


class _Corrupt(Exception):
    """A header field holds an impossible value."""


@dataclass(frozen=True)
class GGUFHeader:
    """What a GGUF header says: scalar and string metadata, tensor count and the data's extent."""

    version: int
    metadata: dict[str, object]  # scalars and strings only; arrays (the vocabulary) are skipped
    n_tensors: int
    data_end: int  # byte just past the last tensor's data
    file_size: int

    @property
    def block_count(self) -> int | None:
        """Decoder layers (``{general.architecture}.block_count``), if the header says."""
        arch = self.metadata.get("general.architecture")
        value = self.metadata.get(f"{arch}.block_count")
        return value if isinstance(value, int) and not isinstance(value, bool) else None


class _Reader:
    """Little- or big-endian reads from a memory-mapped file that say where the file ended."""

    def __init__(self, data: mmap.mmap, endian: str) -> None:
        self.data, self.size, self.endian, self.pos = data, len(data), endian, 0

    def take(self, n: int) -> bytes:
        if self.pos + n > self.size:
            raise _Truncated
        self.pos += n
        return self.data[self.pos - n : self.pos]

    def scalar(self, fmt: str) -> object:
        size = struct.calcsize(fmt)
        if self.pos + size > self.size:
            raise _Truncated
        (value,) = struct.unpack_from(self.endian + fmt, self.data, self.pos)
        self.pos += size
        return value

    def skip(self, n: int) -> None:
        if self.pos + n > self.size:
            raise _Truncated
        self.pos += n

    def count(self, item_bytes: int) -> int:
        """A uint64 count of items of at least ``item_bytes`` each; more than fit is a cut file."""
        n = self.scalar("Q")
        if n * item_bytes > self.size - self.pos:
            raise _Truncated
        return n

    def string(self) -> str:
        return self.take(self.count(1)).decode("utf-8", errors="replace")

    def value(self, vtype: int) -> object:
        """One metadata value; an array is skipped and returns None."""
        if vtype in _SCALARS:
            return self.scalar(_SCALARS[vtype])
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            item_type = self.scalar("I")
            if item_type in _SCALARS:
                size = struct.calcsize(_SCALARS[item_type])
                self.skip(self.count(size) * size)
            elif item_type == _STRING:
                for _ in range(self.count(8)):
                    self.skip(self.count(1))
            else:
                raise _Corrupt(f"unknown array item type {item_type}")
            return None
        raise _Corrupt(f"unknown metadata value type {vtype}")


def _problem(path: Path, text: str) -> ModelError:
    """The one-line error every bad GGUF gets."""
    return ModelError(f"`{path}` is not a valid GGUF file ({text}); re-download it")


def read_header(path: str | Path) -> GGUFHeader:
    """Parse the header of ``path`` and check that every tensor's data is inside the file.

    Reads only the header (metadata and tensor table), never the weights. Raises
    :class:`ModelError` naming the file for an empty file, a wrong magic, an unsupported
    version, a file cut inside the header or the tensor data, or an impossible field.
    """
    path = Path(path)
    try:
        with path.open("rb") as handle:
            size = os.fstat(handle.fileno()).st_size
            if size == 0:
                raise _problem(path, "the file is empty, 0 bytes")
            with mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as data:
                return _parse(path, data)
    except OSError as exc:
        raise ModelError(
            f"cannot read GGUF file `{path}`: {exc.strerror or exc}; check its permissions"
        ) from exc


def _parse(path: Path, data: mmap.mmap) -> GGUFHeader:
    """The header of the mapped file ``data`` (see :func:`read_header`)."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    size = len(data)
    magic = data[:4]
    if size < len(_MAGIC) and _MAGIC.startswith(magic):
        raise _problem(path, f"truncated: file ends at byte {size} inside the magic")
    if magic != _MAGIC:
        raise _problem(path, f"it starts with {magic!r}, not the GGUF magic {_MAGIC!r}")
    # A big-endian file reads as a huge little-endian version (as in gguf's reader).
    endian = "<" if size < 8 or struct.unpack_from("<I", data, 4)[0] & 0xFFFF else ">"
    reader = _Reader(data, endian)
    reader.pos = 4
    where = "the fixed header"
    n_tensors = n_kv = None
    try:
        version = reader.scalar("I")
        if version not in _VERSIONS:
            raise _problem(path, f"GGUF version {version}; edgeqra reads versions 2 and 3 only")
        n_tensors = reader.count(1)
        n_kv = reader.count(1)
        metadata: dict[str, object] = {}
        for index in range(n_kv):
            where = f"the metadata (entry {index + 1} of {n_kv})"
            key = reader.string()
            metadata[key] = reader.value(reader.scalar("I"))
        extents = []
        for index in range(n_tensors):
            where = f"the tensor table (tensor {index + 1} of {n_tensors})"
            name = reader.string()
            n_dims = reader.scalar("I")
            if n_dims > 8:
                raise _Corrupt(f"tensor `{name}` has {n_dims} dimensions")
            dims = [reader.scalar("Q") for _ in range(n_dims)]
            ggml_type = reader.scalar("I")
            offset = reader.scalar("Q")
            try:
                block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(ggml_type)]
            except (ValueError, KeyError):
                raise _Corrupt(f"tensor `{name}` has unknown ggml type {ggml_type}") from None
            numel = math.prod(dims)
            if numel % block:
                raise _Corrupt(
                    f"tensor `{name}` has {numel} elements, not a multiple of its block {block}"
                )
            extents.append(offset + numel // block * type_size)
    except _Truncated:
        counts = (
            ""
            if n_tensors is None or n_kv is None
            else f"header says {n_tensors} tensors and {n_kv} metadata entries, "
        )
        raise _problem(
            path, f"truncated: {counts}file ends at byte {size:,} inside {where}"
        ) from None
    except _Corrupt as exc:
        raise _problem(path, f"corrupt: {exc} at byte {reader.pos:,}") from None
    alignment = metadata.get("general.alignment", _DEFAULT_ALIGNMENT)
    if not isinstance(alignment, int) or isinstance(alignment, bool) or alignment <= 0:
        raise _problem(path, f"corrupt: `general.alignment` is {alignment!r}")
    data_start = -(-reader.pos // alignment) * alignment
    data_end = data_start + max(extents, default=0)
    if data_end > size:
        raise _problem(
            path,
            f"truncated: header says {n_tensors} tensors whose data ends at byte {data_end:,}, "
            f"file ends at byte {size:,}",
        )
    return GGUFHeader(version, metadata, n_tensors, data_end, size)
