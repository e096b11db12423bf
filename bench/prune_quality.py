"""Pruning before the search (AutoMixQ, issue 17): what pruning buys over quantization alone.

For each pruning ratio (default 20 % and 30 %) and task (ARC-Easy and two more of AutoMixQ's
seven: BoolQ, PIQA), SmolLM2 is pruned with `edgeqra prune` (uniform layout, Taylor
importance on C4 calibration rows) and these are scored after the same tuning steps:

* unpruned FP16 LoRA r8 (the reference; once per task);
* unpruned uniform 4-bit and 3-bit r8, and the unpruned joint search at the pruned 4-bit
  model's memory (quantization alone at equal memory);
* pruned FP16 LoRA r8;
* pruned uniform 4-bit r8 (QLoRA-style on the pruned model);
* pruned joint search at the memory of the pruned uniform 4-bit r8 model.

Each row has the score, the predicted memory on the profile and, on a CUDA GPU, the measured
peak of a short fine-tuning step (`edgeqra.measure.measure_config`, random weights of the
row's shapes: memory does not depend on the values), each in a fresh process. Rows print as JSON lines as they land,
then a Markdown table for bench/RESULTS.md; everything goes to OUT/rows.json.

GPU (H200, 2026-12-02: arc_easy, piqa and boolq at 20 % and 30 % in three calls, 475 + 530 +
270 s; the kit of ../shared/gpu-kit carries torch-pruning and the data). Calls are limited to
10 minutes: repeat the same command with the same ``--out`` (finished rows are kept in
OUT/rows.jsonl, searches resume from their journals; carry rows.jsonl back to go on in a
later session), e.g.:

    python bench/prune_quality.py --device cuda --ratios 0.2 0.3 \
        --tasks arc_easy piqa boolq --steps 64 --evals 24 --out /tmp/prune_quality
    python bench/prune_quality.py --device cuda --remeasure --out /tmp/prune_quality  # memory only

CPU smoke run (minutes; scores mean nothing at this size):

    python bench/prune_quality.py --device cpu --ratios 0.2 --tasks arc_easy --steps 2 \
        --evals 4 --n-train 16 --n-eval 8 --calib-samples 8 --bits 4 8 --no-measure --out /tmp/pq
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from edgeqra.errors import EdgeQRAError
from edgeqra.evaluate import EvalSettings
from edgeqra.memory import ModelSpec, estimate_for_profile
from edgeqra.pipeline import EvalJob, SearchJob, open_run_dir, prepare, run_search_job
from edgeqra.profiles import load_profile
from edgeqra.prune import PruneSettings, prune_folder
from edgeqra.search.bayes import BayesSettings
from edgeqra.search.driver import SearchSettings
from edgeqra.search.evolution import EvolutionSettings
from edgeqra.space import FP16_BITS, Config
from edgeqra.tune import TuneSettings

RANK = 8


def _measured(model: str, config: Config, profile, group_size: int) -> dict | None:
    """Peak memory of a short LoRA fine-tuning step of ``config`` on this GPU (None on CPU).

    Measured in a fresh Python process: in this one the benchmark's own tuned models, banks
    and allocator cache are still on the GPU (2026-12-02: 0.2-0.3 GiB already allocated when
    the in-process measurement started), which a peak read here would count as the config's.
    """
    if not torch.cuda.is_available():
        return None
    import subprocess

    cmd = [sys.executable, str(Path(__file__).resolve()), "--measure-child", model,
           config.short(), "--profile", str(profile.path or profile.name), "--group-size", str(group_size),
           "--out", "-"]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)  # noqa: S603
    records = [line for line in done.stdout.splitlines() if line.startswith('{"peak_allocated"')]
    if done.returncode != 0 or not records:
        return {"error": (done.stderr.strip().splitlines() or ["no output"])[-1]}
    return json.loads(records[-1])  # the child's record (libraries may print around it)


def _measure_child(model: str, short: str, profile, group_size: int) -> None:
    """The fresh process of :func:`_measured`: one phase, its record as the last stdout line."""
    from transformers import AutoConfig

    from edgeqra.measure import measure_config
    from edgeqra.models import resolve_model

    hf_config = AutoConfig.from_pretrained(resolve_model(model), local_files_only=True)
    config = Config.parse(short)
    with tempfile.TemporaryDirectory(prefix="prune-quality-") as tmp:
        with contextlib.redirect_stdout(sys.stderr):
            record = measure_config(
                hf_config, config, profile, work_dir=Path(tmp), modes=("finetune",),
                checkpointing=(profile.finetune.gradient_checkpointing,),
                group_size=group_size, kernels=profile.kernels,
            )  # fmt: skip
    phase = record["phases"][0]
    peak = phase.get("measured", {}).get("peak_allocated")
    print(json.dumps({"peak_allocated": peak, "fresh_process": True, **phase}, default=str))


def _row_model(row: dict, base: str, out: Path) -> str:
    """The model folder a row was scored on (rows written before 'model' was recorded)."""
    if "model" in row:
        return row["model"]
    pruned = row["ratio"] > 0 and not row["method"].startswith("unpruned")
    return str(out / f"pruned-{row['ratio']:g}") if pruned else base


def _remeasure(journal: Path, base: str, profile, group_size: int, jobs: int = 1) -> None:
    """Measure every row of OUT/rows.jsonl again in fresh processes (atomic rewrite).

    ``jobs`` child processes run at once: each reads its own allocator and its own NVML
    process entry, so concurrent children on one GPU do not see each other's memory.
    """
    import threading
    from concurrent.futures import ThreadPoolExecutor

    rows = [json.loads(line) for line in journal.read_text().splitlines()]
    lock = threading.Lock()

    def one(row: dict) -> None:
        model = _row_model(row, base, journal.parent)
        measured = _measured(model, Config.parse(row["config"]), profile, group_size)
        with lock:
            row["model"], row["measured"] = model, measured
            print(json.dumps({k: row[k] for k in ("task", "ratio", "method")}
                             | {"peak": (measured or {}).get("peak_allocated")}), flush=True)  # fmt: skip
            tmp = journal.with_suffix(".jsonl.tmp")
            tmp.write_text("".join(json.dumps(r, default=str) + "\n" for r in rows))
            tmp.replace(journal)  # every finished row survives a cut-off call

    todo = [row for row in rows if row.get("config", "—") != "—"
            and not (row.get("measured") or {}).get("fresh_process")]  # fmt: skip
    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        list(pool.map(one, todo))


def _row(
    method: str, ratio: float, task: str, score: float, metric: str, memory: int, **extra
) -> dict:
    """One table row, printed as a JSON line."""
    row = {"ratio": ratio, "task": task, "method": method, "score": score, "metric": metric,
           "memory_gib": memory / 2**30, **extra}  # fmt: skip
    print(json.dumps(row, default=str), flush=True)
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default="smollm2")
    p.add_argument("--ratios", type=float, nargs="+", default=[0.2, 0.3])
    p.add_argument("--tasks", nargs="+", default=["arc_easy", "boolq", "piqa"])
    p.add_argument("--profile", default="jetson-orin-nano-8gb")
    p.add_argument("--importance", default="taylor", choices=["taylor", "magnitude"])
    p.add_argument("--steps", type=int, default=64, help="full-length tuning steps")
    p.add_argument("--evals", type=int, default=24, help="evaluations per search")
    p.add_argument("--n-train", type=int, default=1024)
    p.add_argument("--n-eval", type=int, default=500)
    p.add_argument("--calib-samples", type=int, default=64)
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--bits", type=int, nargs="+", default=[2, 3, 4, 8], help="search space Q")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--measure", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--remeasure", action="store_true",
                   help="only measure OUT/rows.jsonl's rows again, each in a fresh process")  # fmt: skip
    p.add_argument("--jobs", type=int, default=1, help="--remeasure: child processes at once")
    p.add_argument("--measure-child", nargs=2, metavar=("MODEL", "CONFIG"), help=argparse.SUPPRESS)
    args = p.parse_args()
    profile = load_profile(args.profile)
    if args.measure_child:
        _measure_child(*args.measure_child, profile, args.group_size)
        return
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()

    pruned: dict[float, Path] = {}
    for ratio in args.ratios:  # one pruned folder per ratio, shared by the tasks
        folder = args.out / f"pruned-{ratio:g}"
        if not folder.exists():
            settings = PruneSettings(
                ratio=ratio, importance=args.importance, calib_samples=args.calib_samples,
                seed=args.seed, round_to=max(32, args.group_size),
            )  # fmt: skip
            with contextlib.redirect_stdout(sys.stderr):
                prune_folder(args.model, folder, settings, device=args.device)
        pruned[ratio] = folder
    if args.remeasure:  # after pruning: a carried-back rows.jsonl names folders made here
        _remeasure(args.out / "rows.jsonl", args.model, profile, args.group_size, args.jobs)
        return

    def job(model: str, task: str) -> EvalJob:
        return EvalJob(
            model=model, task=task, calib_samples=args.calib_samples, bits=tuple(args.bits),
            group_size=args.group_size, device=args.device, profile=args.profile,
            tune=TuneSettings(steps=args.steps, seed=args.seed),
            eval=EvalSettings(n_train=args.n_train, n_eval=args.n_eval),
        )  # fmt: skip

    def evaluate(model: str, task: str, config: Config) -> tuple[object, int]:
        needed = tuple(sorted({c.bits for c in config if c.bits < FP16_BITS}))
        with contextlib.redirect_stdout(sys.stderr):
            prepared = prepare(job(model, task), needed_bits=needed, progress=False)
            result = prepared.evaluator.evaluate(config, args.steps)
        mem = estimate_for_profile(prepared.spec, config, profile, group_size=args.group_size)
        return result, mem.total

    def search(model: str, task: str, budget: int, name: str) -> dict:
        ev = job(model, task)
        sj = SearchJob(
            eval=ev,
            search=SearchSettings(
                steps=args.steps, evals=args.evals,
                evolution=EvolutionSettings(population=6, children=6, generations=4),
                bayes=BayesSettings(max_rounds=6),
            ),
            budget_gb=budget / 2**30,
            baselines=False,
        )  # fmt: skip
        run = args.out / name
        with contextlib.redirect_stdout(sys.stderr):
            open_run_dir(run, sj, resume=(run / "job.json").exists())
            return run_search_job(sj, run, progress=False)

    def measured(model: str, config: Config) -> dict | None:
        return _measured(model, config, profile, args.group_size) if args.measure else None

    from transformers import AutoConfig

    from edgeqra.models import resolve_model

    # Pruning keeps every layer: one (bits, rank) per layer on both models.
    n = ModelSpec.from_config(AutoConfig.from_pretrained(resolve_model(args.model))).n_units
    # Rows land in OUT/rows.jsonl as they finish; a rerun with the same OUT skips them (and the
    # searches resume from their journals), so the benchmark can run in several short calls.
    journal = args.out / "rows.jsonl"
    done = {}
    if journal.is_file():
        for line in journal.read_text().splitlines():
            r = json.loads(line)
            done[(r["task"], r["ratio"], r["method"])] = r
    rows: list[dict] = []

    def cached(task: str, ratio: float, label: str) -> bool:
        row = done.get((task, ratio, label))
        if row is not None:
            rows.append(row)
        return row is not None

    def keep(row: dict) -> None:
        rows.append(row)
        with journal.open("a") as handle:
            handle.write(json.dumps(row, default=str) + "\n")

    for task in args.tasks:
        for label, bits in (("unpruned FP16 LoRA", FP16_BITS), ("unpruned uniform 4-bit", 4),
                            ("unpruned uniform 3-bit", 3)):  # fmt: skip
            if cached(task, 0.0, label):
                continue
            config = Config.uniform(n, bits, RANK)
            result, mem = evaluate(args.model, task, config)
            keep(_row(label, 0.0, task, result.score, result.metric, mem,
                      config=config.short(), model=args.model,
                      measured=measured(args.model, config)))  # fmt: skip
        for ratio, folder in pruned.items():
            for label, bits in (("pruned FP16 LoRA", FP16_BITS), ("pruned uniform 4-bit", 4)):
                if cached(task, ratio, label):
                    continue
                config = Config.uniform(n, bits, RANK)
                result, mem = evaluate(str(folder), task, config)
                keep(_row(label, ratio, task, result.score, result.metric, mem,
                          config=config.short(), model=str(folder),
                          measured=measured(str(folder), config)))  # fmt: skip
            budget = rows[-1]["memory_gib"] * 2**30  # the pruned uniform 4-bit model's memory
            for label, model in (
                ("pruned + joint search", str(folder)),
                ("unpruned joint search (same memory)", args.model),
            ):
                if cached(task, ratio, label):
                    continue
                name = f"{task}-{ratio:g}-{'pruned' if model != args.model else 'unpruned'}"
                try:
                    summary = search(model, task, int(budget), name)
                except EdgeQRAError as exc:  # e.g. nothing of the unpruned model fits there
                    keep(_row(label, ratio, task, None, "", int(budget), config="—",
                              error=str(exc)))  # fmt: skip
                    continue
                chosen = summary["chosen"]
                config = Config.parse(chosen["config"])
                final = chosen["final"]
                keep(_row(label, ratio, task, final["score"], final["metric"],
                          chosen["predicted_memory_bytes"], config=config.short(),
                          evaluations=summary["search"]["evaluations"], model=model,
                          measured=measured(model, config)))  # fmt: skip

    took = time.perf_counter() - start
    print(f"\n{args.model} on {args.profile}, {args.steps} steps, {took:.0f} s\n")
    print("| task | pruned | method | score | predicted GiB | measured peak GiB | config |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        peak = (r.get("measured") or {}).get("peak_allocated")
        score = f"{r['score']:.4f} ({r['metric']})" if r["score"] is not None else "—"
        measured_gib = "—" if peak is None else f"{peak / 2**30:.3f}"
        print(
            f"| {r['task']} | {r['ratio']:.0%} | {r['method']} | {score} "
            f"| {r['memory_gib']:.3f} | {measured_gib} | `{r['config']}` |"
        )
    (args.out / "rows.json").write_text(json.dumps(rows, indent=2, default=str))


if __name__ == "__main__":
    main()
