"""Throughput (issue 4): LoRA fine-tuning and generation tokens/s with real GPTQModel kernels.

Same architecture, batch and adapters (rank 8 on every layer) for every config:

* fine-tuning tokens/s: FP16 LoRA, uniform 4-bit GPTQ and a mixed config of 3.5 average bits
  (layers alternate 3 and 4 bits), ``tune.train`` steps with the trainable kernels GPTQModel
  picks per bit-width (the kernels are printed);
* generation tokens/s: the mixed checkpoint vs uniform 4-bit (and FP16 for scale), greedy,
  with GPTQModel's inference kernels; prefill is timed apart so decode tokens/s is shown too.

Issue 15: the quantized configs fine-tune through edgeqra's recompute backward
(``edgeqra.qlinear``, no dense weight kept for backward); ``u4-saved`` is the same 4-bit
model on GPTQModel's own autograd path (every dense weight saved), for the comparison, and
``u4-moddq`` the recompute path rebuilding W in backward with the module's own dequant (the
forward's call) instead of GPTQModel's Triton dequant kernel; each fine-tuning row also
reports its peak allocated memory over the timed steps.

Random weights of the architecture's shapes (``edgeqra.gptq.write_random_checkpoint``):
speed does not depend on the values. GPU:

    python bench/throughput.py --arch llama-3.2-1b --out $OUT/throughput.json
    python bench/throughput.py --arch llama-3.1-8b --configs fp16,u4,u4-moddq,u4-saved \
        --phases finetune --kernels triton,torch --out $OUT/throughput_8b.json

Each (config, phase) is measured in a fresh Python process (this script re-run with
``--child``; ``--no-fresh-process`` runs them all in one, importing GPTQModel first), and
every row records ``allocated_before_bytes``, what PyTorch held on the GPU right before the
build, so a leftover of an earlier build can never hide in a peak again. Why (issue 15, H200
2026-12-02, both 4-bit peaks above FP16's): in one process the FP16 model outlived its
``del``. GPTQModel 7.6 keeps the ``ImportError`` of its optional llama.cpp kernel at module
level (``gptqmodel/nn_modules/qlinear/gguf_cpp.py``, ``_LLAMA_CPP_IMPORT_ERROR``), and that
exception's traceback pins every frame on the stack of gptqmodel's first import; PEFT
triggers that import inside ``attach_lora`` of the first model built, whose frames hold the
model (found on CPU with weakrefs; importing GPTQModel first frees it), so the later peaks
most likely carried its 15 GiB.

CPU smoke check (tiny model, about a minute per process):
``python bench/throughput.py --arch tiny --device cpu --configs fp16,u4 --phases finetune``.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


@functools.cache
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
        default="fp16,u4,u4-moddq,u4-saved,mixed",
        help=f"comma list of {sorted(CONFIGS)}",
    )
    p.add_argument("--phases", default="finetune,generate", help="finetune and/or generate")
    p.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=False)
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, help="JSON results")
    p.add_argument(
        "--fresh-process",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="measure each (config, phase) in its own Python process (nothing left over)",
    )
    p.add_argument(
        "--time-limit",
        type=float,
        help="seconds: start no process that the longest one so far would not finish in time",
    )
    # Internal: a child process measures one (config, phase) and writes its rows here.
    p.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--work-dir", type=Path, help=argparse.SUPPRESS)
    return p.parse_args(argv)


CONFIGS = {  # key: (label, quantized backward, the recompute backward's dequant kernel)
    "fp16": ("FP16 LoRA", "recompute", None),
    "u4": ("GPTQ 4-bit", "recompute", "triton"),
    "u4-moddq": ("GPTQ 4-bit, recompute with the forward's dequant", "recompute", "module"),
    "u4-saved": ("GPTQ 4-bit, GPTQModel backward", "saved", None),
    "mixed": ("mixed 3.5-bit", "recompute", "triton"),
}
# Fine-tuning variants of the u4 model: their generation is u4's (no backward runs there).
_FINETUNE_ONLY = frozenset({"u4-saved", "u4-moddq"})


def _configs(n_units: int, rank: int, keys: list[str]) -> dict[str, tuple[str, object, str]]:
    """Key -> (label, Config, quantized backward) for the keys asked for."""
    from edgeqra.space import Config

    bad = [k for k in keys if k not in CONFIGS]
    if bad:
        sys.exit(f"unknown --configs {bad}; use some of {sorted(CONFIGS)}")
    u4 = lambda: Config.uniform(n_units, 4, rank)  # noqa: E731 - the u4 variants' one model
    make = {
        "fp16": lambda: Config.uniform(n_units, 16, rank),
        "u4": u4,
        **dict.fromkeys(_FINETUNE_ONLY, u4),
        "mixed": lambda: Config.from_pairs([(3 if i % 2 else 4, rank) for i in range(n_units)]),
    }
    return {k: (CONFIGS[k][0], make[k](), CONFIGS[k][1]) for k in keys}


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


def _import_gptqmodel_first() -> None:
    """Import GPTQModel's kernels while no model is on the stack (see the module docstring).

    Its first import stores an exception whose traceback pins the frames that imported it;
    done here, those frames hold no model.
    """
    try:
        import gptqmodel  # noqa: F401
    except ImportError:  # FP16 rows need no GPTQModel
        pass


def _measure_one(args, key: str, phase: str, spec, work_root: Path, device: str) -> dict:
    """One build and one measurement in this process: the row of (config ``key``, ``phase``)."""
    import torch

    from edgeqra.measure import build_model

    label, config, backward = _configs(spec.n_units, args.rank, [key])[key]
    on_cuda = device.startswith("cuda")
    dtype = torch.bfloat16 if on_cuda else torch.float32
    kernels = args.kernels.split(",") if on_cuda else None
    trainable = phase == "finetune"
    row: dict[str, object] = {
        "config": config.short(),
        "quantized_backward": backward,
        "average_bits": round(config.average_bits(spec.unit_params), 3),
    }
    if on_cuda:
        # Anything an earlier build left alive would sit inside this row's peak.
        row["allocated_before_bytes"] = torch.cuda.memory_allocated()
    model, chosen = build_model(
        _hf_config(args.arch),
        config,
        trainable=trainable,
        work_dir=work_root / config.short().replace("/", "_"),  # the u4 variants share it
        device=device,
        dtype=dtype,
        group_size=args.group_size,
        kernels=kernels,
        seed=args.seed,
        quantized_backward=backward,
    )
    dequant = CONFIGS[key][2]  # None where no recompute backward runs (FP16, saved)
    if trainable and dequant not in (None, "triton"):  # build_model installed "triton"
        from edgeqra.qlinear import enable_recompute_backward

        enable_recompute_backward(model, dequant=dequant)  # only changes the kernel
    row["recompute_dequant"] = dequant
    if on_cuda:
        row["allocated_after_build_bytes"] = torch.cuda.memory_allocated()
    speed = (finetune_speed if trainable else generation_speed)(model, args, device)
    row["kernels"] = {str(b): k for b, k in chosen.items()}
    row.update(speed)
    print(json.dumps({"phase": phase, "label": label, **row}), flush=True)
    del model
    return row


def _jobs(args, keys: list[str]) -> list[tuple[str, str]]:
    """(config key, phase) pairs to measure, in order; generation skips the u4 variants."""
    phases = [p for p in ("finetune", "generate") if p in args.phases.split(",")]
    return [
        (key, phase)
        for key in keys
        for phase in phases
        if phase == "finetune" or key not in _FINETUNE_ONLY
    ]


def _device_name(device: str) -> str:
    import torch

    return torch.cuda.get_device_name(0) if device.startswith("cuda") else "cpu"


def _run_here(args, jobs, spec, work_root: Path, device: str) -> dict[str, dict]:
    """Every job in this process, one after another (``--no-fresh-process`` and children)."""
    import gc

    import torch

    if not device.startswith("cuda"):
        # Small CPU ops gain nothing from threads, and OpenMP spin-waits are 10-50x slower
        # when other processes share the cores (tests/test_tune.py measured this).
        torch.set_num_threads(1)
    _import_gptqmodel_first()
    results: dict[str, dict] = {}
    for key, phase in jobs:
        results.setdefault(phase, {})[CONFIGS[key][0]] = _measure_one(
            args, key, phase, spec, work_root, device
        )
        gc.collect()
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    return results


def _run_children(args, argv: list[str], jobs, spec, work_root: Path, device: str):
    """Each job in a fresh process; returns (results, device name, skipped jobs)."""
    results: dict[str, dict] = {}
    skipped: list[str] = []
    device_name = None
    start = time.perf_counter()
    longest = 0.0
    for key, phase in jobs:
        label, config, backward = _configs(spec.n_units, args.rank, [key])[key]
        name = f"{phase}/{key}"
        timeout = None
        if args.time_limit is not None:
            timeout = args.time_limit - (time.perf_counter() - start)
            if timeout < longest or timeout <= 0:
                skipped.append(name)
                continue
        out = work_root / f"row-{phase}-{key}.json"
        cmd = [
            sys.executable,
            str(Path(__file__).resolve()),
            *argv,
            *("--configs", key, "--phases", phase, "--device", device),
            *("--no-fresh-process", "--child", str(out), "--work-dir", str(work_root)),
        ]
        t0 = time.perf_counter()
        try:
            rc = subprocess.run(cmd, check=False, timeout=timeout).returncode  # noqa: S603
        except subprocess.TimeoutExpired:
            rc = "timed out"
        longest = max(longest, time.perf_counter() - t0)
        if rc == 0 and out.exists():
            child = json.loads(out.read_text())
            device_name = device_name or child["device"]
            results.setdefault(phase, {}).update(child["results"][phase])
        else:
            print(f"{name}: the child process failed ({rc}); see its output above", flush=True)
            results.setdefault(phase, {})[label] = {
                "config": config.short(),
                "quantized_backward": backward,
                "average_bits": round(config.average_bits(spec.unit_params), 3),
                "error": f"child process: {rc}",
            }
    return results, device_name, skipped


def main(argv: list[str] | None = None) -> None:
    """Entry point: each measurement in its own process, a table last, JSON to --out."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parse_args(argv)
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")
    sys.path.insert(0, str(REPO))
    import torch

    from edgeqra.memory import ModelSpec

    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    spec = ModelSpec.from_config(_hf_config(args.arch))
    keys = args.configs.split(",")
    _configs(spec.n_units, args.rank, keys)  # exits on an unknown key
    jobs = _jobs(args, keys)
    if args.child is not None:  # one (config, phase) of a parent's run
        results = _run_here(args, jobs, spec, args.work_dir, device)
        args.child.write_text(json.dumps({"device": _device_name(device), "results": results}))
        return
    skipped: list[str] = []
    with tempfile.TemporaryDirectory(prefix="throughput-") as tmp:
        if args.fresh_process:
            results, name, skipped = _run_children(args, argv, jobs, spec, Path(tmp), device)
        else:
            results, name = _run_here(args, jobs, spec, Path(tmp), device), None
    payload = {
        "arch": args.arch,
        "device": name or _device_name(device),
        "fresh_process": args.fresh_process,
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "results": results,
        "skipped": skipped,
    }
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(payload, indent=1))
    _print_table(payload)
    if skipped:
        print(f"not measured (time limit): {', '.join(skipped)}")


