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

Issue 15: by default (``--isolation phase``) every (config, phase) runs in a fresh Python
process (``--child``), so no phase inherits an earlier one's reserved memory, cuBLAS handles
or library caches, and the process figure is that phase's own; the random checkpoint is
written once per config. ``--jobs N`` measures N configs at once (``--gpus G`` spreads them
over G GPUs; peaks are per process, so jobs may share one). Quantized
fine-tuning runs edgeqra's recompute backward (``--quantized-backward saved``: GPTQModel's
own path, for comparison). ``bench/memory_replay.py`` replays a JSON through the memory model.

``--time-limit`` (default 530 s) stops starting configs so that the table still prints
inside a 10-minute call; the ones left are listed, and ``--resume`` with the same ``--out``
measures only them (and any config whose phase failed), keeping the rest of the file.

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


def _grid_labels(n_mixed: int) -> list[str]:
    """Every label of the grid, in its order."""
    return [*UNIFORM, *(f"m{i}" for i in range(n_mixed))]


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
    p.add_argument(
        "--isolation",
        choices=["phase", "config"],
        default="phase",
        help="phase: every (config, phase) runs in a fresh Python process, so no phase "
        "inherits another's reserved memory, cuBLAS handles or caches (issue 15); config: all "
        "phases of a config in this process (faster; reserved memory is emptied in between)",
    )
    p.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="phase isolation: measure this many configs at once (each phase's peaks are its "
        "own process's, so jobs may share a GPU; only wall time is shared)",
    )
    p.add_argument(
        "--gpus", type=int, default=1, help="spread the jobs over this many GPUs (round robin)"
    )
    p.add_argument(
        "--quantized-backward",
        choices=["recompute", "saved"],
        default="recompute",
        help="fine-tuning path of quantized configs: edgeqra.qlinear's recompute backward "
        "(default) or GPTQModel's own autograd path (saves every dense weight; for comparison)",
    )
    p.add_argument("--child", help=argparse.SUPPRESS)  # internal: `arch/label/phase` to measure
    p.add_argument("--out", type=Path, help="JSON results")
    p.add_argument("--work-dir", type=Path, help="where random checkpoints go (default: temp)")
    p.add_argument(
        "--resume",
        action="store_true",
        help="keep the configs --out already holds with every phase measured and measure only "
        "the rest (a grid longer than one call, over several calls)",
    )
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


PHASES = ("inference", "ft", "ft+ckpt")


def _phase_args(phase: str) -> dict:
    """measure_config arguments of one phase name."""
    if phase == "inference":
        return {"modes": ["inference"], "checkpointing": (False,)}
    return {"modes": ["finetune"], "checkpointing": (phase == "ft+ckpt",)}


def _wanted_phases(args: argparse.Namespace) -> list[str]:
    """The phases ``--modes`` asks for, in order."""
    modes = args.modes.split(",")
    return (["inference"] if "inference" in modes else []) + (
        ["ft", "ft+ckpt"] if "finetune" in modes else []
    )


def _measure_one(args: argparse.Namespace, arch: str, label: str, phases: list[str], work: Path):
    """This process: the given phases of one config (a child runs one phase)."""
    import gptqmodel  # noqa: F401 - sets its PYTORCH_ALLOC_CONF before CUDA starts, as in use
    from transformers import AutoConfig

    from edgeqra.measure import measure_config
    from edgeqra.memory import ModelSpec
    from edgeqra.profiles import load_profile

    profile = load_profile(REPO / "profiles" / f"{args.profile}.toml")
    hf = AutoConfig.from_pretrained(ARCH_DIR / arch)
    config = grid(ModelSpec.from_config(hf).n_units, args.n_mixed, args.seed, arch)[label]
    record = None
    for phase in phases:
        part = measure_config(
            hf,
            config,
            profile,
            work_dir=work,
            group_size=args.group_size,
            kernels=args.kernels.split(","),
            decode_tokens=args.decode_tokens,
            finetune_steps=args.finetune_steps,
            seed=args.seed,
            quantized_backward=args.quantized_backward,
            **_phase_args(phase),
        )
        if record is None:
            record = part
        else:
            record["phases"] += part["phases"]
            record["kernels"].update(part["kernels"])
            record.update({k: v for k, v in part.items() if k.startswith(("allocated_", "build_"))})
    return record


