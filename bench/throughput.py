"""Throughput (issue 4): LoRA fine-tuning and generation tokens/s with real GPTQModel kernels.

Same architecture, batch and adapters (rank 8 on every layer) for every config:

* fine-tuning tokens/s: FP16 LoRA, uniform 4-bit GPTQ and a mixed config of 3.5 average bits
  (layers alternate 3 and 4 bits), ``tune.train`` steps with the trainable kernels GPTQModel
  picks per bit-width (the kernels are printed);
* generation tokens/s: the mixed checkpoint vs uniform 4-bit (and FP16 for scale), greedy,
  with GPTQModel's inference kernels; prefill is timed apart so decode tokens/s is shown too.

Issue 15: the quantized configs fine-tune through edgeqra's recompute backward
(``edgeqra.qlinear``, no dense weight kept for backward); ``u4-saved`` is the same 4-bit
model on GPTQModel's own autograd path (every dense weight saved), for the comparison; each
fine-tuning row also reports its peak allocated memory over the timed steps.

Random weights of the architecture's shapes (``edgeqra.qmodel.write_random_checkpoint``):
speed does not depend on the values. GPU:

    python bench/throughput.py --arch llama-3.2-1b --out $OUT/throughput.json
    python bench/throughput.py --arch llama-3.1-8b --configs fp16,u4,u4-saved \
        --phases finetune --kernels triton,torch --out $OUT/throughput_8b.json

CPU smoke check (tiny model, seconds): ``python bench/throughput.py --arch tiny --device cpu``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _hf_config(arch: str):
    """The architecture's HF config; ``tiny`` is a 4-layer Llama for smoke checks."""
    from transformers import AutoConfig, LlamaConfig

    if arch == "tiny":
        return LlamaConfig(
            hidden_size=128,
            intermediate_size=256,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=512,
            max_position_embeddings=1024,
        )
    return AutoConfig.from_pretrained(REPO / "examples" / "architectures" / arch)


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", default="llama-3.2-1b", help="examples/architectures/<arch> or tiny")
    p.add_argument("--device", default="auto", help="auto, cuda or cpu")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--steps", type=int, default=8, help="timed steps (after one warm-up step)")
    p.add_argument("--gen-batch", type=int, default=1)
    p.add_argument("--prompt", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--kernels", default="marlin,triton,torch", help="GPTQModel kernels allowed")
    p.add_argument(
        "--configs",
        default="fp16,u4,u4-saved,mixed",
        help=f"comma list of {sorted(CONFIGS)}",
    )
    p.add_argument("--phases", default="finetune,generate", help="finetune and/or generate")
    p.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=False)
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, help="JSON results")
    return p.parse_args(argv)


CONFIGS = {  # key: (label, quantized backward)
    "fp16": ("FP16 LoRA", "recompute"),
    "u4": ("GPTQ 4-bit", "recompute"),
    "u4-saved": ("GPTQ 4-bit, GPTQModel backward", "saved"),
    "mixed": ("mixed 3.5-bit", "recompute"),
}


def _configs(n_units: int, rank: int, keys: list[str]) -> dict[str, tuple[object, str]]:
    """Label -> (Config, quantized backward) for the keys asked for."""
    from edgeqra.space import Config

    bad = [k for k in keys if k not in CONFIGS]
    if bad:
        sys.exit(f"unknown --configs {bad}; use some of {sorted(CONFIGS)}")
    make = {
        "fp16": lambda: Config.uniform(n_units, 16, rank),
        "u4": lambda: Config.uniform(n_units, 4, rank),
        "u4-saved": lambda: Config.uniform(n_units, 4, rank),
        "mixed": lambda: Config.from_pairs([(3 if i % 2 else 4, rank) for i in range(n_units)]),
    }
    return {CONFIGS[k][0]: (make[k](), CONFIGS[k][1]) for k in keys}


def _fmt(value: float) -> str:
    """Tokens/s: thousands separators when large, three significant digits when small."""
    return f"{value:,.0f}" if value >= 100 else f"{value:.3g}"


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def finetune_speed(model, args, device: str) -> dict[str, float]:
    """Tokens/s of ``tune.train`` over ``args.steps`` steps after a warm-up step."""
    import torch

    from edgeqra.tune import TrainBatches, TuneSettings, train

    vocab = model.config.get_text_config().vocab_size
    g = torch.Generator().manual_seed(args.seed)
    rows = args.micro_batch * (args.steps + 1)
    ids = torch.randint(0, vocab, (rows, args.seq_len), generator=g)
    batches = TrainBatches(ids, ids.clone(), torch.ones_like(ids))
    ckpt = args.gradient_checkpointing
    settings = TuneSettings(
        steps=1, batch_size=args.micro_batch, seed=args.seed, gradient_checkpointing=ckpt
    )
    train(model, batches, settings)  # warm-up: kernel compilation, first allocations
    on_cuda = device.startswith("cuda")
    if on_cuda:
        torch.cuda.reset_peak_memory_stats()
    timed = TuneSettings(steps=args.steps, batch_size=args.micro_batch, gradient_checkpointing=ckpt)
    log = train(model, batches, timed)
    tokens = args.steps * args.micro_batch * args.seq_len
    out = {"seconds": log.seconds, "tokens_per_s": tokens / log.seconds}
    if on_cuda:
        out["peak_allocated_bytes"] = torch.cuda.max_memory_allocated()
    return out


