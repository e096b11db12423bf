"""The quantization bank: every unit's GPTQ result at every bit-width, built once, cached.

The search evaluates hundreds of configs; GPTQ must never run inside that loop. So for a
(model, calibration data, bit set Q, group size) the bank quantizes the whole model uniformly
at every width in Q with GPTQModel, dequantizes what it packed, and keeps each unit's dense
W_hat per bit-width on disk (safetensors). ``assemble(model, config)`` then copies the right
tensors into a dense model in well under a second. Beside each W_hat the bank keeps the packed
tensors GPTQModel wrote for the unit (qweight, qzeros, scales, g_idx), so the adapter-form
export can write a mixed-bit checkpoint holding exactly the numbers the search tuned on
(``packed``, ``quantize_config``).

Two builds (``BankSpec.hessian``), same files:

* ``"shared"`` (default): one forward pass of the unquantized model collects each linear's
  Hessian once, and GPTQModel's GPTQ core quantizes every width from it
  (``edgeqra.gptq.shared_hessian``). Every layer is quantized on unquantized inputs, which is
  also exactly what a mixed config cannot promise anyway (see below). About the cost of one
  GPTQModel run for all widths (``bench/bank_speed.py``).
* ``"sequential"``: one GPTQModel run per width (its default loop: each layer sees the
  outputs of the layers already quantized at that width).

Approximation, stated: a bank entry for unit l was quantized on inputs that went through
earlier layers either unquantized ("shared") or at the same width ("sequential"); in a mixed
config they have other widths. This is the price of never running GPTQ per candidate
(QR-Adaptor does the same); the exporter re-runs GPTQ with the real mixed config for the
final checkpoint.

Resume: a bit-width whose entries are complete is marked done and skipped by a later build,
so an interrupted build loses at most the bit-width it was running (a shared build: the pass).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from enum import Enum
from pathlib import Path

import torch
from filelock import FileLock
from safetensors.torch import load_file, save_file
from torch import nn

from edgeqra.errors import ConfigError
from edgeqra.gptq import import_gptqmodel
from edgeqra.models import Unit
from edgeqra.space import DEFAULT_BITS, FP16_BITS, Config

__all__ = ["Bank", "BankSpec", "HessianSource", "bank_key", "build_bank", "model_digest"]

log = logging.getLogger(__name__)

# On-disk layout version, part of the cache key: 2 added the packed tensors per unit, so a
# layout-1 bank (W_hat only) is never mistaken for one the exporters can read.
_LAYOUT = 2


class HessianSource(str, Enum):
    """Which inputs each layer's GPTQ Hessian is collected on (module docstring)."""

    SHARED = "shared"  # the unquantized model's, once for every width
    SEQUENTIAL = "sequential"  # the already-quantized earlier layers', once per width


def _default_hessian() -> HessianSource:
    """``$EDGEQRA_BANK_HESSIAN`` (``shared`` or ``sequential``), else shared.

    An environment default so that a whole run (driver and workers alike) can switch to the
    slower, better-at-2/3-bit sequential bank without a job setting.
    """
    value = os.environ.get("EDGEQRA_BANK_HESSIAN", HessianSource.SHARED.value)
    try:
        return HessianSource(value)
    except ValueError:
        raise ConfigError(
            f"$EDGEQRA_BANK_HESSIAN={value!r} must be one of {[h.value for h in HessianSource]}"
        ) from None


