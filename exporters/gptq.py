"""Mixed-bit GPTQ checkpoints from a run: the merged model and the exact adapter form's base.

Two ways to ship a tuned config (issue 6):

* **merged** (:func:`merge_adapter`, :func:`write_merged_checkpoint`): per unit
  W' = Dequant(Q(W)) + (alpha/r)·B·A on the dense assembled model (PEFT's
  ``merge_and_unload`` works there; it refuses on GPTQ layers, FINDINGS.md), then GPTQ again
  at the unit's own bit-width on the run's calibration rows, through GPTQModel with a
  per-module ``dynamic`` config (16-bit units are skipped with ``-:`` and stay dense). The
  second quantization costs accuracy; the package measures how much.
* **adapter form** (:func:`write_base_checkpoint`): no merge and no second GPTQ run. The base
  checkpoint is assembled from the bank's packed tensors (the very qweight/qzeros/scales the
  search's W_hat were dequantized from), next to the run's PEFT adapter, so the pair scores
  what the run scored.

Both load with ``GPTQModel.load`` (:func:`load_checkpoint`; transformers cannot load
``dynamic`` checkpoints and mis-loads uniform ones, FINDINGS.md).
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from edgeqra.bank import Bank
from edgeqra.errors import ConfigError, ModelError
from edgeqra.gptq import (
    config_bits,
    default_bits,
    dynamic_overrides,
    import_gptqmodel,
    load_quantized,
    quantize_to_checkpoint,
    quiet_gptqmodel,
)
from edgeqra.models import Unit
from edgeqra.space import FP16_BITS, Config

__all__ = [
    "eager_torch_kernel",
    "load_adapter_form",
    "load_checkpoint",
    "merge_adapter",
    "module_bits",
    "write_base_checkpoint",
    "write_grid_checkpoint",
    "write_merged_checkpoint",
    "write_partial_adapter",
]

log = logging.getLogger(__name__)

WEIGHTS = "model.safetensors"
# The files a tokenizer folder may hold (copied as they are; the ONNX writer uses it too).
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "spiece.model",
    "chat_template.jinja",
)
_RUN_LOCAL_META = ("offload_to_disk_path",)  # temp folders of the export machine


def module_bits(quantization_config: dict[str, Any], modules: Sequence[str]) -> dict[str, int]:
    """Each module's bits as GPTQModel resolves ``dynamic`` (16 where a ``-:`` rule skips it)."""
    import_gptqmodel()
    from gptqmodel.quantization.config import dynamic_get

    dynamic = quantization_config.get("dynamic")
    out = {}
    for name in modules:
        if dynamic_get(dynamic, name) is False:  # a `-:` rule: left unquantized
            out[name] = FP16_BITS
        else:
            out[name] = int(dynamic_get(dynamic, name, "bits", quantization_config["bits"]))
    return out


