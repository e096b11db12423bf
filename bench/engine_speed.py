"""The fast evaluation engine against today's eager path, side by side in one run (issue 16).

    python bench/engine_speed.py --device cuda --out engine.json        # H200: ~3 min
    python bench/engine_speed.py --tiny --device cpu --steps 3 --eager-steps 2 --n-eval 20  # smoke

Measures on SmolLM2-135M-Instruct (bf16 base on a GPU, fp32 adapters, LoRA on all seven
projections):

1. the tuning step at batch B × 256 (rows of 256 real tokens, so nothing is trimmed):
   eager PEFT (`tune.tune`, today's engine), the padded engine stepping eagerly, and the
   padded engine replaying one CUDA graph; the capture's cost; larger micro-batches;
2. loss curves of the eager reference and the graph engine on the same ARC-Easy rows and
   seed (max |Δloss| over the steps);
3. scoring every ARC-Easy validation item: today's per-request loop (batch 16, kept here
   verbatim as `_old_score_requests`) against the batched scorer, and their max |Δ loglik|;
4. one evaluation end to end (assemble from a 4-bit bank + attach/reset + N steps + score
   all items) with each engine.

Prints markdown tables for bench/RESULTS.md; --out writes the raw figures as JSON.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from edgeqra import scoring as ev
from edgeqra.bank import BankSpec, build_bank
from edgeqra.data import calibration_batches, load_task
from edgeqra.device import eval_mode, model_device
from edgeqra.engine import EngineSettings, GraphLoRA
from edgeqra.evaluate import EvalSettings, Evaluator
from edgeqra.models import load_model
from edgeqra.space import Choice, Config
from edgeqra.tune import TrainBatches, TuneSettings, detach_lora, tune


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _old_score_requests(model, requests, pad, batch_size):
    """Today's scorer before issue 16 (one log_softmax and one host sync per request)."""
    device = model_device(model)
    order = sorted(range(len(requests)), key=lambda i: (-len(requests[i].tokens), i))
    out = [0.0] * len(requests)
    for start in range(0, len(order), batch_size):
        idx = [i for i in order[start : start + batch_size] if requests[i].n]
        if not idx:
            continue
        rows = [requests[i] for i in idx]
        ids, mask = ev._right_pad([r.tokens for r in rows], pad, device)
        width = ids.shape[1]
        first = min(len(r.tokens) - r.n for r in rows)
        logits = ev._logits(model, ids, mask, keep=width - first)
        for j, (i, r) in enumerate(zip(idx, rows, strict=True)):
            end = len(r.tokens) - first
            logp = F.log_softmax(logits[j, end - r.n : end].float(), dim=-1)
            target = torch.tensor(r.targets, dtype=torch.long, device=device)
            out[i] = float(logp.gather(-1, target[:, None]).sum())
    return out


