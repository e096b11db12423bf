"""Does the search pay? Joint search against what a user gets without it, at budgets in bits.

    # the benchmark (GPU; resumes from its run directories when called again):
    python bench/quality_at_budget.py --device cuda --tasks arc_easy piqa --budget-bits 3.5 4.0 \\
        --seeds 0 1 2 --out /root/qab
    # the fidelity check (Spearman of each rung's signal against the full-length score):
    python bench/quality_at_budget.py --device cuda --tasks arc_easy --fidelity-check 24 --out /root/qab
    # a smoke run on CPU (a random 4-layer Llama, minutes):
    python bench/quality_at_budget.py --tiny --device cpu --tasks arc_easy --budget-bits 3.5 \\
        --seeds 0 --steps 4 --evals 6 --n-eval 20 --n-train 32 --calib-samples 8 --out /tmp/qab

For every task, budget (``--budget-bits``: the predicted memory of a rank-8 config averaging
B bits on the profile) and seed (the search's and the final tuning's), with the same
full-length tuning steps and the same number of tuned evaluations for every search:

* **searches** (one run directory each, through ``run_search_job``, so a killed benchmark
  resumes from the journals): joint (stages 1-3), joint with nevergrad's Lengler (1+1) as
  stage 3, bits-only (rank 8), rank-only (bits fixed at ⌊B⌋), random search;
* **greedy, no tuning in the loop**: per-layer sensitivity (stage 1's KL) → a knapsack of bits
  under the budget (``space.fill`` over bits from the lowest width, rank 8: the way exllamav2's
  measurement pass picks per-layer bit rates), tuned once — the cheapest thing a user could do;
* **references**: every uniform rank-8 config (FP16, 8, 4, 3, 2 bits), tuned once per seed,
  marked whether it fits.

Prints per (task, budget, method) the final score's mean ± sd over the seeds, the gap of
uniform 3-bit → 4-bit the method recovers, the search's cost in fine-tuning epochs and wall
time; ``--out``/rows.json holds every row.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import multiprocessing
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from types import SimpleNamespace

from edgeqra.evaluate import EvalSettings
from edgeqra.memory import config_bytes
from edgeqra.models import cache_dir
from edgeqra.pipeline import EvalJob, SearchJob, open_run_dir, prepare, run_search_job
from edgeqra.plan import budget_for_bits
from edgeqra.profiles import load_profile
from edgeqra.search.bayes import BayesSettings
from edgeqra.search.driver import SearchSettings
from edgeqra.search.evolution import EvolutionSettings
from edgeqra.search.journal import Journal
from edgeqra.sensitivity import measure_sensitivity
from edgeqra.space import FP16_BITS, Config, fill

SEARCHES = ("joint", "joint, Lengler stage 3", "bits-only", "rank-only", "random")


def _search_jobs(base: SearchJob, bits: float) -> dict[str, SearchJob]:
    """The searches to compare at one budget, all derived from one job."""
    s = base.search
    # k configs screened at the lowest rung, k/eta promoted to the next, ...: ≈ evals in all.
    random_pop = max(2, round(s.evals / sum(s.eta**-k for k in range(s.rungs))))

    def job(ev=None, **changes) -> SearchJob:
        return dataclasses.replace(
            base, eval=ev or base.eval, search=dataclasses.replace(s, **changes)
        )

    floor_bits = max(b for b in base.eval.bits if b <= bits)
    return {
        "joint": job(bayes=dataclasses.replace(s.bayes, method="gp")),  # whatever the default
        "joint, Lengler stage 3": job(bayes=dataclasses.replace(s.bayes, method="lengler")),
        "bits-only": job(dataclasses.replace(base.eval, ranks=(8,))),
        "rank-only": job(dataclasses.replace(base.eval, bits=(floor_bits,))),
        "random": job(
            sensitivity=False,
            use_evolution=False,
            use_bayes=False,
            seed_baselines=False,
            evolution=dataclasses.replace(s.evolution, population=random_pop),
        ),
    }


def _run(item: tuple[dict, str, float]) -> tuple[dict, float]:
    """One search (in a worker process: the bank and sensitivity come from the disk cache).

    ``share`` is this worker's fraction of the GPU's memory: QAB_JOBS searches share one GPU,
    and a worker whose allocator kept what its largest scoring batch needed starved the others
    (PIQA on the H200, 2026-12-03: two workers held 44 GiB each, a third ran out). At the cap
    PyTorch frees its cached blocks and retries before it fails.
    """
    job_json, out, share = item
    job = SearchJob.from_json(job_json)
    if share < 1.0 and job.eval.device != "cpu":
        import torch

        if torch.cuda.is_available():
            torch.cuda.set_per_process_memory_fraction(share)
    run_dir = Path(out)
    summary_file = run_dir / "summary.json"
    if summary_file.is_file():  # finished in an earlier call
        return json.loads(summary_file.read_text()), 0.0
    start = time.perf_counter()
    with contextlib.redirect_stdout(sys.stderr):
        open_run_dir(run_dir, job, resume=(run_dir / "job.json").exists())
        summary = run_search_job(job, run_dir, progress=False)
    return summary, time.perf_counter() - start


def _prepare(job: EvalJob):
    """The evaluator with its bank, and stage 1's sensitivity (both cached on disk)."""
    with contextlib.redirect_stdout(sys.stderr):
        prepared = prepare(job)
        sens = measure_sensitivity(
            prepared.loaded, prepared.bank, prepared.calibration,
            cache_dir=cache_dir() / "sensitivity",
        )  # fmt: skip
    return prepared, sens


