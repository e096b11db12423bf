"""Evaluations per hour with 1 vs 2 (or more) workers, per executor (issue 8).

One batch of ``--evals`` seeded, feasible configs at one fidelity goes through each
executor (the batch a successive-halving rung hands it); the figure is the steady-state
throughput, worker start-up (model load in each worker) timed apart. Every executor must
return the same scores as the local one; the script checks it and says so.

CPU (the dev machine; a small random Llama, bank built in seconds):

    python bench/scaling.py --tiny --device cpu --evals 8 --steps 4

GPU (not run yet): 1 vs 2 workers on one GPU, then on two GPUs:

    CUDA_VISIBLE_DEVICES=0 python bench/scaling.py --executors local processes:1 processes:2 ray:1 ray:2
    CUDA_VISIBLE_DEVICES=0,1 python bench/scaling.py --executors local processes:2 ray:2

``processes:N`` / ``ray:N`` start N workers; on one GPU they share it (Ray gives each
``num_gpus=1/N``), on several GPUs worker i takes GPU i mod count.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import socket
import sys
import time
from pathlib import Path

import torch

from edgeqra.evaluate import EvalSettings
from edgeqra.models import cache_dir
from edgeqra.pipeline import EvalJob, EvalWorkerJob, prepare
from edgeqra.search.executors import ExecutorSettings, Task, make_executor
from edgeqra.space import Config
from edgeqra.tune import TuneSettings


def tiny_folder(root: Path) -> Path:
    """A seeded random 4-layer Llama (hidden 128) with a 512-token byte-level BPE, saved once.

    Small enough that an evaluation takes seconds on a shared 2-core CPU (SmolLM2's 49k
    vocabulary alone made one step 9 s there): the figure is about the executors.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from edgeqra.data import load_task

    folder = root / "scaling-tiny-llama"
    if (folder / "config.json").is_file():
        return folder
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    task = load_task("arc_easy", seed=0, n_train=512, n_eval=50)
    corpus = [e.prompt + e.completion for e in task.train]
    tok.train_from_iterator(corpus, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>"
    )
    config = LlamaConfig(
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=len(tokenizer),
        max_position_embeddings=512,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def configs(n_units: int, bits: tuple[int, ...], ranks: tuple[int, ...], n: int, seed: int):
    """``n`` distinct seeded random configs."""
    rng = random.Random(seed)
    out: dict[Config, None] = {}
    while len(out) < n:
        out[Config.from_pairs([(rng.choice(bits), rng.choice(ranks)) for _ in range(n_units)])] = (
            None
        )
    return list(out)


def measure(executor, tasks: list[Task]) -> tuple[float, dict[str, float]]:
    """Seconds for the batch and each config's score."""
    start = time.perf_counter()
    scores = {}
    for done in executor.run(tasks):
        if done.result is None:
            raise RuntimeError(f"{done.task.config.short()} failed: {done.error}")
        scores[str(done.task.config)] = done.result.score
    return time.perf_counter() - start, scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--tiny", action="store_true", help="a small random Llama instead")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--evals", type=int, default=8, help="configs in the batch")
    parser.add_argument("--steps", type=int, default=8, help="tuning steps per evaluation")
    parser.add_argument("--bits", default="4,8")
    parser.add_argument("--n-train", type=int, default=64)
    parser.add_argument("--n-eval", type=int, default=40)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--calib-samples", type=int, default=8)
    parser.add_argument(
        "--executors",
        nargs="+",
        default=["local", "processes:1", "processes:2", "ray:1", "ray:2"],
        help="local, processes:N, ray:N",
    )
    parser.add_argument(
        "--threads",
        type=int,
        help="torch threads in the driver (local) and in every CPU worker; default: the "
        "cores shared out evenly (on a shared, oversubscribed CPU use 1: OpenMP threads that "
        "spin for a busy core made 2-thread matmuls ~10x slower than 1-thread ones there)",
    )
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")
    if args.threads:
        torch.set_num_threads(args.threads)

    model = str(tiny_folder(cache_dir())) if args.tiny else args.model
    bits = tuple(int(b) for b in args.bits.split(","))
    job = EvalJob(
        model=model,
        task="arc_easy",
        bits=bits,
        ranks=(4, 8, 16),
        group_size=32 if args.tiny else 64,
        calib_samples=args.calib_samples,
        tune=TuneSettings(steps=args.steps, batch_size=4, seed=0),
        eval=EvalSettings(n_train=args.n_train, n_eval=args.n_eval, seq_len=args.seq_len),
        device=args.device,
    )
    start = time.perf_counter()
    prepared = prepare(job, progress=False)  # the driver builds the bank once
    print(f"driver prepare (model, data, bank): {time.perf_counter() - start:.1f} s")
    worker_job = EvalWorkerJob(job, None, str(prepared.bank.root), str(prepared.loaded.path))
    batch = configs(prepared.space.n_units, bits, job.ranks, args.evals, seed=0)
    tasks = [Task(i, c, args.steps) for i, c in enumerate(batch)]

    rows, reference = [], None
    for name in args.executors:
        kind, _, n = name.partition(":")
        settings = ExecutorSettings(kind, workers=int(n) if n else None)
        start = time.perf_counter()
        executor = make_executor(
            settings,
            local=prepared.evaluator.evaluate,
            job=worker_job,
            device=prepared.device,
            threads=args.threads,
        )
        with executor:
            # Start-up: one task per worker (each builds its evaluator, then evaluates).
            warm = [Task(i, c, args.steps) for i, c in enumerate(batch[: executor.width])]
            measure(executor, warm)
            startup = time.perf_counter() - start
            seconds, scores = measure(executor, tasks)
        same = reference is None or scores == reference
        reference = reference or scores
        row = {
            "executor": name,
            "workers": executor.width,
            "startup_s": round(startup, 1),
            "batch_s": round(seconds, 1),
            "evals_per_hour": round(3600 * len(tasks) / seconds),
            "same_scores_as_first": same,
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
    base = rows[0]["evals_per_hour"]
    print()
    print(f"| executor | workers | start-up s | {len(tasks)} evals s | evals/hour | speed-up |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['executor']} | {r['workers']} | {r['startup_s']} | {r['batch_s']} | "
            f"{r['evals_per_hour']} | {r['evals_per_hour'] / base:.2f}x |"
        )
    machine = {
        "host": socket.gethostname(),
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
        "python": platform.python_version(),
        "argv": sys.argv,
    }
    print(json.dumps(machine))
    if args.json:
        args.json.write_text(json.dumps({"machine": machine, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
