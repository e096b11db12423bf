"""GPTQ bank build: the shared-Hessian bank for every bit-width vs one GPTQModel quantization.

    python bench/bank_speed.py --device cpu  --calib-samples 32 --quality
    python bench/bank_speed.py --device cuda --calib-samples 128 --quality

In one process, on the same model and calibration rows: (1) one GPTQModel quantization of the
whole model at ``--one-bits`` (``quantize_to_checkpoint``, what the sequential bank runs once
per width), (2) the shared-Hessian bank for ``--bits`` (``BankSpec(hessian="shared")``), and
with ``--quality`` (3) the sequential bank for ``--bits`` and the held-out loss (wiki windows,
never calibration text) of uniform and random mixed configs assembled from both banks.
Prints a markdown table (paste it into bench/RESULTS.md with the command, the machine and the
load average) and writes the figures as JSON with ``--out``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import tempfile
import time
from pathlib import Path

import torch

from edgeqra.bank import BankSpec, build_bank
from edgeqra.data import calibration_batches
from edgeqra.gptq import quantize_to_checkpoint
from edgeqra.models import load_model
from edgeqra.space import Choice, Config


def _load() -> str:
    """The 1/5/15-minute load averages (the CPU is shared: say how busy it was)."""
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def _sync(device: str) -> None:
    """Wait for queued GPU work so wall-clock timings are honest."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()


@torch.no_grad()
def _heldout_loss(model: torch.nn.Module, rows: torch.Tensor, batch_size: int = 4) -> float:
    """Mean next-token NLL over (n, seq) token rows."""
    total, count = 0.0, 0
    device = next(model.parameters()).device
    for batch in rows.split(batch_size):  # (batch, seq)
        batch = batch.to(device)
        logits = model(batch, use_cache=False).logits[:, :-1].float()  # (batch, seq-1, vocab)
        nll = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum"
        )
        total += nll.item()
        count += batch[:, 1:].numel()
    return total / count


def main() -> None:
    """Run the measurements and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--calib-samples", type=int, default=32)
    parser.add_argument("--bits", type=int, nargs="+", default=[2, 3, 4, 8])
    parser.add_argument("--one-bits", type=int, default=4, help="width of the single GPTQModel run")
    parser.add_argument("--group-size", type=int, default=64)
    parser.add_argument("--quality", action=argparse.BooleanOptionalAction, default=False)
    parser.add_argument("--eval-rows", type=int, default=16, help="held-out wiki rows of 256")
    parser.add_argument("--mixed", type=int, default=2, help="random mixed configs compared")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    figures: dict[str, object] = {
        "args": vars(args) | {"out": str(args.out)},
        "machine": platform.node(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }
    if args.device.startswith("cuda"):
        figures["gpu"] = torch.cuda.get_device_name()
    # float32 everywhere: the bank's GPTQ runs in float32 on either device.
    loaded = load_model(args.model, dtype=torch.float32, device=args.device)
    calibration = calibration_batches(
        loaded.tokenizer, "c4", n_samples=args.calib_samples, seq_len=256
    )
    loads: dict[str, str] = {"start": _load()}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        _sync(args.device)
        start, cpu = time.perf_counter(), time.process_time()
        quantize_to_checkpoint(
            loaded.path,
            tmp / "one",
            calibration,
            bits=args.one_bits,
            group_size=args.group_size,
            device=args.device,
        )
        _sync(args.device)
        figures["one_gptqmodel_s"] = time.perf_counter() - start
        figures["one_gptqmodel_cpu_s"] = time.process_time() - cpu
        loads["after_one"] = _load()

        start, cpu = time.perf_counter(), time.process_time()
        shared = build_bank(
            loaded.path,
            loaded.units,
            calibration,
            BankSpec(bits=tuple(args.bits), group_size=args.group_size, hessian="shared"),
            cache_root=tmp / "cache",
            device=args.device,
            progress=False,
        )
        _sync(args.device)
        figures["shared_bank_s"] = time.perf_counter() - start
        figures["shared_bank_cpu_s"] = time.process_time() - cpu
        loads["after_shared"] = _load()
        figures["ratio"] = figures["shared_bank_s"] / figures["one_gptqmodel_s"]
        figures["cpu_ratio"] = figures["shared_bank_cpu_s"] / figures["one_gptqmodel_cpu_s"]

        if args.quality:
            per_bits: dict[int, float] = {}
            sequential = build_bank(
                loaded.path,
                loaded.units,
                calibration,
                BankSpec(bits=tuple(args.bits), group_size=args.group_size, hessian="sequential"),
                cache_root=tmp / "cache",
                device=args.device,
                progress=False,
                on_bits_done=lambda b, s: per_bits.__setitem__(b, s),
            )
            figures["sequential_bank_s"] = per_bits
            loads["after_sequential"] = _load()
            heldout = calibration_batches(
                loaded.tokenizer, "wiki", n_samples=args.eval_rows, seq_len=256, seed=1
            )
            model = loaded.model
            shared.remember_originals(model)
            sequential.remember_originals(model)
            n = len(loaded.units)
            rng = random.Random(0)
            configs = {f"uniform {b}-bit": Config.uniform(n, b, 0) for b in args.bits}
            for i in range(args.mixed):
                configs[f"mixed #{i}"] = Config(
                    tuple(Choice(rng.choice(args.bits), 0) for _ in range(n))
                )
            loss: dict[str, dict[str, float]] = {"fp": {}}
            shared.assemble(model, Config.uniform(n, 16, 0))
            loss["fp"]["fp"] = _heldout_loss(model, heldout)
            for label, config in configs.items():
                loss[label] = {
                    name: _heldout_loss(bank.assemble(model, config), heldout)
                    for name, bank in (("sequential", sequential), ("shared", shared))
                }
                loss[label]["config"] = config.short()
            figures["heldout_loss"] = loss
    figures["load_average"] = loads

    dev = figures.get("gpu", platform.processor() or "cpu")
    print(f"\n{args.device} ({dev}), {args.calib_samples} x 256 calibration tokens, "
          f"{figures['threads']} threads\n")  # fmt: skip
    print("| what | wall | CPU time (all threads) |")
    print("|---|---|---|")
    print(f"| one GPTQModel run, {args.one_bits}-bit | {figures['one_gptqmodel_s']:.1f} s "
          f"| {figures['one_gptqmodel_cpu_s']:.1f} s |")  # fmt: skip
    print(f"| shared-Hessian bank, {'/'.join(map(str, args.bits))}-bit "
          f"| {figures['shared_bank_s']:.1f} s ({figures['ratio']:.2f}x one run) "
          f"| {figures['shared_bank_cpu_s']:.1f} s ({figures['cpu_ratio']:.2f}x) |")  # fmt: skip
    if args.quality:
        seq = figures["sequential_bank_s"]
        print(f"| sequential bank (one GPTQModel run per width) | {sum(seq.values()):.1f} s "
              f"({', '.join(f'{b}-bit {s:.0f} s' for b, s in seq.items())}) |")  # fmt: skip
        print("\n| config | held-out loss, sequential bank | shared bank | ppl ratio |")
        print("|---|---|---|---|")
        print(f"| unquantized | {loss['fp']['fp']:.4f} | | |")
        for label in configs:
            s, h = loss[label]["sequential"], loss[label]["shared"]
            print(f"| {label} | {s:.4f} | {h:.4f} | {math.exp(h - s):.3f} |")
    print(f"\nload average (1/5/15 min): {loads}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(figures, indent=2, default=str))


if __name__ == "__main__":
    main()
