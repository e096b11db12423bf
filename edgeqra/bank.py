"""The quantization bank: every unit's GPTQ result at every bit-width, built once, cached.

The search evaluates hundreds of configs; GPTQ must never run inside that loop. So for a
(model, calibration data, bit set Q, group size) the bank runs GPTQModel once per bit-width
(the whole model uniformly at that width), dequantizes what GPTQModel wrote, and keeps each
unit's dense W_hat per bit-width on disk (safetensors). ``assemble(model, config)`` then
copies the right tensors into a dense model in well under a second. Beside each W_hat the
bank keeps the packed tensors GPTQModel wrote for the unit (qweight, qzeros, scales, g_idx),
so the adapter-form export can write a mixed-bit checkpoint holding exactly the numbers the
search tuned on (``packed``, ``quantize_config``).

Approximation, stated: GPTQ quantizes layers in order, each on inputs that already went
through the quantized earlier layers. A bank entry for unit l at b bits saw earlier layers at
b bits too; in a mixed config they may have other widths. This is the price of never running
GPTQ per candidate (QR-Adaptor does the same); the exporter re-runs GPTQ with the real mixed
config for the final checkpoint.

Resume: a bit-width whose entries are complete is marked done and skipped by a later build,
so an interrupted build loses at most the bit-width it was running.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from edgeqra.errors import ConfigError
from edgeqra.models import Unit
from edgeqra.space import DEFAULT_BITS, FP16_BITS, Config

__all__ = ["Bank", "BankSpec", "bank_key", "build_bank", "model_digest"]

log = logging.getLogger(__name__)

# On-disk layout version, part of the cache key: 2 added the packed tensors per unit, so a
# layout-1 bank (W_hat only) is never mistaken for one the exporters can read.
_LAYOUT = 2


@dataclass(frozen=True)
class BankSpec:
    """What a bank depends on besides the model weights and the calibration tokens."""

    bits: tuple[int, ...] = DEFAULT_BITS
    group_size: int = 64
    desc_act: bool = False
    sym: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        bad = [b for b in self.bits if b not in DEFAULT_BITS]
        if not self.bits or bad:
            raise ConfigError(f"bank `bits` {list(self.bits)} may only hold 2, 3, 4, 8")
        if self.group_size != -1 and self.group_size <= 0:
            raise ConfigError(f"`group_size` must be positive or -1, got {self.group_size}")
        object.__setattr__(self, "bits", tuple(sorted(set(self.bits))))


def _weights_digest(model_dir: Path) -> str:
    """sha256 over the model's config and safetensors files (names, sizes and bytes)."""
    digest = hashlib.sha256()
    for path in sorted(model_dir.glob("*.safetensors")) + [model_dir / "config.json"]:
        digest.update(path.name.encode())
        with path.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 22), b""):
                digest.update(block)
    return digest.hexdigest()


def model_digest(model_dir: Path) -> str:
    """sha256 of a dense model folder as the bank keys it (config.json + safetensors)."""
    return _weights_digest(Path(model_dir))


def bank_key(model_dir: Path, calibration: torch.Tensor, spec: BankSpec) -> str:
    """Cache key: hash of model files, calibration token ids, group size and GPTQ options.

    The bit set is not in the key: each bit-width is its own sub-folder, so a bank built for
    {4} is reused and extended by a later build for {2, 3, 4, 8}.
    """
    import gptqmodel

    digest = hashlib.sha256()
    digest.update(_weights_digest(model_dir).encode())
    digest.update(calibration.to(torch.int64).contiguous().numpy().tobytes())
    options = {k: v for k, v in asdict(spec).items() if k != "bits"}
    options["layout"] = _LAYOUT
    digest.update(json.dumps(options, sort_keys=True).encode())
    digest.update(getattr(gptqmodel, "__version__", "?").encode())
    return digest.hexdigest()[:20]


