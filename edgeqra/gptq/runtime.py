"""GPTQModel as a quiet dependency: imported without its banner, run with its output in a log.

Every module that touches ``gptqmodel`` (quantizing, loading, packing, PEFT's LoRA) goes
through :func:`import_gptqmodel` first; the loads and the quantizer run inside
:func:`quiet_gptqmodel`. ``GPTQModel.load`` always loads a tokenizer from the model folder,
even when calibration is already token ids, so :func:`staged` gives a folder without one a
stub WordLevel tokenizer in a staging copy (symlinks) that is never written to an output.
One module for both, because the quantizer and the loaders all need them.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import types
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TextIO

from edgeqra.errors import ModelError

__all__ = [
    "STUB_TOKENIZER_FILES",
    "VERBOSE_ENV",
    "gptqmodel_verbose",
    "has_tokenizer",
    "import_gptqmodel",
    "quiet_gptqmodel",
    "staged",
]

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "spiece.model")
STUB_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
"""The files :func:`staged` writes for its stub tokenizer (dropped again from outputs)."""

VERBOSE_ENV = "EDGEQRA_GPTQ_VERBOSE"
"""Set (to anything non-empty) to let GPTQModel print its banner, INFO lines and progress."""


def has_tokenizer(model_dir: Path) -> bool:
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


def staged(model_dir: Path, tmp: Path) -> Path:
    """``model_dir`` itself if it has a tokenizer, else a symlinked copy plus a stub tokenizer.

    Args:
        model_dir: an HF folder (config.json + safetensors), GPTQ or dense.
        tmp: an existing scratch folder that outlives the load; the copy goes in ``tmp/stage``.
    """
    if has_tokenizer(model_dir):
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
def quiet_gptqmodel(log_path: Path | None = None) -> Iterator[None]:
    """Send GPTQModel's banner, config dumps and progress bars to a log file, not the terminal.

    Python-level only (sys.stdout / sys.stderr); rich consoles created beforehand with an
    explicit file keep drawing. Off when :func:`gptqmodel_verbose`.

    Args:
        log_path: appended to; ``None`` drops the output.
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