def _child(args: argparse.Namespace) -> None:
    """``--child arch/label/phase``: measure one phase in this fresh process, JSON to --out."""
    import torch

    from edgeqra.measure import cuda_context_bytes

    arch, label, phase = args.child.split("/")
    context = cuda_context_bytes()  # before anything else is on the GPU
    record = _measure_one(args, arch, label, [phase], args.work_dir)
    record["cuda_context_bytes"] = context
    record["environment"] = _environment()
    record["gpu_index"] = os.environ.get("CUDA_VISIBLE_DEVICES")
    record["max_reserved_any_phase"] = torch.cuda.max_memory_reserved()
    args.out.write_text(json.dumps(record))


def _run_children(args: argparse.Namespace, arch: str, label: str, work: Path, gpu: int) -> dict:
    """One fresh process per phase of one config, on one GPU; their records merged."""
    import subprocess

    env = {**os.environ, "CUDA_VISIBLE_DEVICES": str(gpu)}
    record: dict | None = None
    for phase in _wanted_phases(args):
        out = work / f"{phase}.json"
        cmd = [
            sys.executable, str(Path(__file__).resolve()), "--child", f"{arch}/{label}/{phase}",
            "--work-dir", str(work), "--out", str(out), "--profile", args.profile,
            "--kernels", args.kernels, "--group-size", str(args.group_size),
            "--decode-tokens", str(args.decode_tokens), "--n-mixed", str(args.n_mixed),
            "--finetune-steps", str(args.finetune_steps), "--seed", str(args.seed),
            "--quantized-backward", args.quantized_backward,
        ]  # fmt: skip
        # Our own script with arguments built here (no shell).
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)  # noqa: S603
        if done.returncode != 0 or not out.exists():
            tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
            part = {"phases": [{"mode": phase, "error": f"child exit {done.returncode}: {tail}"}],
                    "kernels": {}}  # fmt: skip
        else:
            part = json.loads(out.read_text())
        for ph in part["phases"]:
            ph["process"] = {k: part.get(k) for k in ("cuda_context_bytes", "gpu_index")}
        if record is None:
            record = part
        else:
            record["phases"] += part["phases"]
            record["kernels"].update(part.get("kernels", {}))
            record.update({k: v for k, v in part.items() if k.startswith(("allocated_", "build_"))})
    assert record is not None  # noqa: S101 - at least one phase
    return record