def generation_speed(model, args, device: str) -> dict[str, float]:
    """Greedy generate tokens/s, with the prefill timed apart."""
    import torch

    vocab = model.config.get_text_config().vocab_size
    g = torch.Generator().manual_seed(args.seed)
    ids = torch.randint(0, vocab, (args.gen_batch, args.prompt), generator=g).to(device)
    kw = dict(
        do_sample=False, pad_token_id=0, eos_token_id=None, attention_mask=torch.ones_like(ids)
    )

    def timed(new: int) -> float:
        _sync(device)
        t0 = time.perf_counter()
        with torch.no_grad():
            model.generate(input_ids=ids, max_new_tokens=new, min_new_tokens=new, **kw)
        _sync(device)
        return time.perf_counter() - t0

    timed(2)  # warm-up
    prefill = timed(1)
    total = timed(args.new_tokens)
    decode = max(total - prefill, 1e-9)
    return {
        "seconds": total,
        "prefill_seconds": prefill,
        "tokens_per_s": args.gen_batch * args.new_tokens / total,
        "decode_tokens_per_s": args.gen_batch * (args.new_tokens - 1) / decode,
    }


def main(argv: list[str] | None = None) -> None:
    """Entry point: both measurements, a table last, JSON to --out."""
    args = _parse_args(argv)
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")
    sys.path.insert(0, str(REPO))
    import gc

    import torch
    from rich.console import Console
    from rich.table import Table

    from edgeqra.measure import build_model
    from edgeqra.memory import ModelSpec

    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    if not device.startswith("cuda"):
        # Small CPU ops gain nothing from threads, and OpenMP spin-waits are 10-50x slower
        # when other processes share the cores (tests/test_tune.py measured this).
        torch.set_num_threads(1)
    hf = _hf_config(args.arch)
    spec = ModelSpec.from_config(hf)
    configs = _configs(spec.n_units, args.rank, args.configs.split(","))
    kernels = args.kernels.split(",") if device.startswith("cuda") else None
    phases = [p for p in ("finetune", "generate") if p in args.phases.split(",")]
    results: dict[str, dict] = {p: {} for p in phases}
    with tempfile.TemporaryDirectory(prefix="throughput-") as tmp:
        for label, (config, backward) in configs.items():
            work = Path(tmp) / config.short().replace("/", "_")  # u4 and u4-saved share it
            for phase in phases:
                trainable = phase == "finetune"
                if not trainable and backward == "saved":
                    continue  # generation does not depend on the backward path
                model, chosen = build_model(
                    hf,
                    config,
                    trainable=trainable,
                    work_dir=work,
                    device=device,
                    dtype=dtype,
                    group_size=args.group_size,
                    kernels=kernels,
                    seed=args.seed,
                    quantized_backward=backward,
                )
                speed = (finetune_speed if trainable else generation_speed)(model, args, device)
                results[phase][label] = {
                    "config": config.short(),
                    "quantized_backward": backward,
                    "average_bits": round(config.average_bits(spec.unit_params), 3),
                    "kernels": {str(b): k for b, k in chosen.items()},
                    **speed,
                }
                print(
                    json.dumps({"phase": phase, "label": label, **results[phase][label]}),
                    flush=True,
                )
                del model
                gc.collect()
                if device.startswith("cuda"):
                    torch.cuda.empty_cache()
    payload = {
        "arch": args.arch,
        "device": torch.cuda.get_device_name(0) if device.startswith("cuda") else "cpu",
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "results": results,
    }
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(payload, indent=1))

    table = Table(title=f"throughput, {args.arch} on {payload['device']}")
    cols = ("phase", "config", "avg bits", "tokens/s", "vs FP16", "vs 4-bit", "peak GiB")
    for col in (*cols, "kernels"):
        table.add_column(col, justify="right")
    for phase, rows in results.items():
        fp16 = rows.get("FP16 LoRA", {}).get("tokens_per_s")
        u4 = rows.get("GPTQ 4-bit", {}).get("tokens_per_s")
        for label, r in rows.items():
            tps = r["tokens_per_s"]
            peak = r.get("peak_allocated_bytes")
            table.add_row(
                phase,
                label,
                f"{r['average_bits']:.2f}",
                _fmt(tps)
                + (f" (decode {_fmt(r['decode_tokens_per_s'])})" if phase == "generate" else ""),
                f"{tps / fp16:.2f}x" if fp16 else "-",
                f"{tps / u4:.2f}x" if u4 else "-",
                "-" if peak is None else f"{peak / 2**30:.2f}",
                ", ".join(f"{b}: {k}" for b, k in r["kernels"].items()) or "dense",
            )
    Console(width=200).print(table)


if __name__ == "__main__":
    main()