class Bank:
    """Dequantized GPTQ weights per (unit, bits) in a cache folder, plus assemble()."""

    def __init__(self, root: Path, units: tuple[Unit, ...], spec: BankSpec) -> None:
        self.root = Path(root)
        self.units = units
        self.spec = spec
        self._entries: dict[tuple[int, int], dict[str, torch.Tensor]] = {}
        self._originals: dict[int, dict[str, torch.Tensor]] = {}

    def _unit_file(self, bits: int, index: int) -> Path:
        """Where one unit's tensors at one bit-width live."""
        return self.root / f"b{bits}" / f"unit{index:04d}.safetensors"

    def _packed_file(self, bits: int, index: int) -> Path:
        """Where one unit's packed GPTQ tensors at one bit-width live."""
        return self.root / f"b{bits}" / f"unit{index:04d}.packed.safetensors"

    def packed(self, index: int, bits: int) -> dict[str, torch.Tensor]:
        """Unit ``index``'s GPTQ tensors at ``bits`` as GPTQModel wrote them, by checkpoint key.

        Keys are ``{module}.qweight`` / ``.qzeros`` / ``.scales`` / ``.g_idx`` (and ``.bias``).
        """
        self.entry(index, bits)  # the same "is it built" check and message
        return load_file(str(self._packed_file(bits, index)))

    def quantize_config(self, bits: int) -> dict[str, object]:
        """GPTQModel's quantization config of the ``bits`` checkpoint (format, sym, group size…)."""
        self.entry(0, bits)
        return json.loads((self.root / f"b{bits}" / "quantize_config.json").read_text())

    def done(self, bits: int) -> bool:
        """Whether every unit's entry at ``bits`` is on disk."""
        return (self.root / f"b{bits}" / "DONE").is_file()

    @property
    def complete(self) -> bool:
        """Whether every bit-width of the spec is built."""
        return all(self.done(b) for b in self.spec.bits)

    def entry(self, index: int, bits: int) -> dict[str, torch.Tensor]:
        """Dequantized (d_out, d_in) float32 weights of unit ``index`` at ``bits``, by module name."""
        key = (index, bits)
        if key not in self._entries:
            if bits not in self.spec.bits or not self.done(bits):
                raise ConfigError(
                    f"bit-width {bits} is not in this bank (built: "
                    f"{[b for b in self.spec.bits if self.done(b)]}); rebuild the bank with it"
                )
            self._entries[key] = load_file(str(self._unit_file(bits, index)))
        return self._entries[key]

    def remember_originals(self, model: nn.Module) -> None:
        """Keep the unquantized unit weights so that bits=16 units can be restored exactly."""
        for unit in self.units:
            self._originals[unit.index] = {
                lin.name: model.get_submodule(lin.name).weight.detach().clone()
                for lin in unit.linears
            }

    @torch.no_grad()
    def assemble(self, model: nn.Module, config: Config) -> nn.Module:
        """Set every unit's linear weights to the bank's entries for ``config``, in place.

        Units at 16 bits get their original weights back (call :meth:`remember_originals`
        once on the unquantized model first). Assembling again fully overwrites the previous
        config, so one model object serves every evaluation.
        """
        if len(config) != len(self.units):
            raise ConfigError(
                f"config has {len(config)} units but the model has {len(self.units)}; "
                f"give one `bits/rank` per decoder layer"
            )
        for unit, choice in zip(self.units, config, strict=True):
            if choice.bits >= FP16_BITS:
                if unit.index not in self._originals:
                    raise ConfigError(
                        "a 16-bit unit needs the original weights: call "
                        "`bank.remember_originals(model)` on the unquantized model first"
                    )
                source = self._originals[unit.index]
            else:
                source = self.entry(unit.index, choice.bits)
            for lin in unit.linears:
                weight = model.get_submodule(lin.name).weight
                weight.copy_(source[lin.name].to(weight.dtype))
        return model

    def manifest(self) -> dict[str, object]:
        """What this bank was built from (written as bank.json)."""
        path = self.root / "bank.json"
        return json.loads(path.read_text()) if path.is_file() else {}


