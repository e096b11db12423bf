"""``write_onnx``: a GPTQ checkpoint to an onnxruntime folder, checked before and after.

Before writing, every planned MatMulNBits must dequantize to the checkpoint's own W_hat bit
for bit; after, onnxruntime's logits are compared with the float twin's on a fixed input
(full sequence and one cached step). The returned info goes into the package manifest.
"""

from __future__ import annotations

import importlib.metadata
import logging
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from edgeqra.exporters.gptq import TOKENIZER_FILES
from edgeqra.exporters.onnx.genai import (
    DATA_FILE,
    GENAI_CONFIG,
    MODEL_FILE,
    genai_config,
    per_layer_io,
)
from edgeqra.exporters.onnx.graph import (
    EMBEDDING_DTYPES,
    MS_DOMAIN,
    embedding_to,
    export_float,
    lora_storage,
    swap_matmuls,
)
from edgeqra.exporters.onnx.nbits import (
    LOW_BIT_STORAGE,
    EightBit,
    storage_line,
    storage_report,
    three_bit_info,
)
from edgeqra.exporters.onnx.runtime import empty_cache, onnx_logits, ort_session, run_step
from edgeqra.exporters.onnx.weights import float_model, gptq_modules, lora_summary
from torch import nn

from edgeqra.errors import ConfigError, ModelError

__all__ = ["PARITY_SEED", "PARITY_SHAPE", "write_onnx"]

log = logging.getLogger(__name__)

PARITY_SEED = 0
PARITY_SHAPE = (2, 16)  # (batch, seq) of the fixed parity input
_SIDE_FILES = (*TOKENIZER_FILES, "generation_config.json")  # copied next to model.onnx


def _version(dist: str) -> str:
    """Installed version of a distribution ("unknown" if absent)."""
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _parity(dest: Path, model: nn.Module) -> dict:
    """max |Δlogits| of onnxruntime vs the float torch model on a fixed seeded input."""
    g = torch.Generator().manual_seed(PARITY_SEED)
    ids = torch.randint(0, model.config.vocab_size, PARITY_SHAPE, generator=g)
    with torch.no_grad():
        ref = model(ids, use_cache=False).logits  # (batch, seq, vocab)
        ref_next = model(torch.cat([ids, ids[:, :1]], 1), use_cache=False).logits[:, -1]
    got = onnx_logits(dest, ids.numpy())
    # One cached decode step: prefill, then feed ids[:, 0] again as the next token.
    sess = ort_session(dest)
    empty = empty_cache(sess, ids.shape[0])
    mask = np.ones(ids.shape, dtype=np.int64)
    _, k, v = run_step(sess, ids.numpy(), mask, empty, empty)
    nxt = run_step(
        sess, ids[:, :1].numpy(), np.ones((ids.shape[0], ids.shape[1] + 1), np.int64), k, v
    )[0][:, -1]
    return {
        "max_abs_dlogits": float(np.abs(got - ref.numpy()).max()),
        "max_abs_dlogits_cached_step": float(np.abs(nxt - ref_next.numpy()).max()),
        "max_abs_logit": float(ref.abs().max()),
        "input_shape": list(PARITY_SHAPE),
        "seed": PARITY_SEED,
        "reference": "torch float32 model of config.json with the dequantized GPTQ weights"
        " (+ the package's unmerged PEFT adapter, if any)",
    }


