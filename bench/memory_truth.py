"""Memory truth (issue 4): the memory model's prediction against measured peak GPU memory.

Grid per architecture: FP16 LoRA, uniform 8/4/3/2-bit GPTQ (rank 8) and ``--n-mixed`` seeded
random mixed configs (bits from 2/3/4/8, ranks from 0/4/8/16/32 per layer), on random-weight
models of real architectures' shapes (``examples/architectures/``; memory does not depend on
weight values). Each config is measured for inference (the profile's batch × context,
prefill plus a few decode steps) and LoRA fine-tuning (micro-batch × sequence length, with
and without gradient checkpointing); see ``edgeqra/measure.py`` for what is read and how.

GPU (one H200 call per architecture group; ``bench/gpu/README.md`` has the exact calls):

    python bench/memory_truth.py --arch small --out $OUT/memory_truth_small.json
    python bench/memory_truth.py --arch qwen2.5-7b --out $OUT/memory_truth_qwen2.5-7b.json
    python bench/memory_truth.py --arch llama-3.1-8b --out $OUT/memory_truth_llama-3.1-8b.json

``--time-limit`` (default 530 s) stops starting configs so that the table still prints
inside a 10-minute call; the ones left are listed, to rerun with ``--configs``.

CPU (no GPU): ``--dry-run`` prints the predictions and checks the weight term against the
tensors of each built checkpoint (always, from shapes) and, for architectures up to
``--build-max-params``, against the bytes of the model GPTQModel actually loads.

The table (config, predicted, measured, error %) is printed last; ``--out`` gets the JSON,
rewritten after every config so that a run stopped at its time limit keeps what it measured.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ARCH_DIR = REPO / "examples" / "architectures"
ARCHS = ("smollm2-135m", "llama-3.2-1b", "qwen2.5-1.5b", "qwen2.5-7b", "llama-3.1-8b")
GROUPS = {"small": ARCHS[:3], "large": ARCHS[3:], "all": ARCHS}
UNIFORM = {"fp16": 16, "u8": 8, "u4": 4, "u3": 3, "u2": 2}
GiB = 1 << 30


def grid(n_units: int, n_mixed: int, seed: int, arch: str) -> dict[str, object]:
    """Label -> Config: the uniform baselines at rank 8 and seeded random mixed configs."""
    from edgeqra.space import DEFAULT_BITS, DEFAULT_RANKS, Config

    configs = {label: Config.uniform(n_units, bits, 8) for label, bits in UNIFORM.items()}
    for i in range(n_mixed):
        rng = random.Random(f"{seed}:{arch}:{i}")
        pairs = [(rng.choice(DEFAULT_BITS), rng.choice(DEFAULT_RANKS)) for _ in range(n_units)]
        configs[f"m{i}"] = Config.from_pairs(pairs)
    return configs


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", default="small", help=f"comma list of {ARCHS} or {sorted(GROUPS)}")
    p.add_argument("--configs", default="all", help="comma list of fp16,u8,u4,u3,u2,m0..mN")
    p.add_argument("--n-mixed", type=int, default=6, help="random mixed configs per architecture")
    p.add_argument(
        "--profile", default="rtx-4090-24gb", help="workloads and runtime reserve to predict"
    )
    p.add_argument(
        "--kernels",
        default="triton,torch",
        help="GPTQModel kernels allowed (profile names). The default runs both phases on the "
        "trainable kernels (one load per config, no CUDA JIT build); add marlin to measure "
        "its inference path (a second load per config, ~2 min JIT build per fresh machine)",
    )
    p.add_argument("--modes", default="inference,finetune")
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--decode-tokens", type=int, default=4)
    p.add_argument("--finetune-steps", type=int, default=2, help="measured steps after a warm-up")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--time-limit",
        type=float,
        default=530.0,
        help="seconds: start no config that, at the pace of the slowest so far, would end later",
    )
    p.add_argument("--out", type=Path, help="JSON results")
    p.add_argument("--work-dir", type=Path, help="where random checkpoints go (default: temp)")
    p.add_argument("--dry-run", action="store_true", help="CPU: predictions and byte checks only")
    p.add_argument(
        "--build-max-params",
        type=float,
        default=2e9,
        help="dry run: build and load models up to this many parameters (else shapes only)",
    )
    return p.parse_args(argv)


def _archs(text: str) -> list[str]:
    names: list[str] = []
    for item in text.split(","):
        names += GROUPS.get(item, (item,))
    bad = [n for n in names if n not in ARCHS]
    if bad:
        sys.exit(f"unknown --arch {bad}; use {ARCHS} or {sorted(GROUPS)}")
    return names


def _write(path: Path | None, payload: dict) -> None:
    """Atomic JSON write (temp file, rename)."""
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(payload, indent=1))
    tmp.rename(path)


def _environment() -> dict[str, object]:
    """Versions and allocator settings that the figures depend on."""
    import torch
    import transformers

    env: dict[str, object] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "PYTORCH_ALLOC_CONF": os.environ.get("PYTORCH_ALLOC_CONF"),
    }
    for name in ("gptqmodel", "peft", "triton"):
        try:
            env[name] = __import__(name).__version__
        except Exception:  # noqa: BLE001 - optional
            env[name] = None
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name(0)
        env["gpu_total_bytes"] = torch.cuda.get_device_properties(0).total_memory
    return env


def dry_run(args: argparse.Namespace) -> dict:
    """CPU: predictions and the weight-term checks for every config of every architecture."""
    from transformers import AutoConfig

    from edgeqra.measure import dry_run as check
    from edgeqra.memory import ModelSpec, estimate_for_profile
    from edgeqra.profiles import BudgetMode, load_profile

    profile = load_profile(REPO / "profiles" / f"{args.profile}.toml")
    results: dict[str, list] = {}
    for arch in _archs(args.arch):
        hf = AutoConfig.from_pretrained(ARCH_DIR / arch)
        spec = ModelSpec.from_config(hf)
        params = sum(spec.unit_params) + spec.other_numel
        build = params <= args.build_max_params
        rows = results.setdefault(arch, [])
        configs = grid(spec.n_units, args.n_mixed, args.seed, arch)
        wanted = list(configs) if args.configs == "all" else args.configs.split(",")
        for label in wanted:
            config = configs[label]
            t0 = time.perf_counter()
            with tempfile.TemporaryDirectory(prefix="memtruth-") as tmp:
                sizes = check(
                    hf,
                    config,
                    work_dir=Path(tmp) if build else None,
                    group_size=args.group_size,
                    seed=args.seed,
                )
            pred = {
                m.value: estimate_for_profile(
                    spec, config, profile, mode=m, group_size=args.group_size
                ).total
                for m in (BudgetMode.INFERENCE, BudgetMode.FINETUNE)
            }
            rows.append(
                {
                    "label": label,
                    "config": config.short(),
                    "params": params,
                    "built": build,
                    "seconds": round(time.perf_counter() - t0, 1),
                    "predicted_total": pred,
                    **sizes,
                }
            )
            print(json.dumps({"arch": arch, **rows[-1]}), flush=True)
            _write(args.out, {"dry_run": True, "profile": args.profile, "results": results})
    return results


def _dry_table(results: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="memory truth --dry-run: the weight term, predicted vs built (bytes)")
    for col in ("arch", "config", "pred quant", "ckpt quant", "built quant", "pred dense",
                "built dense", "other bufs", "inf GiB", "ft GiB"):  # fmt: skip
        table.add_column(col, justify="right")
    bad = 0
    for arch, rows in results.items():
        for r in rows:
            built_q = r.get("built_quantized")
            ok = r["plan_quantized"] == r["predicted_quantized"] and (
                built_q is None
                or (
                    built_q == r["predicted_quantized"] and r["built_dense"] == r["predicted_dense"]
                )
            )
            bad += not ok
            table.add_row(
                arch,
                r["label"],
                f"{r['predicted_quantized']:,}",
                f"{r['plan_quantized']:,}",
                "-" if built_q is None else f"{built_q:,}",
                f"{r['predicted_dense']:,}",
                "-" if built_q is None else f"{r['built_dense']:,}",
                "-" if built_q is None else f"{r['built_other']:,}",
                f"{r['predicted_total']['inference'] / GiB:.3f}",
                f"{r['predicted_total']['finetune'] / GiB:.3f}",
                style=None if ok else "red",
            )
    Console(width=200).print(table)
    print(f"weight-term mismatches: {bad}")


def measure(args: argparse.Namespace) -> dict:
    """GPU: the grid, one config at a time, JSON rewritten after each."""
    import gptqmodel  # noqa: F401 - sets its PYTORCH_ALLOC_CONF before CUDA starts, as in use
    import torch
    from transformers import AutoConfig

    from edgeqra.measure import cuda_context_bytes, measure_config
    from edgeqra.memory import ModelSpec
    from edgeqra.profiles import load_profile

    if not torch.cuda.is_available():
        sys.exit("memory_truth needs a CUDA GPU; on CPU use --dry-run")
    start = time.perf_counter()
    profile = load_profile(REPO / "profiles" / f"{args.profile}.toml")
    kernels = args.kernels.split(",")
    payload: dict = {
        "profile": args.profile,
        "reserve_bytes": profile.reserve_bytes,
        "inference": vars(profile.inference),
        "finetune": vars(profile.finetune),
        "kernels_allowed": kernels,
        "group_size": args.group_size,
        "command": " ".join(sys.argv),
        "environment": _environment(),
        "cuda_context_bytes": cuda_context_bytes(),
        "results": {},
        "skipped": [],
    }
    root = args.work_dir or Path(tempfile.mkdtemp(prefix="memtruth-"))
    longest = 0.0  # the slowest config so far: do not start one that would overrun the limit
    for arch in _archs(args.arch):
        hf = AutoConfig.from_pretrained(ARCH_DIR / arch)
        spec = ModelSpec.from_config(hf)
        configs = grid(spec.n_units, args.n_mixed, args.seed, arch)
        wanted = list(configs) if args.configs == "all" else args.configs.split(",")
        for label in wanted:
            if time.perf_counter() - start + longest > args.time_limit:
                payload["skipped"].append(f"{arch}/{label}")
                continue
            work = root / f"{arch}-{label}"
            t0 = time.perf_counter()
            record = measure_config(
                hf,
                configs[label],
                profile,
                work_dir=work,
                modes=args.modes.split(","),
                group_size=args.group_size,
                kernels=kernels,
                decode_tokens=args.decode_tokens,
                finetune_steps=args.finetune_steps,
                seed=args.seed,
            )
            shutil.rmtree(work, ignore_errors=True)
            record["label"] = label
            record["seconds"] = round(time.perf_counter() - t0, 1)
            longest = max(longest, record["seconds"])
            payload["results"].setdefault(arch, []).append(record)
            print(json.dumps({"arch": arch, **record}), flush=True)
            _write(args.out, payload)
    payload["seconds"] = round(time.perf_counter() - start, 1)
    _write(args.out, payload)
    return payload


def _table(payload: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"memory truth on {payload['environment'].get('gpu')}, profile "
                  f"{payload['profile']} (GiB; error = (predicted - measured) / measured)")  # fmt: skip
    for col in ("arch", "config", "phase", "pred", "peak alloc", "err %", "pred+reserve",
                "process", "err %"):  # fmt: skip
        table.add_column(col, justify="right")
    worst: list[tuple[float, str]] = []
    for arch, records in payload["results"].items():
        for rec in records:
            for ph in rec["phases"]:
                if ph["mode"] == "finetune":
                    name = "ft+ckpt" if ph["workload"]["gradient_checkpointing"] else "ft"
                else:
                    name = ph["mode"]
                if "measured" not in ph:
                    table.add_row(arch, rec["label"], name, *["-"] * 5, ph.get("error", "")[:30])
                    continue
                m = ph["measured"]
                table.add_row(
                    arch,
                    rec["label"],
                    name,
                    f"{ph['predicted_without_reserve'] / GiB:.3f}",
                    f"{m['peak_allocated'] / GiB:.3f}",
                    f"{ph['error_allocated_pct']:+.1f}",
                    f"{ph['predicted_total'] / GiB:.3f}",
                    f"{m['process_peak'] / GiB:.3f}",
                    f"{ph['error_process_pct']:+.1f}",
                )
                worst.append((ph["error_allocated_pct"], f"{arch}/{rec['label']}/{name}"))
    Console(width=200).print(table)
    if worst:
        lo, hi = min(worst), max(worst)
        print(f"allocated error: worst under-estimate {lo[0]:+.1f} % ({lo[1]}), "
              f"worst over-estimate {hi[0]:+.1f} % ({hi[1]})")  # fmt: skip
    if payload.get("skipped"):
        print(f"not measured (time limit): {', '.join(payload['skipped'])}")


def main(argv: list[str] | None = None) -> None:
    """Entry point."""
    args = _parse_args(argv)
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")
    sys.path.insert(0, str(REPO))
    if args.dry_run:
        _dry_table(dry_run(args))
    else:
        _table(measure(args))


if __name__ == "__main__":
    main()