@dataclass(frozen=True)
class BankSpec:
    """What a bank depends on besides the model weights and the calibration tokens."""

    bits: tuple[int, ...] = DEFAULT_BITS
    group_size: int = 64
    desc_act: bool = False
    sym: bool = True
    seed: int = 0
    hessian: HessianSource = field(default_factory=_default_hessian)

    def __post_init__(self) -> None:
        bad = [b for b in self.bits if b not in DEFAULT_BITS]
        if not self.bits or bad:
            raise ConfigError(f"bank `bits` {list(self.bits)} may only hold 2, 3, 4, 8")
        if self.group_size != -1 and self.group_size <= 0:
            raise ConfigError(f"`group_size` must be positive or -1, got {self.group_size}")
        try:
            hessian = HessianSource(self.hessian)
        except ValueError:
            raise ConfigError(
                f"bank `hessian` {self.hessian!r} must be one of {[h.value for h in HessianSource]}"
            ) from None
        object.__setattr__(self, "bits", tuple(sorted(set(self.bits))))
        object.__setattr__(self, "hessian", hessian)


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
    import_gptqmodel()
    import gptqmodel

    digest = hashlib.sha256()
    digest.update(_weights_digest(model_dir).encode())
    digest.update(calibration.to(torch.int64).contiguous().numpy().tobytes())
    options = {k: v for k, v in asdict(spec).items() if k not in ("bits", "hessian")}
    options["layout"] = _LAYOUT
    if spec.hessian is not HessianSource.SEQUENTIAL:  # sequential banks keep their old keys
        options["hessian"] = spec.hessian.value
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
        spec: bit set, group size, GPTQ options and the Hessian source (default shared;
            ``$EDGEQRA_BANK_HESSIAN=sequential`` or ``BankSpec(hessian="sequential")``).
        cache_root: folder holding banks (default ``models.cache_dir() / "banks"``).
        keep_checkpoints: also keep a GPTQModel checkpoint per bit-width (tests, export): the
            one GPTQModel wrote (sequential), or one written from the bank's packed tensors.
        progress: show a rich progress bar.
        device: where GPTQ runs ("cuda" is much faster; entries are the same format).
        on_bits_done: called with (bits, seconds) after each bit-width is built; in a shared
            build every width finishes together and ``seconds`` is the whole pass's.
    """
    from edgeqra.models import cache_dir

    model_dir = Path(model_dir)
    root = Path(cache_root or cache_dir() / "banks") / bank_key(model_dir, calibration, spec)
    bank = Bank(root, units, spec)
    if bank.complete:
        log.info("bank cache hit: %s", root)
        return bank
    root.mkdir(parents=True, exist_ok=True)
    # Searches sharing a machine (and a cache) may ask for one bank at once: unlocked, each
    # built it and wrote the same files (issue 20: eight benchmark workers on one H200). One
    # builds; the others wait here and find it done.
    with FileLock(root / ".lock"):
        todo = [b for b in spec.bits if not bank.done(b)]
        if not todo:
            log.info("bank built by another process: %s", root)
            return bank
        _build_missing(bank, model_dir, calibration, todo, keep_checkpoints, progress, device,
                       on_bits_done)  # fmt: skip
    return bank


def _build_missing(
    bank: Bank,
    model_dir: Path,
    calibration: torch.Tensor,
    todo: list[int],
    keep_checkpoints: bool,
    progress: bool,
    device: str,
    on_bits_done: Callable[[int, float], None] | None,
) -> None:
    """Write ``bank.json`` and build the bit-widths in ``todo`` (the caller holds the lock)."""
    root, spec = bank.root, bank.spec
    (root / "bank.json").write_text(
        json.dumps(
            {
                "model_dir": str(model_dir),
                "spec": asdict(spec),
                "calibration_shape": list(calibration.shape),
                "units": len(bank.units),
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
        build = _build_shared if spec.hessian is HessianSource.SHARED else _build_sequential
        build(
            bank, model_dir, calibration, todo, bar,
            keep_checkpoints=keep_checkpoints, device=device, on_bits_done=on_bits_done,
        )  # fmt: skip


def _write_unit(
    bank: Bank, bits: int, unit: Unit, weights: dict[str, torch.Tensor], packed: dict
) -> None:
    """One unit's W_hat and packed tensors at ``bits``, as :class:`Bank` reads them."""
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


