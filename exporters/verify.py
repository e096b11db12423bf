"""``edgeqra verify``: re-hash a package's files, then re-run its logit parity probe."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from edgeqra.exporters.files import MANIFEST, PackageError, package_files, sha256
from edgeqra.exporters.probe import package_logits

from edgeqra.rundir import read_json

__all__ = ["Check", "VerifyReport", "verify_package"]


@dataclass(frozen=True)
class Check:
    """One verification check."""

    name: str
    ok: bool
    detail: str


@dataclass(frozen=True)
class VerifyReport:
    """All checks of one package; ``ok`` when every one passed."""

    path: Path
    format: str
    checks: tuple[Check, ...]

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)

    def failures(self) -> list[Check]:
        return [c for c in self.checks if not c.ok]


def verify_package(path: Path, *, parity: bool = True) -> VerifyReport:
    """Re-hash every file against the manifest, then re-run the logit parity probe.

    A missing, changed or unlisted file fails naming the file (and the probe is skipped:
    the weights are not the exported ones). The probe reloads the package with its format's
    loader and compares the logits at the stored vocab ids with the stored reference:
    ``|got - ref| <= atol + rtol·|ref|`` (manifest ``parity.atol`` / ``parity.rtol``), and
    the arg-max token at every position must agree.
    """
    root = Path(path)
    if not (root / MANIFEST).is_file():
        raise PackageError(f"`{root}` has no {MANIFEST}; pass a folder `edgeqra export` wrote")
    manifest = read_json(root / MANIFEST)
    listed = manifest.get("files") or {}
    checks: list[Check] = []
    for rel, want in sorted(listed.items()):
        file = root / rel
        if not file.is_file():
            checks.append(Check(f"file {rel}", False, "missing"))
            continue
        got = sha256(file)
        ok = got == want["sha256"]
        detail = "sha256 ok" if ok else f"sha256 {got[:12]}… != manifest {want['sha256'][:12]}…"
        checks.append(Check(f"file {rel}", ok, detail))
    for file in package_files(root):
        rel = file.relative_to(root).as_posix()
        if rel not in listed:
            checks.append(Check(f"file {rel}", False, "not listed in the manifest"))
    fmt = manifest.get("format", "?")
    if not parity:
        return VerifyReport(root, fmt, tuple(checks))
    if not all(c.ok for c in checks):
        checks.append(Check("parity", False, "skipped: the files are not the exported ones"))
        return VerifyReport(root, fmt, tuple(checks))
    probe = manifest["parity"]
    ids = torch.tensor(probe["input_ids"], dtype=torch.long)  # (1, seq)
    ref = torch.tensor(probe["reference"], dtype=torch.float32)  # (seq, k)
    try:
        logits = package_logits(root, fmt, ids)  # (seq, vocab)
    except Exception as exc:  # noqa: BLE001 - any load failure is a failed check, reported
        checks.append(Check("parity", False, f"cannot load with its loader: {exc}"))
        return VerifyReport(root, fmt, tuple(checks))
    got = logits[:, probe["vocab_ids"]]
    excess = float(((got - ref).abs() - probe["atol"] - probe["rtol"] * ref.abs()).max())
    diff = float((got - ref).abs().max())
    same_argmax = logits.argmax(-1).tolist() == probe["argmax"]
    ok = excess <= 0 and same_argmax
    detail = (
        f"max |Δlogit| {diff:.2e} (tolerance {probe['atol']:g} + {probe['rtol']:g}·|ref|) "
        f"over {ids.shape[1]} tokens × {len(probe['vocab_ids'])} vocab ids via "
        f"{probe['loader']}; arg-max {'same' if same_argmax else 'DIFFERENT'}"
    )
    checks.append(Check("parity", ok, detail))
    return VerifyReport(root, fmt, tuple(checks))
