"""Quality at a fixed memory budget: the joint search against baselines and ablations.

The budget is the predicted memory of uniform 4-bit GPTQ with rank-8 LoRA on the profile;
every method gets the same tuning steps per full-length evaluation and (for the searches) the
same number of evaluations. Methods:

* uniform 4-bit r8, uniform 8-bit r8, FP16 LoRA r8 (scored whether or not they fit);
* joint search (stages 1-3), bits-only (rank fixed 8), rank-only (bits fixed 4), random
  search (same evaluations, no stage 1/2/3), and the joint search without stage 1 / 2 / 3.

The bank and the sensitivity profile are built once in this process (cached on disk); the
searches then run as parallel worker processes: one evaluation is launch-bound on a GPU, so
several share it well.

    python bench/quality_at_budget.py --device cuda --jobs 8 --out /tmp/qab
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import multiprocessing
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

import torch

from edgeqra.evaluate import EvalSettings
from edgeqra.memory import estimate_for_profile
from edgeqra.models import cache_dir
from edgeqra.pipeline import EvalJob, SearchJob, open_run_dir, prepare, run_search_job
from edgeqra.profiles import load_profile
from edgeqra.search.bayes import BayesSettings
from edgeqra.search.driver import SearchSettings
from edgeqra.search.evolution import EvolutionSettings
from edgeqra.sensitivity import measure_sensitivity
from edgeqra.space import FP16_BITS, Config
from edgeqra.tune import TuneSettings


def _methods(base: SearchJob, evals: int) -> dict[str, SearchJob]:
    """The searches to compare, all derived from one job."""
    s = base.search
    random_pop = max(2, round(evals * 0.75))  # k + k/eta + k/eta² ≈ evals with eta = 4

    def job(**changes) -> SearchJob:
        ev = changes.pop("eval", base.eval)
        return dataclasses.replace(base, eval=ev, search=dataclasses.replace(s, **changes))

    return {
        "joint search": job(),
        "bits-only search (rank 8)": job(eval=dataclasses.replace(base.eval, ranks=(8,))),
        "rank-only search (4-bit)": job(eval=dataclasses.replace(base.eval, bits=(4,))),
        "random search": job(
            use_sensitivity=False,
            use_evolution=False,
            use_bayes=False,
            seed_baselines=False,
            evolution=dataclasses.replace(s.evolution, population=random_pop),
        ),
        "joint without stage 1": job(use_sensitivity=False),
        "joint without stage 2": job(use_evolution=False),
        "joint without stage 3": job(use_bayes=False),
    }


def _run(args: tuple[str, dict, str]) -> tuple[str, dict, float]:
    """One search in a worker process (the bank and sensitivity come from the disk cache)."""
    name, job_json, out = args
    job = SearchJob.from_json(job_json)
    start = time.perf_counter()
    with contextlib.redirect_stdout(sys.stderr):
        run_dir = Path(out)
        open_run_dir(run_dir, job, resume=(run_dir / "job.json").exists())
        summary = run_search_job(job, run_dir, progress=False)
    return name, summary, time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default="smollm2")
    p.add_argument("--task", default="arc_easy")
    p.add_argument("--profile", default="jetson-orin-nano-8gb")
    p.add_argument("--steps", type=int, default=32, help="full-length tuning steps")
    p.add_argument("--evals", type=int, default=24, help="evaluations per search")
    p.add_argument("--n-train", type=int, default=1024)
    p.add_argument("--n-eval", type=int, default=200)
    p.add_argument("--calib-samples", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--calib-seq-len", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--jobs", type=int, default=1, help="searches run in parallel")
    p.add_argument("--out", type=Path, required=True, help="folder for the run directories")
    p.add_argument("--only", nargs="*", help="run only these methods")
    args = p.parse_args()

    ev = EvalJob(
        model=args.model,
        task=args.task,
        calib_samples=args.calib_samples,
        calib_seq_len=args.calib_seq_len,
        group_size=args.group_size,
        tune=TuneSettings(steps=args.steps, batch_size=args.batch_size, seed=args.seed),
        eval=EvalSettings(n_train=args.n_train, n_eval=args.n_eval),
        device=args.device,
        profile=args.profile,
    )
    start = time.perf_counter()
    with contextlib.redirect_stdout(sys.stderr):
        prepared = prepare(ev)  # builds the bank once for every worker
        measure_sensitivity(
            prepared.loaded,
            prepared.bank,
            prepared.calibration,
            cache_dir=cache_dir() / "sensitivity",
        )
    prep_seconds = time.perf_counter() - start
    profile = load_profile(args.profile)
    spec, n = prepared.spec, prepared.space.n_units
    budget = estimate_for_profile(
        spec, Config.uniform(n, 4, 8), profile, group_size=ev.group_size
    ).total
    base = SearchJob(
        eval=ev,
        search=SearchSettings(
            steps=args.steps,
            max_evals=args.evals,
            seed=args.seed,
            evolution=EvolutionSettings(population=6, children=6, generations=4),
            bayes=BayesSettings(max_rounds=6, seed=args.seed),
        ),
        budget_gb=budget / 2**30,
        baselines=False,
    )

    rows: list[dict[str, object]] = []
    for label, config in {
        "uniform 4-bit r8": Config.uniform(n, 4, 8),
        "uniform 8-bit r8": Config.uniform(n, 8, 8),
        "FP16 LoRA r8": Config.uniform(n, FP16_BITS, 8),
    }.items():
        r = prepared.evaluator.evaluate(config, args.steps)
        mem = estimate_for_profile(spec, config, profile, group_size=ev.group_size).total
        rows.append(
            {
                "method": label,
                "score": r.score,
                "metric": r.metric,
                "avg_bits": config.average_bits(spec.unit_params),
                "memory_gib": mem / 2**30,
                "fits": mem <= budget,
                "evaluations": 1,
                "seconds": r.seconds,
                "epochs": args.steps * args.batch_size / len(prepared.evaluator.batches),
                "config": config.short(),
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    del prepared
    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # the workers need the GPU memory the bank build held

    methods = _methods(base, args.evals)
    if args.only:
        methods = {k: v for k, v in methods.items() if k in args.only}
    work = [
        (name, job.to_json(), str(args.out / name.replace(" ", "_")))
        for name, job in methods.items()
    ]
    args.out.mkdir(parents=True, exist_ok=True)
    # spawn, not fork: the parent already holds a CUDA context.
    spawn = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=args.jobs, mp_context=spawn) as pool:
        futures = [pool.submit(_run, item) for item in work]
        for future in as_completed(futures):  # rows land as searches finish
            name, summary, seconds = future.result()
            chosen = summary["chosen"]
            rows.append(
                {
                    "method": name,
                    "score": chosen["final"]["score"],
                    "metric": chosen["final"]["metric"],
                    "avg_bits": chosen["average_bits"],
                    "memory_gib": chosen["predicted_memory_bytes"] / 2**30,
                    "fits": chosen["fits"],
                    "evaluations": summary["search"]["evaluations"],
                    "seconds": seconds,
                    "epochs": summary["search"]["epochs"],
                    "config": chosen["short"],
                }
            )
            print(json.dumps(rows[-1]), flush=True)

    print(
        f"\nbudget {budget / 2**30:.4f} GiB on {args.profile} (uniform 4-bit r8); "
        f"bank + sensitivity {prep_seconds:.0f} s; total {time.perf_counter() - start:.0f} s\n"
    )
    print("| method | score | avg bits | memory GiB | fits | evals | wall s | epochs | config |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['method']} | {r['score']:.4f} ({r['metric']}) | {r['avg_bits']:.2f} | "
            f"{r['memory_gib']:.4f} | {'yes' if r['fits'] else 'no'} | {r['evaluations']} | "
            f"{r['seconds']:.0f} | {r['epochs']:.2f} | `{r['config']}` |"
        )
    (args.out / "rows.json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