def _dense_tensors(model_dir: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the dense model's safetensors files (shards included)."""
    tensors: dict[str, torch.Tensor] = {}
    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise ModelError(f"{model_dir} holds no .safetensors files; pass the run's model folder")
    for path in files:
        with safe_open(str(path), framework="pt") as reader:
            for key in reader.keys():  # noqa: SIM118 - safe_open has no __iter__
                tensors[key] = reader.get_tensor(key)
    return tensors


def _copy_side_files(model_dir: Path, dest: Path, tokenizer: Any | None) -> None:
    """Tokenizer and generation config of the source model into ``dest``."""
    model_dir = Path(model_dir)
    if tokenizer is not None:
        tokenizer.save_pretrained(dest)
    else:
        for name in TOKENIZER_FILES:
            if (model_dir / name).is_file():
                shutil.copy2(model_dir / name, dest / name)
    # GPTQModel's save "auto-fixes" generation_config (it turned do_sample on for a model
    # that had none); ship the source model's own.
    if (model_dir / "generation_config.json").is_file():
        shutil.copy2(model_dir / "generation_config.json", dest / "generation_config.json")


def _clean_quantize_config(qcfg: dict[str, Any]) -> dict[str, Any]:
    """Drop the export machine's temp paths from GPTQModel's ``meta``."""
    qcfg = json.loads(json.dumps(qcfg))
    meta = qcfg.get("meta")
    if isinstance(meta, dict):
        for key in _RUN_LOCAL_META:
            meta.pop(key, None)
    return qcfg


def _write_quantization_config(model_dir: Path, dest: Path, qcfg: dict[str, Any]) -> None:
    """config.json (the model's, plus ``quantization_config``) and quantize_config.json."""
    config = json.loads((Path(model_dir) / "config.json").read_text())
    config["quantization_config"] = qcfg
    (dest / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    (dest / "quantize_config.json").write_text(json.dumps(qcfg, indent=2, sort_keys=True) + "\n")


def write_base_checkpoint(
    bank: Bank,
    model_dir: Path,
    units: Sequence[Unit],
    config: Config,
    dest: Path,
    *,
    tokenizer: Any | None = None,
) -> Path:
    """Write the mixed-bit GPTQ checkpoint of ``config`` from the bank, without running GPTQ.

    Each quantized unit gets the packed tensors GPTQModel wrote when the bank was built at
    that unit's width; 16-bit units, embeddings, norms and the head are the dense model's
    tensors. The quantization config is the bank's with one ``dynamic`` rule per unit.

    Args:
        bank: the run's bank (``Prepared.bank``), holding every width the config uses.
        model_dir: the dense model folder the bank was built from (``LoadedModel.path``).
        units: the model's units, in config order.
        config: one (bits, rank) per unit; ranks are ignored here.
        dest: an existing, empty folder.
        tokenizer: saved into ``dest`` (default: the tokenizer files of ``model_dir``).
    """
    packed = {
        u.index: (c.bits, bank.packed(u.index, c.bits))
        for u, c in zip(units, config, strict=True)
        if c.bits < FP16_BITS
    }
    return write_grid_checkpoint(bank, model_dir, units, packed, {}, dest, tokenizer=tokenizer)


def write_grid_checkpoint(
    bank: Bank,
    model_dir: Path,
    units: Sequence[Unit],
    packed: Mapping[int, tuple[int, Mapping[str, torch.Tensor]]],
    dense: Mapping[str, torch.Tensor],
    dest: Path,
    *,
    tokenizer: Any | None = None,
) -> Path:
    """A GPTQModel checkpoint from per-unit packed tensors on the bank's grids (no GPTQ run).

    Args:
        bank: the bank whose quantize configs (format, group size, sym) the tensors follow.
        model_dir: the dense model folder (every tensor not replaced comes from it).
        units: the model's units, in config order.
        packed: {unit index: (bits, checkpoint tensors by key)}; units not in it stay dense.
        dense: {module name: (d_out, d_in) weight} replacing a dense unit's linear weights
            (a 16-bit unit's merged W*); the others keep the model folder's.
        dest: an existing, empty folder.
        tokenizer: saved into ``dest`` (default: the tokenizer files of ``model_dir``).
    """
    bits = {u.name: packed[u.index][0] if u.index in packed else 0 for u in units}
    default = default_bits(bits)
    settings = {b: bank.quantize_config(b) for b in set(bits.values()) if b}
    shared = ("group_size", "sym", "desc_act", "checkpoint_format", "pack_dtype")
    for key in shared:  # one checkpoint has one value of these; the bank spec guarantees it
        values = {json.dumps(s.get(key)) for s in settings.values()}
        if len(values) > 1:
            raise ConfigError(f"bank bit-widths disagree on `{key}` ({values}); rebuild the bank")
    qcfg = dict(settings[default])
    qcfg["bits"] = default
    qcfg["dynamic"] = dynamic_overrides(bits)
    qcfg = _clean_quantize_config(qcfg)

    tensors = _dense_tensors(model_dir)
    for unit in units:
        if unit.index not in packed:
            for lin in unit.linears:
                if lin.name in dense:
                    key = f"{lin.name}.weight"
                    tensors[key] = dense[lin.name].to(tensors[key].dtype).contiguous()
            continue
        for lin in unit.linears:
            tensors.pop(f"{lin.name}.weight")
            tensors.pop(f"{lin.name}.bias", None)  # GPTQModel stores it (fp16) with the codes
        tensors.update(packed[unit.index][1])
    dest = Path(dest)
    save_file(tensors, str(dest / WEIGHTS), metadata={"format": "pt"})
    _write_quantization_config(model_dir, dest, qcfg)
    _copy_side_files(model_dir, dest, tokenizer)
    return dest


def write_partial_adapter(adapter_dir: Path, modules: Sequence[str], dest: Path) -> Path:
    """The run's PEFT adapter restricted to ``modules`` (the units kept unmerged), into ``dest``.

    ``target_modules`` becomes a full-match regex of exactly those names (as edgeqra.tune
    writes it); ``rank_pattern`` / ``alpha_pattern`` keep their per-module entries.
    """
    import re

    from safetensors.torch import load_file

    adapter_dir, dest = Path(adapter_dir), Path(dest)
    if not modules:
        raise ConfigError("no module to keep unmerged; write no adapter")
    dest.mkdir(parents=True, exist_ok=False)
    cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    cfg["target_modules"] = "(?:" + "|".join(re.escape(m) for m in sorted(modules)) + ")"
    cfg["base_model_name_or_path"] = ".."  # the checkpoint this adapter sits in
    (dest / "adapter_config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    weights = load_file(str(adapter_dir / "adapter_model.safetensors"))
    keep = tuple(f".{m}.lora_" for m in modules)
    kept = {k: v for k, v in weights.items() if any(p in k for p in keep)}
    save_file(kept, str(dest / "adapter_model.safetensors"), metadata={"format": "pt"})
    return dest


@torch.no_grad()
def merge_adapter(model: nn.Module, adapter_dir: Path | None) -> nn.Module:
    """W' = W + (alpha/r)·B·A in every adapted linear of a dense model, in place (PEFT's merge).

    ``model`` is the dense assembled model (``Bank.assemble``); ``adapter_dir`` None (every
    rank 0) leaves it unchanged.
    """
    if adapter_dir is None:
        return model
    import_gptqmodel()
    from peft import PeftModel

    peft_model = PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=False)
    return peft_model.merge_and_unload().eval()


def write_merged_checkpoint(
    model: nn.Module,
    model_dir: Path,
    units: Sequence[Unit],
    config: Config,
    calibration: torch.Tensor,
    dest: Path,
    *,
    group_size: int,
    seed: int = 0,
    device: str = "cpu",
    tokenizer: Any | None = None,
) -> Path:
    """GPTQ the merged dense ``model`` again at each unit's width; write the checkpoint to ``dest``.

    Args:
        model: the dense model with adapters merged (:func:`merge_adapter`), float32.
        model_dir: the source model folder (config, tokenizer, generation config).
        units: the model's units, in config order.
        config: one (bits, rank) per unit; 16-bit units are left dense (``-:``).
        calibration: (n, seq) token ids: the bank's calibration rows.
        dest: an existing, empty folder.
        group_size: GPTQ group size (the bank's).
        seed: torch seed GPTQModel runs under.
        device: where GPTQModel runs.
        tokenizer: saved into ``dest`` (default: the tokenizer files of ``model_dir``).
    """
    bits = config_bits(units, config)
    default_bits(bits)  # a clear error when nothing is quantized, before the save
    dest = Path(dest)
    with tempfile.TemporaryDirectory(dir=dest.parent, prefix=f".{dest.name}.merge-") as tmp:
        dense = Path(tmp) / "dense"
        model.save_pretrained(dense, safe_serialization=True)
        _copy_side_files(model_dir, dense, tokenizer)
        written = quantize_to_checkpoint(
            dense,
            Path(tmp) / "gptq",
            calibration,
            bits=bits,
            group_size=group_size,
            seed=seed,
            device=device,
        )
        qcfg = _clean_quantize_config(json.loads((written / "quantize_config.json").read_text()))
        for path in written.iterdir():
            if path.suffix == ".safetensors" or path.name == "quant_log.csv":
                shutil.move(str(path), dest / path.name)
        _write_quantization_config(dense, dest, qcfg)
        _copy_side_files(model_dir, dest, tokenizer)
    return dest


UNMERGED_ADAPTER = "adapter"  # a merged package's subfolder: the units kept unmerged


@contextlib.contextmanager
def eager_torch_kernel(enabled: bool = True) -> Iterator[None]:
    """Load GPTQModel's ``TorchLinear`` without ``torch.compile`` of its dequantization.

    Why (issue 21): ``TorchLinear.post_init`` compiles each module's bound
    ``dequantize_weight``; dynamo guards on the module (and on the ``qzeros.data_ptr()``
    that ``_stream_decode_qzeros`` compares to its cache key), so every linear recompiles the
    same code object: one inductor compile per module until GPTQModel's raised
    ``cache_size_limit`` (128) is hit, then one recompile warning per further module. In eval
    the kernel caches the dequantized weight after the first call, so eager costs nothing
    per token; skipping the compiles removes the warnings and most of the reload time.
    """
    if not enabled:
        yield
        return
    import_gptqmodel()
    from gptqmodel.nn_modules.qlinear.torch import TorchLinear

    original = TorchLinear.optimize

    def optimize(self, backend=None, mode=None, fullgraph=False):  # noqa: ARG001 - same signature
        self.optimized = True  # what BaseQuantLinear.optimize records, without compiling

    TorchLinear.optimize = optimize
    try:
        yield
    finally:
        TorchLinear.optimize = original


def load_checkpoint(path: Path, device: str = "cpu", *, compile_kernels: bool = False) -> nn.Module:
    """A GPTQ checkpoint folder as a float32 HF model (GPTQModel's torch kernel, quietly).

    ``compile_kernels`` False (default) loads the torch kernel eagerly (:func:`eager_torch_kernel`).
    A merged package whose merge kept some units unmerged holds their adapter in
    ``adapter/``: it is applied on top (PEFT, not merged), so the package loads as base + adapter.
    """
    with quiet_gptqmodel(), eager_torch_kernel(not compile_kernels):
        model = load_quantized(Path(path), device=device)
    partial = Path(path) / UNMERGED_ADAPTER
    if (partial / "adapter_config.json").is_file():
        import_gptqmodel()
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(partial), is_trainable=False).eval()
    return model


def load_adapter_form(base: Path, adapter: Path | None, device: str = "cpu") -> nn.Module:
    """The adapter form: GPTQ base through GPTQModel, the PEFT adapter on top (not merged)."""
    model = load_checkpoint(base, device)
    if adapter is None:
        return model
    import_gptqmodel()
    from peft import PeftModel

    return PeftModel.from_pretrained(model, str(adapter), is_trainable=False).eval()
