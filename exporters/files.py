"""A package folder's files: sha256 per file, atomic staging and commit, the .tar.gz archive.

An export writes into a staging folder next to the target and renames it into place only
when everything is written and checked (``os.replace``): an interrupted export leaves no
partial output. ``verify`` re-hashes what :func:`file_hashes` recorded.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tarfile
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from edgeqra.errors import EdgeQRAError

__all__ = [
    "MANIFEST",
    "PackageError",
    "archive_path",
    "commit",
    "default_out",
    "file_hashes",
    "package_files",
    "sha256",
    "staging_dir",
    "write_archive",
]

MANIFEST = "manifest.json"


class PackageError(EdgeQRAError):
    """A run directory or package is incomplete, exists already, or fails verification."""


def default_out(run_dir: Path, fmt: str) -> Path:
    """Where a format's package goes by default: ``RUN_DIR/export-FORMAT``."""
    return Path(run_dir) / f"export-{fmt}"


def archive_path(out: Path) -> Path:
    """Where ``--archive`` writes the package's .tar.gz: beside it, ``NAME.tar.gz``."""
    return out.with_name(f"{out.name}.tar.gz")


def sha256(path: Path) -> str:
    """Hex sha256 of a file, read in 4 MiB blocks."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def package_files(root: Path) -> list[Path]:
    """Every regular file under ``root`` except the manifest, sorted by relative path."""
    return sorted(
        p for p in root.rglob("*") if p.is_file() and p.relative_to(root).as_posix() != MANIFEST
    )


def file_hashes(root: Path) -> dict[str, dict[str, object]]:
    """{relative path: {"sha256", "bytes"}} for every file of a package but the manifest."""
    return {
        p.relative_to(root).as_posix(): {"sha256": sha256(p), "bytes": p.stat().st_size}
        for p in package_files(root)
    }


@contextmanager
def staging_dir(out: Path) -> Iterator[Path]:
    """An empty folder next to ``out``; removed on any error, so nothing partial is left."""
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    try:
        yield stage
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise


def commit(stage: Path, out: Path) -> None:
    """Move the finished staging folder to ``out`` (an existing one is replaced, --force)."""
    if not out.exists():
        os.replace(stage, out)
        return
    old = out.with_name(f".{out.name}.old-{os.getpid()}")
    os.replace(out, old)
    try:
        os.replace(stage, out)
    except BaseException:
        os.replace(old, out)
        raise
    if old.is_dir():
        shutil.rmtree(old, ignore_errors=True)
    else:
        old.unlink(missing_ok=True)


def write_archive(out: Path) -> Path:
    """``out``.tar.gz beside the package, written to a temp file and renamed."""
    target = archive_path(out)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{target.name}.", suffix=".tmp")
    os.close(fd)
    try:
        with tarfile.open(tmp, "w:gz") as tar:
            tar.add(out, arcname=out.name)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target