def _full_rows(vocab: int, n: int, seq: int) -> TrainBatches:
    """n rows of seq real tokens, the first 16 unlabelled: a step at exactly B × seq."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (n, seq), generator=g)
    labels = ids.clone()
    labels[:, :16] = -100
    return TrainBatches(ids, labels, torch.ones_like(ids))


def _mixed(n_units: int, seed: int = 0) -> Config:
    """A fixed mixed-rank 4-bit config (ranks 0-32)."""
    g = torch.Generator().manual_seed(seed)
    ranks = (0, 4, 8, 16, 32)
    return Config(
        tuple(Choice(4, ranks[int(torch.randint(0, 5, (1,), generator=g))]) for _ in range(n_units))
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="a small random Llama (smoke run)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=100, help="timed steps per measurement")
    parser.add_argument("--eager-steps", type=int, default=20, help="timed eager PEFT steps")
    parser.add_argument("--batches", type=int, nargs="+", default=[4, 16, 32])
    parser.add_argument(
        "--compile-batches", type=int, nargs="*", default=[4], help="also time compile + graph"
    )
    parser.add_argument(
        "--parts", nargs="+", default=["step", "curve", "score", "e2e"], help="what to measure"
    )
    parser.add_argument("--curve-steps", type=int, default=64)
    parser.add_argument("--n-eval", type=int, default=None, help="ARC-Easy items (None: all 570)")
    parser.add_argument("--fidelity", type=int, default=64)
    parser.add_argument("--calib-samples", type=int, default=32)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    dev = args.device
    figures: dict[str, object] = {
        "args": vars(args) | {"out": str(args.out)},
        "torch": torch.__version__,
    }
    figures["machine"] = (
        torch.cuda.get_device_name() if dev.startswith("cuda") else platform.processor()
    )
    dtype = torch.bfloat16 if dev.startswith("cuda") else torch.float32
    if args.tiny:
        from scaling import tiny_folder  # bench/scaling.py: a seeded 4-layer Llama + BPE

        from edgeqra.models import cache_dir

        name = str(tiny_folder(cache_dir()))
    else:
        name = "smollm2"
    loaded = load_model(name, dtype=dtype, device=dev)
    model, units = loaded.model, loaded.units
    vocab = model.config.vocab_size
    config = Config.uniform(len(units), 16, 8)  # rank 8 everywhere: the step

    # 1. the step
    step_ms: dict[str, dict[int, float]] = {
        "eager PEFT": {},
        "padded, eager": {},
        "padded, CUDA graph": {},
    }
    capture_s: dict[int, float] = {}
    for bs in args.batches if "step" in args.parts else []:
        rows = _full_rows(vocab, max(64, bs * 4), 256)
        s = TuneSettings(steps=args.eager_steps, batch_size=bs)
        tune(model, units, config, rows, TuneSettings(steps=2, batch_size=bs))[0]  # warm-up
        detach_lora(model)
        tuned, log_ = tune(model, units, config, rows, s)
        detach_lora(tuned)
        step_ms["eager PEFT"][bs] = 1000 * log_.seconds / len(log_.losses)
        variants = [("padded, eager", False, False), ("padded, CUDA graph", True, False)]
        if bs in args.compile_batches:
            variants.append(("padded, compile + CUDA graph", True, True))
        for name, graphs, compiled in variants:
            step_ms.setdefault(name, {})
            engine = GraphLoRA(
                model, units, 2.0, EngineSettings(max_rank=32, graphs=graphs, compile=compiled)
            )
            steps = args.eager_steps if not graphs else args.steps
            engine.train(config, rows, TuneSettings(steps=2, batch_size=bs))  # capture / warm-up
            if graphs:
                capture_s[f"{bs}{' compiled' if compiled else ''}"] = engine.capture_seconds
            _sync(dev)
            t = time.perf_counter()
            out = engine.train(config, rows, TuneSettings(steps=steps, batch_size=bs))
            _sync(dev)
            step_ms[name][bs] = 1000 * (time.perf_counter() - t) / len(out.losses)
            engine.close()
        print({k: {b: round(v, 2) for b, v in d.items()} for k, d in step_ms.items()}, flush=True)
    figures["step_ms"] = step_ms
    figures["capture_s"] = capture_s

    # 2. loss curves on real rows
    task = load_task("arc_easy", n_train=1024, n_eval=args.n_eval)
    mixed = _mixed(len(units))
    if "curve" in args.parts:
        from edgeqra.data import tokenize_examples

        rows = TrainBatches(*tokenize_examples(loaded.tokenizer, task.train, 256))
        s = TuneSettings(steps=args.curve_steps, batch_size=4, seed=0)
        tuned, ref = tune(model, units, mixed, rows, s)
        detach_lora(tuned)
        engine = GraphLoRA(model, units, 2.0)
        got = engine.train(mixed, rows, s)
        engine.close()
        diffs = [abs(a - b) for a, b in zip(ref.losses, got.losses, strict=True)]
        figures["curve"] = {
            "config": mixed.short(),
            "steps": args.curve_steps,
            "max_abs_diff": max(diffs),
            "first": [ref.losses[0], got.losses[0]],
            "last": [ref.losses[-1], got.losses[-1]],
            "mean_ref": sum(ref.losses) / len(ref.losses),
            "mean_graph": sum(got.losses) / len(got.losses),
        }
        print(figures["curve"], flush=True)

    # 3. scoring every validation item
    if "score" in args.parts:
        requests = ev._mc_requests(model, loaded.tokenizer, task.eval_mc, None)
        pad = ev._pad_id(loaded.tokenizer)
        timing = {}
        with torch.no_grad(), eval_mode(model):
            ev._score_requests(model, requests[:256], pad, 256)  # warm-up
            _old_score_requests(model, requests[:64], pad, 16)
            for name, fn, bs in (
                ("today (batch 16, per-request sync)", _old_score_requests, 16),
                ("batched, 16", ev._score_requests, 16),
                ("batched, 256", ev._score_requests, 256),
                ("batched, 512", ev._score_requests, 512),
            ):
                _sync(dev)
                t = time.perf_counter()
                values = fn(model, requests, pad, bs)
                _sync(dev)
                timing[name] = (time.perf_counter() - t, values)
        base = timing["today (batch 16, per-request sync)"][1]
        figures["scoring"] = {
            "items": len(task.eval_mc),
            "requests": len(requests),
            "seconds": {k: v[0] for k, v in timing.items()},
            "max_abs_diff_vs_today": {
                k: max(abs(a - b) for a, b in zip(v[1], base, strict=True))
                for k, v in timing.items()
            },
        }
        print(figures["scoring"], flush=True)

    # 4. one evaluation end to end
    if "e2e" in args.parts:
        calibration = calibration_batches(
            loaded.tokenizer, "c4", n_samples=args.calib_samples, seq_len=256
        )
        with tempfile.TemporaryDirectory() as cache:
            t = time.perf_counter()
            bank = build_bank(
                loaded.path,
                units,
                calibration,
                BankSpec(bits=(4,)),
                cache_root=Path(cache),
                device=dev,
                progress=False,
            )
            figures["bank_4bit_s"] = time.perf_counter() - t
            e2e = {}
            for engine_name in ("eager", "graph"):
                evaluator = Evaluator(
                    loaded,
                    task,
                    bank,
                    TuneSettings(steps=0, batch_size=4),
                    EvalSettings(seq_len=256, n_eval=args.n_eval),
                    engine=engine_name,
                )
                first = evaluator.evaluate(mixed, args.fidelity)
                second = evaluator.evaluate(_mixed(len(units), 1), args.fidelity)
                e2e[engine_name] = {
                    "first_s": first.seconds,
                    "second_s": second.seconds,
                    "score": first.score,
                    "score_2": second.score,
                }
                evaluator.close()
            figures["evaluate"] = e2e
            print(e2e, flush=True)

    if dev.startswith("cuda"):
        figures["peak_allocated_gib"] = torch.cuda.max_memory_allocated() / 2**30

    print("\n| step (ms) at batch × 256 | " + " | ".join(str(b) for b in args.batches) + " |")
    print("|---|" + "---|" * len(args.batches))
    for name, by_bs in step_ms.items():
        cells = [f"{by_bs[b]:.1f}" if b in by_bs else "-" for b in args.batches]
        print(f"| {name} | " + " | ".join(cells) + " |")
    print(f"capture / compile seconds: {capture_s}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(figures, indent=2, default=str))


if __name__ == "__main__":
    main()