def _print_table(payload: dict) -> None:
    """The results as one rich table: tokens/s, ratios, peak and held-before GiB, kernels."""
    from rich.console import Console
    from rich.table import Table

    def gib(n: int | None) -> str:
        return "-" if n is None else f"{n / 2**30:.2f}"

    table = Table(title=f"throughput, {payload['arch']} on {payload['device']}")
    cols = ("phase", "config", "avg bits", "tokens/s", "vs FP16", "vs 4-bit", "peak GiB")
    for col in (*cols, "held before GiB", "kernels"):
        table.add_column(col, justify="right")
    for phase, rows in payload["results"].items():
        fp16 = rows.get("FP16 LoRA", {}).get("tokens_per_s")
        u4 = rows.get("GPTQ 4-bit", {}).get("tokens_per_s")
        for label, r in rows.items():
            tps = r.get("tokens_per_s")
            if tps is None:
                table.add_row(phase, label, f"{r['average_bits']:.2f}", f"failed: {r['error']}")
                continue
            table.add_row(
                phase,
                label,
                f"{r['average_bits']:.2f}",
                _fmt(tps)
                + (f" (decode {_fmt(r['decode_tokens_per_s'])})" if phase == "generate" else ""),
                f"{tps / fp16:.2f}x" if fp16 else "-",
                f"{tps / u4:.2f}x" if u4 else "-",
                gib(r.get("peak_allocated_bytes")),
                gib(r.get("allocated_before_bytes")),
                ", ".join(f"{b}: {k}" for b, k in r["kernels"].items()) or "dense",
            )
    Console(width=200).print(table)


if __name__ == "__main__":
    main()