def build_bank(
    model_dir: Path,
    units: tuple[Unit, ...],
    calibration: torch.Tensor,
    spec: BankSpec = BankSpec(),
    *,
    cache_root: Path | None = None,
    keep_checkpoints: bool = False,
    progress: bool = True,
    device: str = "cpu",
    on_bits_done: Callable[[int, float], None] | None = None,
) -> Bank:
    """Build (or reuse, or resume) the bank for a dense model folder and calibration tokens.

    Args:
        model_dir: dense HF folder of the model (``LoadedModel.path``).
        units: the model's units (``LoadedModel.units``).
        calibration: (n_samples, seq_len) token ids (``data.calibration_batches``).
        spec: bit set, group size and GPTQ options.
        cache_root: folder holding banks (default ``models.cache_dir() / "banks"``).
        keep_checkpoints: also keep GPTQModel's checkpoint per bit-width (tests, export).
        progress: show a rich progress bar over bit-widths.
        device: where GPTQModel runs ("cuda" is much faster; entries are the same format).
        on_bits_done: called with (bits, seconds) after each bit-width is built.
    """
    from edgeqra.gptq import (
        dequantized_weights,
        packed_tensors,
        quantize_config,
        quantize_to_checkpoint,
    )
    from edgeqra.models import cache_dir

    model_dir = Path(model_dir)
    root = Path(cache_root or cache_dir() / "banks") / bank_key(model_dir, calibration, spec)
    bank = Bank(root, units, spec)
    todo = [b for b in spec.bits if not bank.done(b)]
    if not todo:
        log.info("bank cache hit: %s", root)
        return bank
    root.mkdir(parents=True, exist_ok=True)
    (root / "bank.json").write_text(
        json.dumps(
            {
                "model_dir": str(model_dir),
                "spec": asdict(spec),
                "calibration_shape": list(calibration.shape),
                "units": len(units),
            },
            indent=2,
        )
    )
    import sys

    from rich.console import Console
    from rich.progress import Progress, TimeElapsedColumn

    # The console holds stderr itself: GPTQModel's own output is redirected meanwhile.
    console = Console(file=sys.stderr)
    with Progress(
        *Progress.get_default_columns(),
        TimeElapsedColumn(),
        console=console,
        disable=not progress,
        transient=True,
    ) as bar:
        task = bar.add_task("GPTQ bank", total=len(spec.bits), completed=len(spec.bits) - len(todo))
        for bits in todo:
            bar.update(task, description=f"GPTQ {bits}-bit ({len(units)} units)")
            start = time.perf_counter()
            folder = root / f"b{bits}"
            shutil.rmtree(folder, ignore_errors=True)  # a half-written bit-width starts over
            checkpoint = root / f"checkpoint-b{bits}"
            shutil.rmtree(checkpoint, ignore_errors=True)
            quantize_to_checkpoint(
                model_dir,
                checkpoint,
                calibration,
                bits=bits,
                group_size=spec.group_size,
                desc_act=spec.desc_act,
                sym=spec.sym,
                seed=spec.seed,
                device=device,
            )
            weights = dequantized_weights(checkpoint)
            packed = packed_tensors(checkpoint)
            folder.mkdir()
            qcfg = quantize_config(checkpoint)
            qcfg.get("meta", {}).pop("offload_to_disk_path", None)  # a temp folder, now gone
            (folder / "quantize_config.json").write_text(json.dumps(qcfg, indent=2))
            for unit in units:
                missing = [lin.name for lin in unit.linears if lin.name not in weights]
                if missing:
                    raise ConfigError(f"GPTQModel did not quantize {missing}; cannot bank them")
                save_file(
                    {lin.name: weights[lin.name] for lin in unit.linears},
                    str(bank._unit_file(bits, unit.index)),
                )
                prefixes = tuple(f"{lin.name}." for lin in unit.linears)
                save_file(
                    {k: v for k, v in packed.items() if k.startswith(prefixes)},
                    str(bank._packed_file(bits, unit.index)),
                )
            (folder / "DONE").write_text(f"{time.perf_counter() - start:.1f}\n")
            if not keep_checkpoints:
                shutil.rmtree(checkpoint, ignore_errors=True)
            seconds = time.perf_counter() - start
            log.info("bank %d-bit built in %.1f s", bits, seconds)
            if on_bits_done is not None:
                on_bits_done(bits, seconds)
            bar.advance(task)
    return bank