def _prebuild_banks(ev: EvalJob, seeds: set[int]) -> None:
    """Each search seed's GPTQ bank and sensitivity, built here once before the workers start.

    The bank and the calibration rows follow the tuning seed, and a worker builds what the
    disk cache lacks: on a fresh machine the eight workers of a call built the same three banks
    side by side and the GPU sat mostly idle for minutes (PIQA on the H200, 2026-12-03: a
    search's first evaluation came 4-6 minutes into a call). The bank now has a lock (one
    builder, the others wait), and building here first keeps the workers' start-up short and
    its time in the log.
    """
    for seed in sorted(seeds):
        start = time.perf_counter()
        prepared, _ = _prepare(
            dataclasses.replace(ev, tune=dataclasses.replace(ev.tune, seed=seed))
        )
        prepared.evaluator.close()
        del prepared
        took = time.perf_counter() - start
        print(f"{time.strftime('%H:%M:%S')} seed {seed}: bank and sensitivity ready ({took:.0f} s)")
    import torch

    if torch.cuda.is_available():  # what this process cached would be missing from the workers'
        torch.cuda.empty_cache()


def _spearman(a: list[float], b: list[float]) -> float:
    from scipy.stats import spearmanr

    return float(spearmanr(a, b).statistic)


def _fidelity_check(prepared, args, task: str, budget: int, memory, importance) -> list[dict]:
    """Rank correlation of each rung's signals with the full-length score over N configs."""
    import random

    space, n = prepared.space, prepared.space.n_units
    rng = random.Random(1234)
    configs = [
        Config.uniform(n, b, 8) for b in (4, 3, 2) if memory(Config.uniform(n, b, 8)) <= budget
    ]
    while len(configs) < args.fidelity_check:
        from edgeqra.space import repair

        c = fill(
            repair(space.sample(rng), space, memory, budget), space, memory, budget, importance
        )
        if c not in configs:
            configs.append(c)
    rungs = sorted({max(1, args.steps // args.eta**k) for k in (1, 2)})  # 16 and 4 steps
    # Each evaluation is appended to a cache as it finishes, so a call cut by the device's time
    # limit resumes where it stopped (bench/gpu/run_issue20.sh fidelity, called again).
    cache_file = args.out / f"fidelity-evals-{task}.jsonl"
    cache = {}
    if cache_file.is_file():
        for line in cache_file.read_text().splitlines():
            if line.strip():
                item = json.loads(line)
                cache[item["key"]] = SimpleNamespace(**item["result"])
    fields = ("score", "accuracy", "accuracy_norm", "loss", "train_loss")

    def evaluate(config: Config, f: int):
        key = f"{config.short()}|steps {f}|n_eval {args.n_eval}"
        if key not in cache:
            r = prepared.evaluator.evaluate(config, f)
            cache[key] = SimpleNamespace(**{k: getattr(r, k) for k in fields})
            with cache_file.open("a") as out:
                out.write(json.dumps({"key": key, "result": vars(cache[key])}) + "\n")
        return cache[key]

    results = {f: [evaluate(c, f) for c in configs] for f in [args.steps, *rungs]}
    full = [r.score for r in results[args.steps]]
    rows = []
    for f in rungs:
        signals = {
            "score": [r.score for r in results[f]],
            "acc": [r.accuracy or 0.0 for r in results[f]],
            "acc_norm": [r.accuracy_norm or 0.0 for r in results[f]],
            "-held-out loss": [-r.loss for r in results[f]],
            "-train loss": [-(r.train_loss or 0.0) for r in results[f]],
        }
        rows.append({"steps": f, **{k: _spearman(v, full) for k, v in signals.items()}})
    return rows


def _one_task(task: str, args: argparse.Namespace, rows: list[dict[str, object]]) -> list:
    """Every method for one task: references and greedy in this process, searches in workers.

    Returns the (method, bits, seed) keys of the searches that failed (their journals keep
    what they measured: the next call resumes them); none for the fidelity check.
    """
    ev = EvalJob(
        model=args.model,
        task=task,
        calib_samples=args.calib_samples,
        group_size=args.group_size,
        tune=dataclasses.replace(EvalJob().tune, steps=args.steps, batch_size=args.batch_size),
        eval=EvalSettings(n_train=args.n_train, n_eval=args.n_eval),
        device=args.device,
        profile=args.profile,
    )
    prepared, sens = _prepare(ev)  # references and greedy; the searches' banks: _prebuild_banks
    importance = sens.importance()
    profile = load_profile(args.profile)
    spec, space, n = prepared.spec, prepared.space, prepared.space.n_units
    n_train = len(prepared.evaluator.batches)

    memory = config_bytes(spec, profile, group_size=args.group_size)

    if args.fidelity_check:
        budget = budget_for_bits(spec, profile, 3.5, space.bits, group_size=args.group_size)
        table = _fidelity_check(prepared, args, task, budget, memory, importance)
        (args.out / f"fidelity-{task}.json").write_text(json.dumps(table, indent=2))
        print(f"\nfidelity check, {task}: Spearman vs the {args.steps}-step score")
        print("| steps | " + " | ".join(k for k in table[0] if k != "steps") + " |")
        print("|---|" + "---|" * (len(table[0]) - 1))
        for r in table:
            print(
                f"| {r['steps']} | "
                + " | ".join(f"{v:.2f}" for k, v in r.items() if k != "steps")
                + " |"
            )
        return []

    def row(method, bits, seed, config, score, evals, seconds, epochs, budget):
        rows.append(
            {
                "task": task, "budget_bits": bits, "method": method, "seed": seed,
                "score": score, "config": config.short(),
                "avg_bits": config.average_bits(spec.unit_params),
                "memory_gib": memory(config) / 2**30, "fits": memory(config) <= budget,
                "evaluations": evals, "seconds": seconds, "epochs": epochs,
            }
        )  # fmt: skip
        print(json.dumps(rows[-1]), flush=True)

    budgets = {
        b: budget_for_bits(spec, profile, b, space.bits, group_size=args.group_size)
        for b in args.budget_bits
    }
    # References and greedy are tuned in this process; a later call (the GPU runs resume across
    # sessions, bench/gpu/run_issue20.sh) reads them back from references.jsonl.
    ref_file = args.out / task / "references.jsonl"
    ref_file.parent.mkdir(parents=True, exist_ok=True)
    done = {}
    if ref_file.is_file():
        for line in ref_file.read_text().splitlines():
            if line.strip():
                item = json.loads(line)
                done[item["key"]] = item

    evaluator = prepared.evaluator

    def tuned(config: Config, seed: int):
        key = f"{config.short()}|seed {seed}|steps {args.steps}|n_eval {args.n_eval}"
        if key not in done:
            r = evaluator.evaluate(config, args.steps)
            done[key] = {"key": key, "score": r.score, "seconds": r.seconds}
            with ref_file.open("a") as f:
                f.write(json.dumps(done[key]) + "\n")
        return SimpleNamespace(score=done[key]["score"], seconds=done[key]["seconds"])

    for seed in args.seeds:  # references: every uniform rank-8 config, tuned once per seed
        settings = dataclasses.replace(prepared.evaluator.tune_settings, seed=seed)
        prepared.evaluator.tune_settings = settings  # the final tuning's seed
        for b in (FP16_BITS, *sorted(space.bits, reverse=True)):
            config = Config.uniform(n, b, 8)
            r = tuned(config, seed)
            for bits, budget in budgets.items():
                row(
                    f"uniform {b}-bit",
                    bits,
                    seed,
                    config,
                    r.score,
                    1,
                    r.seconds,
                    args.steps * args.batch_size / n_train,
                    budget,
                )
            if "greedy" in args.methods and b == space.bits[0]:
                for (
                    bits,
                    budget,
                ) in budgets.items():  # a knapsack of bits, no tuning in the loop
                    greedy = fill(config, space, memory, budget, importance, fields=("bits",))
                    g = tuned(greedy, seed)
                    row(
                        "greedy (sensitivity knapsack)",
                        bits,
                        seed,
                        greedy,
                        g.score,
                        1,
                        g.seconds,
                        args.steps * args.batch_size / n_train,
                        budget,
                    )
    prepared.evaluator.close()
    del prepared
    print(f"{time.strftime('%H:%M:%S')} {task}: references and greedy done", flush=True)

    work = []
    for bits in args.budget_bits:
        for seed in args.seeds:
            base = SearchJob(
                eval=dataclasses.replace(ev, tune=dataclasses.replace(ev.tune, seed=seed)),
                search=SearchSettings(
                    steps=args.search_steps, eta=args.eta, rungs=args.rungs, evals=args.evals,
                    evolution=EvolutionSettings(population=6, children=6, generations=4),
                    bayes=BayesSettings(max_rounds=6),
                ),
                budget_bits=bits,
                baselines=False,
                final_steps=args.steps,
            )  # fmt: skip
            for method, job in _search_jobs(base, bits).items():
                if method in args.methods:
                    folder = (
                        args.out
                        / task
                        / f"b{bits}"
                        / method.replace(" ", "_").replace(",", "")
                        / f"s{seed}"
                    )
                    work.append(((method, bits, seed), job.to_json(), str(folder)))
    _prebuild_banks(ev, {k[2] for k, _, o in work if not (Path(o) / "summary.json").is_file()})
    spawn = multiprocessing.get_context("spawn")  # the parent held a CUDA context
    share = 1.0 if args.jobs == 1 else 0.9 / args.jobs
    failed = []
    with ProcessPoolExecutor(max_workers=args.jobs, mp_context=spawn) as pool:
        futures = {pool.submit(_run, (j, o, share)): (k, o) for k, j, o in work}
        for future in as_completed(futures):
            key, folder = futures[future]
            try:
                summary, seconds = future.result()
            except Exception as err:  # noqa: BLE001 (one search failing must not stop the rest)
                failed.append(key)
                print(f"search {key} failed: {type(err).__name__}: {err}", flush=True)
                continue
            method, bits, seed = key
            chosen = summary["chosen"]
            # From the journal: summaries before 578dd02 counted only a resumed search's last call.
            steps = Journal(Path(folder) / "journal.jsonl").search_steps()
            epochs = steps * args.batch_size / n_train
            row(
                method, bits, seed, Config.parse(chosen["config"]), chosen["final"]["score"],
                summary["search"]["evaluations"], seconds, epochs, summary["budget_bytes"],
            )  # fmt: skip
    (args.out / "rows.json").write_text(json.dumps(rows, indent=2))
    return failed


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default="smollm2")
    p.add_argument("--tiny", action="store_true", help="a random 4-layer Llama (smoke run)")
    p.add_argument("--tasks", nargs="+", default=["arc_easy", "piqa"])
    p.add_argument("--profile", default="jetson-orin-nano-8gb")
    p.add_argument("--budget-bits", type=float, nargs="+", default=[3.5, 4.0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--methods", nargs="*", default=[*SEARCHES, "greedy"], help="searches + greedy")
    p.add_argument(
        "--steps", type=int, default=64, help="full-length tuning steps (every final tuning)"
    )
    p.add_argument(
        "--search-steps",
        type=int,
        default=16,
        help="the search's top rung; its pick is then tuned for --steps (the fidelity check: "
        "16 steps rank like 64, Spearman 0.88; 0.5 epoch of ARC-Easy is 281 steps)",
    )
    p.add_argument("--evals", type=int, default=32, help="evaluations per search (any fidelity)")
    p.add_argument("--eta", type=int, default=4)
    p.add_argument("--rungs", type=int, default=2, help="rungs up to --search-steps (4, 16)")
    p.add_argument("--n-train", type=int, default=None, help="train rows (default: all)")
    p.add_argument("--n-eval", type=int, default=None, help="eval items (default: all)")
    p.add_argument("--calib-samples", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--device", default="auto")
    p.add_argument(
        "--jobs", type=int, default=1, help="searches in parallel (1 on one GPU: RESULTS)"
    )
    p.add_argument(
        "--fidelity-check", type=int, default=0, metavar="N", help="only the check, N configs"
    )
    p.add_argument("--out", type=Path, required=True, help="folder for the run directories")
    args = p.parse_args()
    if args.tiny:
        sys.path.insert(0, str(Path(__file__).parent))
        from scaling import tiny_folder  # bench/scaling.py: a seeded 4-layer Llama + BPE

        args.model = str(tiny_folder(cache_dir()))
        args.group_size = 32
    args.out.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, object]] = []
    start = time.perf_counter()
    failed = []
    for task in args.tasks:
        failed += [(task, *key) for key in _one_task(task, args, rows)]
    if args.fidelity_check:
        return
    if failed:
        raise SystemExit(f"{len(failed)} searches failed: {failed}; run again to resume them")
    _print_table(rows)
    print(f"\ntotal {time.perf_counter() - start:.0f} s")


def _mean_of(rows: list[dict] | None) -> float:
    return statistics.fmean(r["score"] for r in rows) if rows else math.nan


def _print_table(rows: list[dict]) -> None:
    """Mean ± sd over seeds per (task, budget, method), and the 3→4-bit gap recovered."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["task"], r["budget_bits"], r["method"]), []).append(r)
    print(
        "\n| task | budget bits | method | score mean ± sd | seeds | gap 3→4 recovered | avg bits | fits | evals | epochs | wall s |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for (task, bits, method), rs in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1])):
        scores = [r["score"] for r in rs]
        mean = statistics.fmean(scores)
        sd = statistics.stdev(scores) if len(scores) > 1 else math.nan

        u3, u4 = (_mean_of(groups.get((task, bits, f"uniform {b}-bit"))) for b in (3, 4))
        gap = (mean - u3) / (u4 - u3) if u4 != u3 else math.nan
        print(
            f"| {task} | {bits} | {method} | {mean:.4f} ± {sd:.4f} | {len(rs)} | {gap:.0%} | "
            f"{statistics.fmean(r['avg_bits'] for r in rs):.2f} | {all(r['fits'] for r in rs)} | "
            f"{statistics.fmean(r['evaluations'] for r in rs):.0f} | "
            f"{statistics.fmean(r['epochs'] for r in rs):.2f} | {statistics.fmean(r['seconds'] for r in rs):.0f} |"
        )


if __name__ == "__main__":
    main()
