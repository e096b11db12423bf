"""How fast is the evaluation engine? Bank build per bit-width, assemble, tuning step, evaluation.

    python bench/evaluate_speed.py --device cpu  --calib-samples 32  --fidelities 16 64
    python bench/evaluate_speed.py --device cuda --calib-samples 128 --fidelities 16 64 256

Prints a markdown table (paste it into bench/RESULTS.md with the command and the machine) and
writes the raw figures as JSON with --out.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import tempfile
import time
from pathlib import Path

import torch

from edgeqra.bank import BankSpec, build_bank
from edgeqra.data import calibration_batches, load_task
from edgeqra.evaluate import EvalSettings, Evaluator
from edgeqra.models import load_model
from edgeqra.space import Choice, Config
from edgeqra.tune import TuneSettings


def _sync(device: str) -> None:
    """Wait for queued GPU work so wall-clock timings are honest."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main() -> None:
    """Run the measurements and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--task", default="arc_easy")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--calib-samples", type=int, default=32)
    parser.add_argument("--bits", type=int, nargs="+", default=[2, 3, 4, 8])
    parser.add_argument("--fidelities", type=int, nargs="+", default=[16, 64, 256])
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--n-eval", type=int, default=200)
    parser.add_argument(
        "--bank-hessian",
        choices=["shared", "sequential"],
        default="shared",
        help="bank build: one pass for every width, or one GPTQModel run per width",
    )
    parser.add_argument("--out", type=Path)
    parser.add_argument(
        "--cache-root",
        type=Path,
        default=None,
        help="bank cache to build into (must not hold this bank yet); default: a temp dir",
    )
    args = parser.parse_args()

    figures: dict[str, object] = {
        "args": vars(args) | {"out": str(args.out)},
        "machine": platform.node(),
        "torch": torch.__version__,
    }
    if args.device.startswith("cuda"):
        figures["gpu"] = torch.cuda.get_device_name()
    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    start = time.perf_counter()
    loaded = load_model(args.model, dtype=dtype, device=args.device)
    figures["load_s"] = time.perf_counter() - start
    calibration = calibration_batches(
        loaded.tokenizer, "c4", n_samples=args.calib_samples, seq_len=256
    )

    per_bits: dict[int, float] = {}
    with tempfile.TemporaryDirectory() as cache:  # a cold build, not a cache hit
        bank = build_bank(
            loaded.path,
            loaded.units,
            calibration,
            BankSpec(bits=tuple(args.bits), hessian=args.bank_hessian),
            cache_root=args.cache_root or Path(cache),
            device=args.device,
            on_bits_done=lambda b, s: per_bits.__setitem__(b, s),
        )
        figures["bank_build_s"] = per_bits
        bank.remember_originals(loaded.model)
        rng = random.Random(0)
        n = len(loaded.units)
        configs = [
            Config(tuple(Choice(rng.choice(args.bits), 8) for _ in range(n))) for _ in range(21)
        ]
        bank.assemble(loaded.model, configs[0])  # warm: reads entries from disk once
        times = []
        for config in configs[1:]:
            _sync(args.device)
            t = time.perf_counter()
            bank.assemble(loaded.model, config)
            _sync(args.device)
            times.append(time.perf_counter() - t)
        figures["assemble_s_median"] = statistics.median(times)

        task = load_task(args.task, n_train=512, n_eval=args.n_eval)
        evaluator = Evaluator(
            loaded,
            task,
            bank,
            TuneSettings(steps=0, batch_size=args.batch_size),
            EvalSettings(seq_len=args.seq_len, n_eval=args.n_eval),
        )
        mixed = Config(
            tuple(Choice(rng.choice(args.bits), rng.choice([4, 8, 16])) for _ in range(n))
        )
        figures["mixed_config"] = str(mixed)
        zero = evaluator.evaluate(mixed, 0)  # assemble + score only: the fixed cost
        figures["evaluate_s"] = {0: zero.seconds}
        for fidelity in args.fidelities:
            figures["evaluate_s"][fidelity] = evaluator.evaluate(mixed, fidelity).seconds
        top = max(args.fidelities)
        figures["step_s"] = (figures["evaluate_s"][top] - zero.seconds) / top
    if args.device.startswith("cuda"):
        figures["peak_allocated_gib"] = torch.cuda.max_memory_allocated() / 2**30

    rows = [
        (
            "model load (with a cold cache: GGUF dequantized, dense copy written)",
            f"{figures['load_s']:.1f} s",
        )
    ]
    if args.bank_hessian == "shared":  # one pass builds every width: one figure
        widths = "/".join(map(str, per_bits))
        rows.append(
            (
                f"bank build, {widths}-bit, shared Hessians ({args.calib_samples}x256 tokens)",
                f"{max(per_bits.values()):.1f} s",
            )
        )
    else:
        rows += [
            (f"bank build, {b}-bit ({args.calib_samples}x256 calibration tokens)", f"{s:.1f} s")
            for b, s in per_bits.items()
        ]
    rows.append(
        ("assemble (median of 20 random configs)", f"{figures['assemble_s_median'] * 1000:.1f} ms")
    )
    rows.append(
        (
            f"tuning step (batch {args.batch_size} x {args.seq_len})",
            f"{figures['step_s'] * 1000:.0f} ms",
        )
    )
    rows += [
        (f"evaluate at fidelity {f} ({args.n_eval} {args.task} items scored)", f"{s:.1f} s")
        for f, s in figures["evaluate_s"].items()
    ]
    print(f"\n| {args.device} ({figures.get('gpu', platform.processor() or 'cpu')}) | |\n|---|---|")
    for name, value in rows:
        print(f"| {name} | {value} |")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(figures, indent=2, default=str))


if __name__ == "__main__":
    main()