def write_onnx(
    gptq_dir: Path,
    dest: Path,
    *,
    progress: bool = True,
    accuracy_level: int = 0,
    eight_bit: EightBit | str = EightBit.SPLIT,
    embedding_dtype: str = "float16",
    cache_io: str = "genai",
    two_bit_storage: int = LOW_BIT_STORAGE,
) -> dict:
    """Export a GPTQModel checkpoint to ``dest/model.onnx`` (+ ``model.onnx.data``) and tokenizer.

    ``dest`` must exist and be empty (the packager writes into a temp dir and renames it).
    Returns JSON-ready info for the manifest: per-node stored vs requested bits, the 3-bit
    storage choice and its byte cost, block sizes, opset, versions, the onnxruntime-vs-torch
    max |Δlogits| on a fixed input, and the file list.

    ``accuracy_level`` is MatMulNBits' compute type for the activations: 0 (default) computes
    in float32; 4 lets onnxruntime quantize A to int8 per block (faster on CPUs with int8 dot
    products, small extra error, measured by the parity check). The weights are the same.

    Storage (every choice keeps the GPTQ weights exactly): 2- and 3-bit codes in 4-bit
    MatMulNBits (onnxruntime's fast kernel); 8-bit per ``eight_bit`` (``split``: two 4-bit
    nodes, 8-bit bytes, about 2x the 4-bit time; ``float32``: a float MatMul, 4 bytes per
    weight, the fastest; ``native``: 8-bit MatMulNBits, slow on CPU). The token embedding
    (tied: also lm_head) is stored once in ``embedding_dtype`` (float16 by default; int8:
    per-row symmetric codes, half the bytes again; the rounding is reported, and the parity
    reference holds the same table).

    ``cache_io`` ``genai`` (default) names the cache per layer as onnxruntime-genai and
    Optimum do (``past_key_values.{i}.key`` → ``present.{i}.key``) and writes
    ``genai_config.json``; ``stacked`` keeps edgeqra's (layers, ...) ``past_keys`` tensors.
    :func:`onnx_logits` / :func:`greedy_generate` run either. ``two_bit_storage`` 2 keeps
    2-bit codes in the 2-bit kernel (the slow layout before issue 21, for comparison).

    A package whose merge kept units unmerged (``gptq_dir/adapter/``, a PEFT adapter) keeps
    them so: their LoRA branch y += s·(x Aᵀ) Bᵀ is traced from PEFT's own layers (eval) as two
    float32 MatMuls, a Mul and an Add beside the MatMulNBits base; the info's ``lora`` (and
    the storage report's ``lora`` row) counts their bytes, the parity reference includes them.
    """
    import onnx_ir as ir
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    gptq_dir, dest = Path(gptq_dir), Path(dest)
    if not (gptq_dir / "config.json").is_file():
        raise ModelError(f"`gptq_dir` {gptq_dir} has no config.json; pass a GPTQ checkpoint")
    if accuracy_level not in (0, 1, 4):
        raise ConfigError(
            f"`accuracy_level`={accuracy_level} is not supported; use 0 or 1 (float32) or 4 (int8)"
        )
    if not dest.is_dir() or any(dest.iterdir()):
        raise ConfigError(f"`dest` {dest} must be an existing empty folder")
    try:
        eight_bit = EightBit(eight_bit)
    except ValueError:
        raise ConfigError(
            f"`eight_bit`={eight_bit!r} is unknown; use one of {[e.value for e in EightBit]}"
        ) from None
    if cache_io not in ("genai", "stacked"):
        raise ConfigError(f"`cache_io`={cache_io!r} is unknown; use `genai` or `stacked`")
    if embedding_dtype not in EMBEDDING_DTYPES:
        raise ConfigError(
            f"`embedding_dtype`={embedding_dtype!r} is unknown; use one of {EMBEDDING_DTYPES}"
        )

    steps = [
        "read and re-pack the GPTQ integers",
        "build the float torch model (dequantized GPTQ weights, unmerged LoRA)",
        "torch.onnx.export (dynamo, KV cache)",
        "swap MatMul -> MatMulNBits",
        "save model.onnx + external data",
        "onnxruntime parity check",
    ]
    started = time.perf_counter()
    with Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        TimeElapsedColumn(),
        disable=not progress,
        transient=True,
    ) as bar:
        task = bar.add_task(steps[0], total=len(steps))

        def advance(i: int) -> None:
            bar.update(task, advance=1, description=steps[i] if i < len(steps) else "done")
            log.info("onnx export: %s", steps[i - 1])

        if two_bit_storage not in (2, 4):
            raise ConfigError(f"`two_bit_storage`={two_bit_storage} must be 4 (fast) or 2")
        plans = {p.name: p for p in gptq_modules(gptq_dir, eight_bit, two_bit_storage)}
        advance(1)
        model = float_model(gptq_dir)  # + the unmerged units' LoRA (PEFT, eval), if any
        lora = lora_summary(model)
        if lora:
            log.info("onnx export: %d module(s) kept unmerged, their LoRA in the graph", len(lora))
        from edgeqra.gptq import dequantized_weights

        w_hat = dequantized_weights(gptq_dir)
        for name, p in plans.items():  # the MatMulNBits values are the GPTQ values, exactly
            got = p.dequantized()
            if got is not None and not np.array_equal(got, w_hat[name].numpy()):
                raise ModelError(f"re-packing `{name}` changed its dequantized weight (bug)")
        advance(2)
        t_export = time.perf_counter()
        onnx_model = export_float(model)
        export_s = time.perf_counter() - t_export
        advance(3)
        swapped = swap_matmuls(onnx_model, plans, w_hat, accuracy_level)
        del w_hat
        lora_info = lora_storage(onnx_model, lora) if lora else None
        embedding, table = embedding_to(onnx_model, embedding_dtype)
        if cache_io == "genai":
            per_layer_io(onnx_model, model.config.num_hidden_layers)
        advance(4)
        ir.save(onnx_model, dest / MODEL_FILE, external_data=DATA_FILE)
        opset = int(onnx_model.opset_imports.get("", 0))
        io_names = (
            [v.name for v in onnx_model.graph.inputs],
            [v.name for v in onnx_model.graph.outputs],
        )
        del onnx_model
        copied = []
        for name in _SIDE_FILES:
            if (gptq_dir / name).is_file():
                shutil.copy2(gptq_dir / name, dest / name)
                copied.append(name)
        if cache_io == "genai":
            import json

            gen = gptq_dir / "generation_config.json"
            cfg = genai_config(model.config, json.loads(gen.read_text()) if gen.is_file() else None)
            (dest / GENAI_CONFIG).write_text(json.dumps(cfg, indent=2) + "\n")
        advance(5)
        with torch.no_grad():  # the reference holds the table the graph computes with
            model.get_input_embeddings().weight.copy_(torch.from_numpy(table))
        parity = _parity(dest, model)
        advance(6)

    import onnxruntime

    nodes = [
        {
            "module": name,
            "node": swapped[name],
            "bits_requested": p.bits_requested,
            "storage": p.storage,
            "bits_stored": p.parts[0].bits_stored if p.parts else 32,
            "group_size": p.group_size,
            "block_size": p.parts[0].block_size if p.parts else None,
            "K": p.k,
            "N": p.n,
            "bytes": p.bytes,
            "lora_rank": (lora or {}).get(name, {}).get("rank", 0),  # 0: merged (no branch)
        }
        for name, p in sorted(plans.items())
    ]
    storage = storage_report(plans, lora_info)
    line = storage_line(storage, embedding)
    log.info("%s", line)
    files = sorted(p for p in dest.iterdir() if p.is_file())
    return {
        "format": "onnx",
        "model_file": MODEL_FILE,
        "external_data": DATA_FILE,
        "op": f"{MS_DOMAIN}.MatMulNBits",
        "nodes": nodes,
        "bits_stored": sorted({n["bits_stored"] for n in nodes if n["block_size"]}),
        "bits_requested": sorted({n["bits_requested"] for n in nodes}),
        "block_sizes": sorted({n["block_size"] for n in nodes if n["block_size"]}),
        "three_bit": three_bit_info(plans),
        "eight_bit": eight_bit.value,
        "storage": storage,
        "storage_line": line,
        "embedding": embedding,
        "values": "GPTQ integers, scales and zero points (no re-quantization)"
        + ("; the unmerged units' LoRA A and B as float32" if lora else ""),
        "lora": lora_info,
        "accuracy_level": accuracy_level,
        "kv_cache": True,
        "cache_io": cache_io,
        "inputs": io_names[0],
        "outputs": io_names[1],
        "opset": opset,
        "onnxruntime_version": onnxruntime.__version__,
        "onnx_version": _version("onnx"),
        "onnxscript_version": _version("onnxscript"),
        "torch_version": torch.__version__,
        "parity": parity,
        "tokenizer_files": copied,
        "export_seconds": round(time.perf_counter() - started, 2),
        "torch_export_seconds": round(export_s, 2),
        "files": [{"path": p.name, "bytes": p.stat().st_size} for p in files],
    }