def _build_shared(
    bank: Bank,
    model_dir: Path,
    calibration: torch.Tensor,
    todo: list[int],
    bar,
    *,
    keep_checkpoints: bool,
    device: str,
    on_bits_done: Callable[[int, float], None] | None,
) -> None:
    """Every width in ``todo`` from one Hessian per linear (``edgeqra.gptq.shared_hessian``)."""
    import_gptqmodel()
    from gptqmodel import QuantizeConfig

    from edgeqra.gptq import dequantize_packed
    from edgeqra.gptq.shared_hessian import quantize_shared_hessian, saved_quantize_config

    spec = bank.spec
    start = time.perf_counter()
    task = bar.add_task(
        f"GPTQ {'/'.join(map(str, todo))}-bit, shared Hessians (units)", total=len(bank.units)
    )
    qcfgs = {}
    for bits in todo:
        folder = bank.root / f"b{bits}"
        shutil.rmtree(folder, ignore_errors=True)  # a half-written bit-width starts over
        folder.mkdir()
        qcfgs[bits] = saved_quantize_config(
            QuantizeConfig(
                bits=bits,
                group_size=spec.group_size,
                desc_act=spec.desc_act,
                sym=spec.sym,
                offload_to_disk_path=str(bank.root / "offload"),  # never written; not saved
            )
        )
    for position, per_bits in quantize_shared_hessian(
        model_dir,
        calibration,
        [(unit.name, [lin.name for lin in unit.linears]) for unit in bank.units],
        bits=todo,
        group_size=spec.group_size,
        desc_act=spec.desc_act,
        sym=spec.sym,
        seed=spec.seed,
        device=device,
    ):
        unit = bank.units[position]
        for bits, packed in per_bits.items():
            _write_unit(bank, bits, unit, dequantize_packed(packed, qcfgs[bits]), packed)
        bar.advance(task)
    seconds = time.perf_counter() - start
    for bits in todo:
        folder = bank.root / f"b{bits}"
        (folder / "quantize_config.json").write_text(json.dumps(qcfgs[bits], indent=2))
        (folder / "DONE").write_text(f"{seconds:.1f}\n")
        if keep_checkpoints:
            _write_checkpoint(bank, model_dir, bits, bank.root / f"checkpoint-b{bits}")
    log.info("bank %s-bit built in %.1f s (shared Hessians)", "/".join(map(str, todo)), seconds)
    for bits in todo:
        if on_bits_done is not None:
            on_bits_done(bits, seconds)


def _write_checkpoint(bank: Bank, model_dir: Path, bits: int, dest: Path) -> None:
    """A uniform ``bits`` GPTQ checkpoint (GPTQModel loads it) of the bank's packed tensors."""
    from safetensors import safe_open

    shutil.rmtree(dest, ignore_errors=True)
    tensors: dict[str, torch.Tensor] = {}
    for path in sorted(Path(model_dir).glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as reader:
            for key in reader.keys():  # noqa: SIM118 - safe_open has no __iter__
                tensors[key] = reader.get_tensor(key)
    for unit in bank.units:
        for lin in unit.linears:
            tensors.pop(f"{lin.name}.weight")
            tensors.pop(f"{lin.name}.bias", None)  # GPTQModel stores it (fp16) with the codes
        tensors.update(bank.packed(unit.index, bits))
    dest.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(dest / "model.safetensors"))
    qcfg = bank.quantize_config(bits)
    config = json.loads((Path(model_dir) / "config.json").read_text())
    config["quantization_config"] = qcfg
    (dest / "config.json").write_text(json.dumps(config, indent=2))
    (dest / "quantize_config.json").write_text(json.dumps(qcfg, indent=2))
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (Path(model_dir) / name).is_file():
            shutil.copy2(Path(model_dir) / name, dest / name)


def _build_sequential(
    bank: Bank,
    model_dir: Path,
    calibration: torch.Tensor,
    todo: list[int],
    bar,
    *,
    keep_checkpoints: bool,
    device: str,
    on_bits_done: Callable[[int, float], None] | None,
) -> None:
    """One GPTQModel run per width in ``todo`` (its sequential loop), read back into the bank."""
    from edgeqra import gptq

    spec, root = bank.spec, bank.root
    task = bar.add_task("GPTQ bank", total=len(spec.bits), completed=len(spec.bits) - len(todo))
    for bits in todo:
        bar.update(task, description=f"GPTQ {bits}-bit ({len(bank.units)} units)")
        start = time.perf_counter()
        folder = root / f"b{bits}"
        shutil.rmtree(folder, ignore_errors=True)  # a half-written bit-width starts over
        checkpoint = root / f"checkpoint-b{bits}"
        shutil.rmtree(checkpoint, ignore_errors=True)
        gptq.quantize_to_checkpoint(
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
        weights = gptq.dequantized_weights(checkpoint)
        packed = gptq.packed_tensors(checkpoint)
        folder.mkdir()
        qcfg = gptq.quantize_config(checkpoint)
        qcfg.get("meta", {}).pop("offload_to_disk_path", None)  # a temp folder, now gone
        (folder / "quantize_config.json").write_text(json.dumps(qcfg, indent=2))
        for unit in bank.units:
            _write_unit(bank, bits, unit, weights, packed)
        (folder / "DONE").write_text(f"{time.perf_counter() - start:.1f}\n")
        if not keep_checkpoints:
            shutil.rmtree(checkpoint, ignore_errors=True)
        seconds = time.perf_counter() - start
        log.info("bank %d-bit built in %.1f s", bits, seconds)
        if on_bits_done is not None:
            on_bits_done(bits, seconds)
        bar.advance(task)
