"""The reference the search must beat: FP16 LoRA and uniform 8/4/3/2-bit GPTQ + LoRA, same data/steps.

    python bench/baselines.py --device cuda --steps 256 --calib-samples 128

Each row goes through the same path as a search candidate (bank -> LoRA -> N steps -> score).
Prints a markdown table for bench/RESULTS.md; --out writes JSON.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from edgeqra.evaluate import EvalSettings
from edgeqra.pipeline import EvalJob, baseline_configs, prepare
from edgeqra.tune import TuneSettings

GiB = 1 << 30


def main() -> None:
    """Evaluate every baseline and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--task", default="arc_easy")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--steps", type=int, default=256)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--bits", type=int, nargs="+", default=[2, 3, 4, 8])
    parser.add_argument("--calib-samples", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--n-train", type=int, default=None, help="default: the whole train split")
    parser.add_argument(
        "--n-eval", type=int, default=None, help="default: the whole validation split"
    )
    parser.add_argument("--profile", default="jetson-orin-nano-8gb")
    parser.add_argument("--also-untuned", action="store_true", help="add 0-step rows")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    job = EvalJob(
        model=args.model,
        task=args.task,
        bits=tuple(args.bits),
        calib_samples=args.calib_samples,
        tune=TuneSettings(steps=args.steps, batch_size=args.batch_size, lr=2e-4),
        eval=EvalSettings(n_train=args.n_train, n_eval=args.n_eval),
        device=args.device,
        profile=args.profile,
    )
    prepared = prepare(job)
    rows = []
    for label, config in baseline_configs(
        len(prepared.loaded.units), tuple(args.bits), args.rank
    ).items():
        for steps in ([0] if args.also_untuned else []) + [args.steps]:
            r = prepared.evaluator.evaluate(config, steps)
            rows.append({"label": label, "steps": steps, **r.to_json()})
            print(
                f"{label:12s} steps={steps:4d} acc={r.accuracy:.4f} acc_norm={r.accuracy_norm:.4f} "
                f"loss={r.loss:.4f} mem={r.memory_bytes / GiB:.3f} GiB {r.seconds:.0f} s",
                flush=True,
            )
    device = prepared.device + (
        f" ({torch.cuda.get_device_name()})" if prepared.device.startswith("cuda") else ""
    )
    n_eval = len(prepared.evaluator.task.eval_mc)
    print(
        f"\n{args.task}: train {len(prepared.evaluator.task.train)} examples, {n_eval} validation items, "
        f"rank {args.rank}, batch {args.batch_size}, lr 2e-4, {device}\n"
    )
    print(
        f"| config | steps | acc | acc_norm | held-out loss | predicted memory on {args.profile} (GiB) | seconds |"
    )
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        print(
            f"| {row['label']} | {row['steps']} | {row['accuracy']:.4f} | {row['accuracy_norm']:.4f} | "
            f"{row['loss']:.4f} | {row['memory_bytes'] / GiB:.3f} | {row['seconds']:.0f} |"
        )
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
