"""All three export formats from one real SmolLM2 search run: sizes, merge cost, ONNX speed.

Runs ``edgeqra run`` on a small job (the quick-start's budget, bits {3, 4, 8}, a short
search, ``export = ["gptq", "adapter", "onnx"]``), then for each package: its size, the
scores its manifest recorded (the run's final score, before and after the merge), the time
``edgeqra verify`` takes, and for ONNX greedy tokens/s in onnxruntime against the same
merged GPTQ checkpoint in torch (GPTQModel's torch kernel, float32, KV cache), both on CPU.

    python bench/export_smollm2.py --out runs/export-bench   # ~40 min on 2 busy CPU cores

Prints a markdown table and writes ``OUT/bench.json``.

Issue 21 (the merge table, GPU; bench/gpu/run_issue21.sh has the calls): ``--search-only``
runs the job without exports (``--device``, ``--n-eval``, ``--bits``, ``--target-bits``:
the job's ``budget_bits``, a budget at that average width; ``--uniform 4`` for a
uniform 4-bit rank-8 run instead of a search); ``--merge-table FORMATS`` then exports each of
``adapter``, ``grid`` (gptq merged on the bank's grid, RUN/export-gptq), ``requantize`` (the
old merge, RUN/export-gptq-requantize), ``unmerged`` / ``upbits`` (the grid merge with that
``over_threshold``) and ``onnx`` (reusing export-gptq) and prints the
table: before merge, adapter form, merged old, merged new, held-out loss, per-layer merge
error; ``--table`` prints it again from the manifests.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

JOB = """\
profile = "jetson-orin-nano-8gb"
budget_gb = 0.86
model = "smollm2"
task = "arc_easy"
out = "{out}"
seed = 0
device = "cpu"
export = ["gptq", "adapter", "onnx"]

[space]
bits = [3, 4, 8]
ranks = [0, 4, 8, 16]

[data]
n_train = 256
n_eval = 40
calib_samples = 16

[tuning]
steps = 8

[search]
evals = 2
population = 4
children = 4
generations = 1
sensitivity = false
bayes = false
baselines = false
"""

PROMPT = "The capital of France is"
NEW_TOKENS = 32


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f}"


def _torch_speed(gptq_dir: Path, ids) -> tuple[float, list[int]]:
    """Greedy tokens/s of the merged GPTQ checkpoint in torch (float32, KV cache, CPU)."""
    import torch
    from edgeqra.exporters.gptq import load_checkpoint

    model = load_checkpoint(gptq_dir)
    prompt = torch.tensor([ids])
    with torch.no_grad():
        model.generate(prompt, max_new_tokens=2, do_sample=False)  # warm-up
        start = time.perf_counter()
        out = model.generate(
            prompt, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False
        )
        seconds = time.perf_counter() - start
    return NEW_TOKENS / seconds, out[0, len(ids) :].tolist()


def _onnx_speed(onnx_dir: Path, ids) -> tuple[float, list[int]]:
    """Greedy tokens/s in onnxruntime (CPU, the exported KV cache)."""
    from edgeqra.exporters.onnx import greedy_generate

    greedy_generate(onnx_dir, ids, 2)  # warm-up (session build)
    start = time.perf_counter()
    tokens = greedy_generate(onnx_dir, ids, NEW_TOKENS)
    return NEW_TOKENS / (time.perf_counter() - start), list(tokens)


def _job_text(args, out: Path) -> str:
    """The job file: the default CPU job, or the issue-21 settings given on the command line."""
    if not args.search_only:
        return JOB.format(out=out)
    profile = "jetson-orin-nano-8gb"
    if args.uniform:  # a generous byte budget: the only config is uniform BITS/8
        bits, ranks, budget, evals = [args.uniform], [8], "budget_gb = 8.0", 1
    else:
        bits, ranks, evals = args.bits, args.ranks, args.evals
        budget = (f"budget_gb = {args.budget_gb}" if args.budget_gb
                  else f"budget_bits = {args.target_bits}")  # the job files' own key  # fmt: skip
    return f"""\
profile = "{profile}"
{budget}
model = "smollm2"
task = "arc_easy"
out = "{out}"
seed = 0
device = "{args.device}"
export = []

[space]
bits = {bits}
ranks = {ranks}

[data]
n_train = 1024
n_eval = {args.n_eval}
calib_samples = {args.calib_samples}

[tuning]
steps = {args.steps}

