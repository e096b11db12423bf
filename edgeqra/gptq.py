"""GPTQModel 7.6 on CPU: quantize a saved HF folder, read what it wrote, dequantize, reload.

Private helper of the bank and the memory model. Facts about GPTQModel 7.6.0 (measured, see
``tests/test_gptq.py`` and /work/shared/FINDINGS.md):

* ``GPTQModel.load`` always loads a tokenizer from the model folder, even when calibration
  is already token ids; a folder without one gets a stub WordLevel tokenizer in a staging
  copy (symlinks), which is never written to the output.
* Quantization runs in float32 here (``dtype=torch.float32``): on CPU it is ~10x faster than
  GPTQModel's bf16 default and keeps the Hessian in full precision.
* The checkpoint is GPTQ "v1" format: per linear ``qweight`` int32 (ceil(d_in*bits/32), d_out),
  ``qzeros`` int32 (ceil(d_in/gs), ceil(d_out*bits/32)) holding ``zero - 1``, ``scales`` fp16
  (ceil(d_in/gs), d_out), ``g_idx`` int32 (d_in,) [written even without desc_act], ``bias``
  fp16 (d_out,). W_hat[o, i] = scales[g_idx[i], o] * (q[i, o] - ((qz[g_idx[i], o] + 1) & maxq)).
* ``GPTQModel.load`` cannot build float32 kernels (TorchLinear only takes fp16/bf16 and the
  fp32 path selects the 4-bit-only TorchFused kernel); ``load_quantized`` loads fp16 with the
  torch kernel and upcasts the module buffers, which keeps the fp16 scales exact.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import struct
import sys
import tempfile
import types
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TextIO

import torch
from torch import nn

from edgeqra.errors import ConfigError, DataError, ModelError

__all__ = [
    "dequantized_weights",
    "dynamic_overrides",
    "gptqmodel_verbose",
    "import_gptqmodel",
    "load_quantized",
    "packed_module_bytes",
    "packed_tensors",
    "quantize_config",
    "quantize_to_checkpoint",
    "quiet_gptqmodel",
]

log = logging.getLogger(__name__)

_SUPPORTED_BITS = (2, 3, 4, 8)
_PACKED_SUFFIXES = ("qweight", "qzeros", "scales", "g_idx", "bias")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "spiece.model")
_STUB_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
_DTYPE_BYTES = {"I32": 4, "F16": 2, "BF16": 2, "F32": 4, "I64": 8, "I16": 2, "I8": 1, "U8": 1}


def dynamic_overrides(bits: Mapping[str, int]) -> dict[str, dict[str, int]]:
    """GPTQModel ``dynamic`` dict: one ``+:`` name/prefix regex per entry (``-:`` for bits 0).

    GPTQModel applies the first matching pattern, so longer (more specific) names come first
    and every entry is written, even one equal to the default width.
    """
    dynamic: dict[str, dict[str, int]] = {}
    for name in sorted(bits, key=lambda n: (-len(n), n)):
        b = bits[name]
        pattern = f"^{re.escape(name)}(\\.|$)"  # a full module name or a unit prefix
        if b == 0:
            dynamic[f"-:{pattern}"] = {}
        elif b in _SUPPORTED_BITS:
            dynamic[f"+:{pattern}"] = {"bits": b}
        else:
            raise ConfigError(
                f"`bits[{name!r}]`={b} is not supported; use one of {_SUPPORTED_BITS} (0 skips)"
            )
    return dynamic


def _normalize_calibration(
    calibration: Sequence[dict] | Sequence[str] | torch.Tensor,
) -> list[dict] | list[str]:
    """Turn a (n, seq) LongTensor or a list of rows into GPTQModel's list-of-dicts / list-of-str."""
    if isinstance(calibration, torch.Tensor):
        if calibration.ndim != 2 or calibration.dtype != torch.long:
            raise DataError(
                f"`calibration` tensor must be a (n, seq) LongTensor, got {calibration.dtype} "
                f"{tuple(calibration.shape)}"
            )
        return [{"input_ids": row.tolist()} for row in calibration]  # n rows of (seq,)
    rows = list(calibration)
    if not rows:
        raise DataError("`calibration` is empty; pass at least one sample")
    if all(isinstance(r, str) for r in rows):
        return rows
    out = []
    for r in rows:
        if isinstance(r, Mapping) and ("input_ids" in r or "text" in r):
            out.append(dict(r))
        elif isinstance(r, torch.Tensor | list | tuple):
            out.append({"input_ids": torch.as_tensor(r, dtype=torch.long).tolist()})
        else:
            raise DataError(
                f"`calibration` row of type {type(r).__name__} is not supported; use dicts with "
                "`input_ids`, strings, lists of ints, or a (n, seq) LongTensor"
            )
    return out