def measure(args: argparse.Namespace) -> dict:
    """GPU: the grid, one config at a time (or one per GPU), JSON rewritten after each."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from transformers import AutoConfig

    from edgeqra.gptq import write_random_checkpoint
    from edgeqra.memory import ModelSpec
    from edgeqra.profiles import load_profile
    from edgeqra.space import FP16_BITS

    start = time.perf_counter()
    profile = load_profile(REPO / "profiles" / f"{args.profile}.toml")
    payload: dict = {
        "profile": args.profile,
        "reserve_bytes": profile.reserve_bytes,
        "inference": vars(profile.inference),
        "finetune": vars(profile.finetune),
        "kernels_allowed": args.kernels.split(","),
        "group_size": args.group_size,
        "command": " ".join(sys.argv),
        "isolation": args.isolation,
        "fresh_process_per_phase": args.isolation == "phase",
        "quantized_backward": args.quantized_backward,
        "n_mixed": args.n_mixed,
        "seed": args.seed,
        "results": {},
        "skipped": [],
    }
    if args.isolation == "config":
        import gptqmodel  # noqa: F401 - its PYTORCH_ALLOC_CONF before CUDA starts
        import torch

        from edgeqra.measure import cuda_context_bytes

        if not torch.cuda.is_available():
            sys.exit("memory_truth needs a CUDA GPU; on CPU use --dry-run")
        payload["environment"] = _environment()
        payload["cuda_context_bytes"] = cuda_context_bytes()
    root = args.work_dir or Path(tempfile.mkdtemp(prefix="memtruth-"))
    jobs = []
    for arch in _archs(args.arch):
        hf = AutoConfig.from_pretrained(ARCH_DIR / arch)
        configs = grid(ModelSpec.from_config(hf).n_units, args.n_mixed, args.seed, arch)
        wanted = list(configs) if args.configs == "all" else args.configs.split(",")
        jobs += [(arch, hf, label, configs[label]) for label in wanted]
    if args.resume:
        jobs = _resume(args.out, payload, jobs)
    lock = threading.Lock()
    # The slowest config so far (a resumed file's too): do not start one that would overrun.
    kept = [r.get("seconds", 0.0) for rs in payload["results"].values() for r in rs]
    longest = [max(kept, default=0.0)]
    free_slots = [k % max(args.gpus, 1) for k in range(max(args.jobs, 1))]  # slot -> GPU

    def run(job) -> None:
        arch, hf, label, config = job
        with lock:
            if time.perf_counter() - start + longest[0] > args.time_limit:
                payload["skipped"].append(f"{arch}/{label}")
                return
            gpu = free_slots.pop()
        work = root / f"{arch}-{label}"
        work.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        try:
            if args.isolation == "config":
                record = _measure_one(args, arch, label, _wanted_phases(args), work)
            else:
                if any(c.bits < FP16_BITS for c in config):  # once, on the CPU, for 3 phases
                    write_random_checkpoint(
                        hf, config, work / "checkpoint", group_size=args.group_size,
                        seed=args.seed,
                    )  # fmt: skip
                record = _run_children(args, arch, label, work, gpu)
        finally:
            shutil.rmtree(work, ignore_errors=True)
            with lock:
                free_slots.append(gpu)
        record["label"] = label
        record["seconds"] = round(time.perf_counter() - t0, 1)
        with lock:
            longest[0] = max(longest[0], record["seconds"])
            for key in ("environment", "cuda_context_bytes"):
                if key in record and key not in payload:
                    payload[key] = record[key]
            payload["results"].setdefault(arch, []).append(record)
            print(json.dumps({"arch": arch, **record}), flush=True)
            _write(args.out, payload)

    workers = max(args.jobs, 1) if args.isolation == "phase" else 1
    with ThreadPoolExecutor(max_workers=workers) as pool:
        list(pool.map(run, jobs))
    order = {label: i for i, label in enumerate(_grid_labels(args.n_mixed))}
    for records in payload["results"].values():
        records.sort(key=lambda r: order.get(r["label"], len(order)))
    payload.setdefault("environment", {})
    payload["seconds"] = round(time.perf_counter() - start, 1)
    _write(args.out, payload)
    return payload


# What a resumed grid must share with the file it extends: the same rows, measured alike.
_RESUME_KEYS = ("profile", "kernels_allowed", "group_size", "isolation", "quantized_backward",
                "n_mixed", "seed")  # fmt: skip


def _complete(record: dict) -> bool:
    return bool(record.get("phases")) and all("measured" in ph for ph in record["phases"])


def grid_complete(payload: dict) -> bool:
    """Whether a grid's JSON holds every config it asked for, each with every phase measured
    (``run_issue15.sh queue`` asks this before it calls a grid done)."""
    records = [r for rs in payload.get("results", {}).values() for r in rs]
    return bool(records) and not payload.get("skipped") and all(map(_complete, records))


def _resume(path: Path | None, payload: dict, jobs: list) -> list:
    """Fill ``payload`` with the finished configs of ``path``; return the jobs still to run.

    A config with a failed or missing phase is measured again. A file measured with other
    settings is refused (one message, exit 2) rather than mixed into this grid.
    """
    if path is None or not path.exists():
        return jobs
    old = json.loads(path.read_text())
    differ = [k for k in _RESUME_KEYS if k in old and old[k] != payload[k]]
    if differ:
        print(f"--resume: {path} was measured with other settings ({', '.join(differ)}): "
              "use another --out, or the same settings", file=sys.stderr)  # fmt: skip
        sys.exit(2)
    for key in ("environment", "cuda_context_bytes"):
        if key in old:
            payload[key] = old[key]
    done = set()
    for arch, records in old.get("results", {}).items():
        for rec in records:
            if _complete(rec):
                payload["results"].setdefault(arch, []).append(rec)
                done.add((arch, rec["label"]))
    payload["command"] = f"{old.get('command', '')}; resumed: {payload['command']}".lstrip("; ")
    left = [job for job in jobs if (job[0], job[2]) not in done]
    print(f"resumed from {path}: configs kept {len(jobs) - len(left)}, to measure {len(left)}",
          flush=True)  # fmt: skip
    return left


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
    if args.child:
        _child(args)
    elif args.dry_run:
        _dry_table(dry_run(args))
    else:
        _table(measure(args))


if __name__ == "__main__":
    main()