[search]
evals = {evals}
population = 4
children = 4
generations = 2
sensitivity = false
baselines = false
"""


def _merge_table(out: Path, formats: list[str]) -> dict:
    """Export the formats issue 21 compares (skipping finished ones); the table's figures."""
    from edgeqra.exporters.merge import MergeSettings
    from edgeqra.exporters.package import default_out, export_package

    targets = {
        "adapter": (default_out(out, "adapter"), "adapter", None),
        # every layer merged (the default now keeps layers over the threshold unmerged)
        "grid": (default_out(out, "gptq"), "gptq", MergeSettings(over_threshold="report")),
        "requantize": (out / "export-gptq-requantize", "gptq",
                       MergeSettings(method="requantize", over_threshold="report")),
        "onnx": (default_out(out, "onnx"), "onnx", MergeSettings()),
        "unmerged": (out / "export-gptq-unmerged", "gptq",
                     MergeSettings(over_threshold="unmerged")),
        "upbits": (out / "export-gptq-upbits", "gptq", MergeSettings(over_threshold="upbits")),
    }  # fmt: skip
    for name in formats:
        path, fmt, merge = targets[name]
        if (path / "manifest.json").is_file():
            print(f"{name}: {path} exists, kept")
            continue
        started = time.perf_counter()
        export_package(out, fmt, path, force=True, merge=merge,
                       on_stage=lambda m, n=name: print(f"  {n}: {m}", flush=True))  # fmt: skip
        print(f"{name}: exported in {time.perf_counter() - started:.0f} s", flush=True)
    return _print_table(out, targets)