def _check_3bit_shapes(model_dir: Path, bits: int | Mapping[str, int], default: int) -> None:
    """Raise before GPTQModel crashes mid-run: its 3-bit packer needs d_in, d_out % 32 == 0."""
    header = _safetensors_headers(model_dir)
    for key, entry in header.items():
        if not key.endswith(".weight") or len(entry["shape"]) != 2 or ".layers." not in key:
            continue
        module = key[: -len(".weight")]
        if isinstance(bits, int):
            width = bits
        else:  # the longest matching name or unit prefix decides, as in `dynamic_overrides`
            hits = [n for n in bits if module == n or module.startswith(n + ".")]
            width = bits[max(hits, key=len)] if hits else default
        d_out, d_in = entry["shape"]
        if width == 3 and (d_in % 32 or d_out % 32):
            raise ConfigError(
                f"3-bit `{module}` has shape ({d_out}, {d_in}); GPTQModel 7.6 packs 3-bit only "
                "when both dimensions are multiples of 32: give it 2, 4 or 8 bits"
            )


def _has_tokenizer(model_dir: Path) -> bool:
    """Whether a folder holds tokenizer files that AutoTokenizer can load."""
    return any((model_dir / name).exists() for name in _TOKENIZER_FILES)


def _write_stub_tokenizer(folder: Path, vocab_size: int) -> None:
    """Save a WordLevel tokenizer over ``t0..t{vocab-1}``; GPTQModel.load insists on one."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab_size)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="t0", pad_token="t0", bos_token="t1", eos_token="t2"
    )
    fast.save_pretrained(folder)


def _staged(model_dir: Path, tmp: Path) -> Path:
    """``model_dir`` itself if it has a tokenizer, else a symlinked copy plus a stub tokenizer."""
    if _has_tokenizer(model_dir):
        return model_dir
    stage = tmp / "stage"
    stage.mkdir()
    for p in model_dir.iterdir():
        (stage / p.name).symlink_to(p.resolve())
    config = json.loads((model_dir / "config.json").read_text())
    vocab = config.get("vocab_size") or config.get("text_config", {}).get("vocab_size")
    if not vocab:
        raise ModelError(
            f"{model_dir}/config.json has no `vocab_size`; add a tokenizer to the folder"
        )
    _write_stub_tokenizer(stage, int(vocab))
    return stage


VERBOSE_ENV = "EDGEQRA_GPTQ_VERBOSE"
"""Set (to anything non-empty) to let GPTQModel print its banner, INFO lines and progress."""


def gptqmodel_verbose() -> bool:
    """Whether GPTQModel may print: ``$EDGEQRA_GPTQ_VERBOSE`` is set or edgeqra logs at DEBUG.

    The CLI's ``--verbose`` sets the root logger to DEBUG, so it turns GPTQModel's output on too.
    """
    return bool(os.environ.get(VERBOSE_ENV)) or logging.getLogger("edgeqra").isEnabledFor(
        logging.DEBUG
    )


def import_gptqmodel(verbose: bool | None = None) -> types.ModuleType:
    """Import GPTQModel (once) without its banner, ``ENV: Auto setting`` lines and GIL warning.

    Every module that touches ``gptqmodel`` (or PEFT's LoRA, which imports it) calls this
    first: the first ``import gptqmodel`` prints through its LogBar logger to stdout, and
    later imports are silent. The import still sets what it sets (``PYTORCH_ALLOC_CONF``,
    ``CUDA_DEVICE_ORDER``); only the output is dropped. Afterwards GPTQModel's logger stays
    at WARNING, so its INFO lines (kernel choices, config dumps) stay out too.

    Args:
        verbose: print as GPTQModel normally does; ``None``: :func:`gptqmodel_verbose`.
    """
    if verbose is None:
        verbose = gptqmodel_verbose()
    if "gptqmodel" not in sys.modules:
        if verbose:
            import gptqmodel  # noqa: F401
        else:
            _import_quietly()
        _release_import_frames()
    from logbar import LogBar

    LogBar.shared().setLevel(logging.INFO if verbose else logging.WARNING)
    return sys.modules["gptqmodel"]


def _release_import_frames() -> None:
    """Drop the traceback of the ImportError GPTQModel keeps for its optional llama.cpp kernel.

    GPTQModel 7.6 stores that exception at module level (``gguf_cpp._LLAMA_CPP_IMPORT_ERROR``);
    its traceback holds every frame that was on the stack at the first import, so a model in
    one of the caller's frames stayed alive for the whole process (bench/throughput.py found
    the FP16 model's 15 GiB still allocated after ``del``). The exception itself, and its
    message, are kept.
    """
    module = sys.modules.get("gptqmodel.nn_modules.qlinear.gguf_cpp")
    error = getattr(module, "_LLAMA_CPP_IMPORT_ERROR", None)
    if isinstance(error, BaseException):
        error.__traceback__ = None
        for linked in (error.__cause__, error.__context__):
            if linked is not None:
                linked.__traceback__ = None


_SINKS: dict[str, TextIO] = {}  # kept open: a handler we miss writes there, never to a closed file


def _import_quietly() -> None:
    """``import gptqmodel`` with stdout, stderr and logging up to WARNING dropped."""
    real = {"stdout": sys.stdout, "stderr": sys.stderr}
    for name in real:
        _SINKS.setdefault(name, open(os.devnull, "w"))  # noqa: SIM115 - lives as long as we do
    disabled = logging.root.manager.disable
    logging.disable(logging.WARNING)  # torch/torchao warnings from handlers made before us
    root, root_level, root_handlers = (
        logging.getLogger(),
        logging.root.level,
        logging.root.handlers[:],
    )
    try:
        with (
            contextlib.redirect_stdout(_SINKS["stdout"]),
            contextlib.redirect_stderr(_SINKS["stderr"]),
        ):
            from logbar import LogBar

            # Created here, so its opening blank line is dropped; ERROR hides the GIL
            # warning that gptqmodel.utils logs at import.
            LogBar.shared().setLevel(logging.ERROR)
            import gptqmodel  # noqa: F401
    finally:
        logging.disable(disabled)
        # tokenicer calls logging.basicConfig(level=INFO) at import: every library's INFO
        # lines would reach stderr. The root logger is the application's; put it back.
        for handler in root.handlers[:]:
            if handler not in root_handlers:
                root.removeHandler(handler)
        root.setLevel(root_level)
        # transformers, datasets, ... imported for the first time in there made their
        # handlers on the sinks (transformers also binds `flush`): give them the real streams.
        _rebind_handlers({id(_SINKS[name]): (_SINKS[name], real[name]) for name in real})


def _rebind_handlers(streams: Mapping[int, tuple[TextIO, TextIO]]) -> None:
    """Point every logging handler writing to a sink (``id -> (sink, real)``) at the real stream."""
    loggers = [logging.getLogger(), *logging.Logger.manager.loggerDict.values()]
    for logger in loggers:
        for handler in getattr(logger, "handlers", ()):
            if not isinstance(handler, logging.StreamHandler):
                continue
            if id(handler.stream) in streams:
                handler.setStream(streams[id(handler.stream)][1])
            flush = vars(handler).get("flush")
            owner = getattr(flush, "__self__", None)
            if id(owner) in streams and streams[id(owner)][0] is owner:
                handler.flush = streams[id(owner)][1].flush


@contextlib.contextmanager
def _quiet(log_path: Path | None = None) -> Iterator[None]:
    """Send GPTQModel's banner, config dumps and progress bars to a log file, not the terminal.

    Python-level only (sys.stdout / sys.stderr); rich consoles created beforehand with an
    explicit file keep drawing. Off when :func:`gptqmodel_verbose`.
    """
    import_gptqmodel()
    if gptqmodel_verbose():
        yield
        return
    target = open(log_path, "a") if log_path else open(os.devnull, "w")  # noqa: SIM115
    try:
        with contextlib.redirect_stdout(target), contextlib.redirect_stderr(target):
            yield
    finally:
        target.close()


quiet_gptqmodel = _quiet  # public name for the exporters' loads (GPTQModel logs to stdout)


def quantize_to_checkpoint(
    model_dir: Path,
    out_dir: Path,
    calibration: list[dict] | list[str] | torch.LongTensor,
    *,
    bits: int | dict[str, int],
    group_size: int,
    desc_act: bool = False,
    sym: bool = True,
    seed: int = 0,
    batch_size: int = 16,
    device: str = "cpu",
) -> Path:
    """Run GPTQModel on a saved HF folder and write its GPTQ checkpoint to ``out_dir`` atomically.

    Args:
        model_dir: HF folder (config.json + dense safetensors; tokenizer optional).
        out_dir: destination folder; must not exist yet.
        calibration: (n, seq) LongTensor, list of {"input_ids": ...} dicts, lists of ints, or
            strings (strings need a real tokenizer in ``model_dir``).
        bits: one width for all linears, or {full module name or unit prefix: bits}; modules
            not named get the most common width; 0 leaves a module unquantized.
        group_size: input features per group (-1: per channel); 2/3/4/8 and 32/64/128 tested.
        desc_act: act-order (GPTQModel stores the permutation in ``g_idx``).
        sym: symmetric quantization (zero point fixed at 2**(bits-1)).
        seed: torch seed set before quantizing.
        device: where GPTQModel runs ("cpu" or "cuda"); weights stay float32 either way.
        batch_size: calibration rows per forward pass (GPTQModel's default of 1 is ~Nx slower on CPU).
    """
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    if out_dir.exists():
        raise ConfigError(f"`out_dir` {out_dir} exists; remove it or choose another folder")
    if not (model_dir / "config.json").is_file():
        raise ModelError(f"`model_dir` {model_dir} has no config.json; pass a saved HF folder")
    if isinstance(bits, int):
        default_bits, dynamic = bits, {}
        if bits not in _SUPPORTED_BITS:
            raise ConfigError(f"`bits`={bits} is not supported; use one of {_SUPPORTED_BITS}")
    else:
        widths = [b for b in bits.values() if b]
        if not widths:
            raise ConfigError("`bits` maps every module to 0; nothing to quantize")
        default_bits = max(set(widths), key=widths.count)
        dynamic = dynamic_overrides(bits)
    _check_3bit_shapes(model_dir, bits, default_bits)
    rows = _normalize_calibration(calibration)
    if rows and isinstance(rows[0], str) and not _has_tokenizer(model_dir):
        raise DataError(
            f"`calibration` is text but {model_dir} has no tokenizer; pass token ids instead"
        )

    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")  # else "requests 2 workers" on 1-2 cores
    import_gptqmodel()
    from gptqmodel import GPTQModel, QuantizeConfig

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir.parent, prefix=f".{out_dir.name}.") as tmp:
        tmp_path = Path(tmp)
        qcfg = QuantizeConfig(
            bits=default_bits,
            group_size=group_size,
            desc_act=desc_act,
            sym=sym,
            dynamic=dynamic or None,
            # GPTQModel's default offload dir is a /tmp folder it leaves behind; keep it in ours.
            offload_to_disk_path=str(tmp_path / "offload"),
        )
        source = _staged(model_dir, tmp_path)
        torch.manual_seed(seed)
        written = tmp_path / "out"
        with _quiet(out_dir.parent / "gptqmodel.log"):
            qmodel = GPTQModel.load(str(source), qcfg, dtype=torch.float32, device=device)
            qmodel.quantize(rows, calibration_data_min_length=1, batch_size=batch_size)
            qmodel.save(str(written))
        if source is not model_dir:  # the stub tokenizer stays out of the checkpoint
            for name in _STUB_TOKENIZER_FILES:
                (written / name).unlink(missing_ok=True)
        del qmodel
        written.rename(out_dir)
    return out_dir


def _safetensors_headers(checkpoint_dir: Path) -> dict[str, dict]:
    """{tensor name: {"dtype", "shape", "data_offsets"}} over every *.safetensors in the folder."""
    entries: dict[str, dict] = {}
    files = sorted(Path(checkpoint_dir).glob("*.safetensors"))
    if not files:
        raise ModelError(f"{checkpoint_dir} holds no .safetensors; is it a GPTQ checkpoint?")
    for path in files:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
        header.pop("__metadata__", None)
        entries.update(header)
    return entries


def _quantized_prefixes(names: Sequence[str]) -> list[str]:
    """Module names that own a ``qweight`` tensor."""
    return sorted(n[: -len(".qweight")] for n in names if n.endswith(".qweight"))


def packed_module_bytes(checkpoint_dir: Path) -> dict[str, int]:
    """Bytes per quantized module (qweight, qzeros, scales, g_idx, bias) from safetensors headers."""
    header = _safetensors_headers(Path(checkpoint_dir))
    out = {}
    for prefix in _quantized_prefixes(list(header)):
        total = 0
        for suffix in _PACKED_SUFFIXES:
            entry = header.get(f"{prefix}.{suffix}")
            if entry is not None:
                start, end = entry["data_offsets"]
                total += end - start
        out[prefix] = total
    return out


def packed_tensors(checkpoint_dir: Path) -> dict[str, torch.Tensor]:
    """Every quantized module's stored tensors (qweight, qzeros, scales, g_idx, bias), by key.

    These are the exact numbers GPTQModel wrote; the bank keeps them per unit so that an
    exported base checkpoint holds what the search tuned on (no second GPTQ run).
    """
    from safetensors import safe_open

    tensors: dict[str, torch.Tensor] = {}
    for path in sorted(Path(checkpoint_dir).glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as reader:
            names = list(reader.keys())
            prefixes = set(_quantized_prefixes(names))
            for key in names:
                prefix, suffix = key.rsplit(".", 1)
                if prefix in prefixes and suffix in _PACKED_SUFFIXES:
                    tensors[key] = reader.get_tensor(key)
    return tensors


def quantize_config(checkpoint_dir: Path) -> dict:
    """The checkpoint's quantization config (quantize_config.json or config.json's entry)."""
    return _quantize_config(Path(checkpoint_dir))


def _quantize_config(checkpoint_dir: Path) -> dict:
    """The checkpoint's quantization config (quantize_config.json or config.json's entry)."""
    path = checkpoint_dir / "quantize_config.json"
    if path.is_file():
        return json.loads(path.read_text())
    cfg = json.loads((checkpoint_dir / "config.json").read_text()).get("quantization_config")
    if not cfg:
        raise ModelError(
            f"{checkpoint_dir} has no quantize_config.json; not a GPTQModel checkpoint"
        )
    return cfg


def dequantized_weights(checkpoint_dir: Path) -> dict[str, torch.Tensor]:
    """Dense float32 W_hat (d_out, d_in) per quantized linear, as GPTQModel's torch kernel sees it."""
    from safetensors import safe_open

    checkpoint_dir = Path(checkpoint_dir)
    qcfg = _quantize_config(checkpoint_dir)
    tensors: dict[str, torch.Tensor] = {}
    for path in sorted(checkpoint_dir.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as reader:
            for key in reader.keys():  # noqa: SIM118 - safe_open has no __iter__
                if key.rsplit(".", 1)[-1] in ("qweight", "qzeros", "scales", "g_idx"):
                    tensors[key] = reader.get_tensor(key)
    return dequantize_packed(tensors, qcfg)


def dequantize_packed(
    tensors: Mapping[str, torch.Tensor], qcfg: Mapping[str, object]
) -> dict[str, torch.Tensor]:
    """Dense float32 W_hat (d_out, d_in) per module from its packed GPTQ tensors, by module name.

    ``tensors`` holds ``{module}.qweight/.qzeros/.scales/.g_idx`` as a checkpoint stores them;
    ``qcfg`` is its quantization config (``bits``, ``dynamic``, ``checkpoint_format``).
    """
    import_gptqmodel()
    from gptqmodel.quantization.config import dynamic_get
    from gptqmodel.utils.model_dequant import unpack_cols, unpack_rows

    fmt = str(qcfg.get("checkpoint_format") or qcfg.get("format") or "gptq").lower()
    if fmt not in {"gptq", "gptq_v2"}:
        raise ModelError(f"checkpoint format {fmt!r} is not gptq/gptq_v2")
    out = {}
    for prefix in _quantized_prefixes(list(tensors)):
        # Per-module bits from `dynamic` (GPTQModel's own dequantize_model ignores it).
        bits = int(dynamic_get(qcfg.get("dynamic"), prefix, "bits", qcfg["bits"]))
        g_idx = tensors[f"{prefix}.g_idx"].long()  # (d_in,)
        scales = tensors[f"{prefix}.scales"].float()  # (groups, d_out)
        d_in, d_out = g_idx.numel(), scales.shape[1]
        q = unpack_rows(tensors[f"{prefix}.qweight"], bits)[:d_in]  # (d_in, d_out) codes
        z = unpack_cols(tensors[f"{prefix}.qzeros"], bits)[:, :d_out]  # (groups, d_out)
        if fmt == "gptq":
            z = (z + 1) & ((1 << bits) - 1)  # v1 stores zero - 1; the torch kernel uses v2
        w = scales[g_idx] * (q.float() - z[g_idx].float())  # (d_in, d_out)
        out[prefix] = w.t().contiguous()  # (d_out, d_in)
    return out


def load_quantized(
    checkpoint_dir: Path, device: str = "cpu", *, dtype: torch.dtype = torch.float32
) -> nn.Module:
    """Load a GPTQModel checkpoint and return the HF model inside, in ``dtype`` (fp32 by default).

    float32: loads fp16 with GPTQModel's torch kernel (TorchLinear, every bit-width) and upcasts
    (fp16 scales are exact in fp32). bf16/fp16: GPTQModel's own choice of kernels (on CPU the
    4-bit modules get TorchAtenLinear, the others TorchLinear); scales are rounded to ``dtype``.
    """
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")
    import_gptqmodel()
    from gptqmodel import BACKEND, GPTQModel

    checkpoint_dir = Path(checkpoint_dir)
    with tempfile.TemporaryDirectory(prefix="edgeqra-gptq-load-") as tmp:
        source = _staged(checkpoint_dir, Path(tmp))
        if dtype == torch.float32:
            with _quiet():  # GPTQModel prints its config dumps to stdout
                qmodel = GPTQModel.load(
                    str(source), device=device, dtype=torch.float16, backend=BACKEND.TORCH
                )
            model = qmodel.model.float()
            _restore_dense_tensors(model, checkpoint_dir)  # fp16 load rounded embeddings/norms
        elif dtype in (torch.float16, torch.bfloat16):
            with _quiet():
                model = GPTQModel.load(str(source), device=device, dtype=dtype).model
        else:
            raise ConfigError(f"`dtype`={dtype} is not supported; use float32, float16 or bfloat16")
    model.eval()
    return model


def _restore_dense_tensors(model: nn.Module, checkpoint_dir: Path) -> None:
    """Copy the checkpoint's unquantized float tensors (embeddings, norms, lm_head) in exactly."""
    from safetensors import safe_open

    state = model.state_dict()
    with torch.no_grad():
        for path in sorted(checkpoint_dir.glob("*.safetensors")):
            with safe_open(str(path), framework="pt") as reader:
                for key in reader.keys():  # noqa: SIM118 - safe_open has no __iter__
                    target = state.get(key)
                    if target is not None and target.is_floating_point():
                        target.copy_(reader.get_tensor(key))