def _print_table(out: Path, targets: dict) -> dict:
    """The merge table from the packages' manifests (whichever exist)."""
    manifests = {
        name: json.loads((path / "manifest.json").read_text())
        for name, (path, *_) in targets.items()
        if (path / "manifest.json").is_file()
    }
    if not manifests:
        print("no package yet")
        return {}
    any_m = next(iter(manifests.values()))
    s = any_m["scores"]
    before = s["before_merge"]
    rows = [("before merge (bank base + adapter, in memory)", before)]
    if "adapter" in manifests:
        rows.append(("adapter form (package, reloaded)", manifests["adapter"]["scores"]["package"]))
    if "requantize" in manifests:
        rows.append(("merged, old (GPTQ again)", manifests["requantize"]["scores"]["after_merge"]))
    if "grid" in manifests:
        rows.append(
            ("merged, new (on the bank's grid)", manifests["grid"]["scores"]["after_merge"])
        )
    for name, label in (
        ("unmerged", "new, layers over threshold kept unmerged"),
        ("upbits", "new, layers over threshold at the next width"),
    ):
        if name in manifests:
            acts = manifests[name]["merge"]["actions"]
            rows.append((f"{label} ({acts})", manifests[name]["scores"]["after_merge"]))  # fmt: skip
    print(f"\nconfig {any_m['config']['short']} ({any_m['config']['average_bits']:.2f} bits), "
          f"{before['n']} eval items, metric {s['metric']}\n")  # fmt: skip
    print("| model | score | Δ vs before | loss | Δ loss |\n|---|---|---|---|---|")
    for label, e in rows:
        print(f"| {label} | {e['score']:.4f} | {e['score'] - before['score']:+.4f} | "
              f"{e['loss']:.4f} | {100 * (e['loss'] / before['loss'] - 1):+.2f}% |")  # fmt: skip
    figures = {"rows": {label: e for label, e in rows}}
    if "grid" in manifests:
        layers = manifests["grid"]["merge"]["layers"]
        merged = [la for la in layers if la["action"].startswith("merged")]
        print("\nper-layer merge (new): lost = share of the adapter's output effect lost; "
              "RTN = round-to-nearest on the same grid\n")  # fmt: skip
        print("| unit | bits | rank | action | lost | RTN | output err | codes changed |")
        print("|---|---|---|---|---|---|---|---|")
        for la in layers:
            print(f"| {la['unit']} | {la['bits']}→{la['bits_written']} | {la['rank']} | "
                  f"{la['action']} | {la['lost']:.3f} | {la['lost_rtn']:.3f} | "
                  f"{la['output_error']:.2e} | {100 * la['codes_changed']:.1f}% |")  # fmt: skip
        if merged:
            mean = sum(la["lost"] for la in merged) / len(merged)
            print(f"\nmean lost {mean:.3f} over {len(merged)} merged layers (RTN "
                  f"{sum(la['lost_rtn'] for la in merged) / len(merged):.3f})")  # fmt: skip
        figures["layers"] = layers
    for name, m in manifests.items():
        print(f"{name}: {m['seconds']:.0f} s, "
              f"{sum(f['bytes'] for f in m['files'].values()) / 2**20:.1f} MiB")  # fmt: skip
    (out / "merge_table.json").write_text(json.dumps(figures, indent=2) + "\n")
    return figures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/export-bench", help="run directory")
    parser.add_argument("--search-only", action="store_true", help="issue 21: run, no exports")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--n-eval", type=int, default=570)
    parser.add_argument(
        "--bits", type=lambda t: [int(x) for x in t.split(",")], default=[2, 3, 4, 8]
    )
    parser.add_argument(
        "--ranks",
        type=lambda t: [int(x) for x in t.split(",")],
        default=[0, 4, 8, 16],
        help="the search's ranks; `--bits 3,4 --ranks 8` leaves only the bits to mix (issue 21)",
    )
    parser.add_argument("--target-bits", type=float, default=3.5)
    parser.add_argument("--budget-gb", type=float)
    parser.add_argument("--uniform", type=int, help="a uniform BITS/8 run instead of a search")
    parser.add_argument("--evals", type=int, default=12)
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--calib-samples", type=int, default=64)
    parser.add_argument("--merge-table", help="comma list of adapter,grid,requantize,onnx")
    parser.add_argument("--table", action="store_true", help="print the merge table only")
    args = parser.parse_args()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")
    if args.merge_table or args.table:
        _merge_table(out, args.merge_table.split(",") if args.merge_table else [])
        return 0
    job = out.parent / f"{out.name}.toml"
    job.write_text(_job_text(args, out))

    start = time.perf_counter()
    if not (out / "summary.json").is_file() or (not args.search_only and "exports" not in
                                                 json.loads((out / "summary.json").read_text())):  # fmt: skip
        resume = ["--resume"] if (out / "job.json").is_file() else []
        cli = [sys.executable, "-m", "edgeqra.cli"]
        subprocess.run([*cli, "run", str(job), *resume], check=True)  # noqa: S603
    run_seconds = time.perf_counter() - start
    summary = json.loads((out / "summary.json").read_text())
    if args.search_only:
        print(f"chosen {summary['chosen']['short']} ({summary['chosen']['average_bits']:.2f} "
              f"bits), final {summary['chosen']['final']['score']:.4f}; {run_seconds:.0f} s")  # fmt: skip
        return 0

    from edgeqra.exporters.package import verify_package
    from transformers import AutoTokenizer

    rows, results = [], {"run_seconds": run_seconds, "chosen": summary["chosen"]["short"]}
    for fmt, rel in summary["exports"].items():
        pkg = out / rel
        manifest = json.loads((pkg / "manifest.json").read_text())
        t0 = time.perf_counter()
        report = verify_package(pkg)
        verify_s = time.perf_counter() - t0
        size = sum(f["bytes"] for f in manifest["files"].values())
        weights = {
            k: v["bytes"]
            for k, v in manifest["files"].items()
            if k.endswith((".safetensors", ".onnx", ".data"))
        }
        s = manifest["scores"]
        results[fmt] = {
            "bytes": size,
            "weights": weights,
            "export_seconds": manifest["seconds"],
            "verify_seconds": verify_s,
            "verify_ok": report.ok,
            "scores": s,
            "parity": {k: v for k, v in manifest["parity"].items() if k.endswith("_max_abs")},
        }
        rows.append(
            f"| {fmt} | {_mib(size)} | {s['run_final']:.4f} | {s['before_merge']['score']:.4f} | "
            f"{'—' if not s['after_merge'] else format(s['after_merge']['score'], '.4f')} | "
            f"{manifest['seconds']:.0f} s | {verify_s:.0f} s ({'ok' if report.ok else 'FAILED'}) |"
        )

    if "onnx" in summary["exports"] and "gptq" in summary["exports"]:
        tok = AutoTokenizer.from_pretrained(out / summary["exports"]["gptq"])
        ids = tok(PROMPT)["input_ids"]
        torch_tps, torch_tokens = _torch_speed(out / summary["exports"]["gptq"], ids)
        onnx_tps, onnx_tokens = _onnx_speed(out / summary["exports"]["onnx"], ids)
        same = sum(a == b for a, b in zip(torch_tokens, onnx_tokens, strict=False))
        results["speed"] = {
            "prompt": PROMPT,
            "new_tokens": NEW_TOKENS,
            "torch_gptq_tokens_per_s": torch_tps,
            "onnxruntime_tokens_per_s": onnx_tps,
            "same_tokens": same,
            "torch_text": tok.decode(torch_tokens),
            "onnx_text": tok.decode(onnx_tokens),
        }

    (out / "bench.json").write_text(json.dumps(results, indent=2) + "\n")
    print(f"chosen {results['chosen']}; edgeqra run {run_seconds:.0f} s")
    print("| format | MiB | run final | before merge | after merge | export | verify |")
    print("|---|---|---|---|---|---|---|")
    print("\n".join(rows))
    if "speed" in results:
        sp = results["speed"]
        print(
            f"greedy {NEW_TOKENS} tokens on CPU: torch (GPTQModel torch kernel, fp32) "
            f"{sp['torch_gptq_tokens_per_s']:.1f} tok/s, onnxruntime "
            f"{sp['onnxruntime_tokens_per_s']:.1f} tok/s; {sp['same_tokens']}/{NEW_TOKENS} same"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
