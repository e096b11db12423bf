"""All three export formats from one real SmolLM2 search run: sizes, merge cost, ONNX speed.

Runs ``edgeqra run`` on a small job (the quick-start's budget, bits {3, 4, 8}, a short
search, ``export = ["gptq", "adapter", "onnx"]``), then for each package: its size, the
scores its manifest recorded (the run's final score, before and after the merge), the time
``edgeqra verify`` takes, and for ONNX greedy tokens/s in onnxruntime against the same
merged GPTQ checkpoint in torch (GPTQModel's torch kernel, float32, KV cache), both on CPU.

    python bench/export_smollm2.py --out runs/export-bench   # ~40 min on 2 busy CPU cores

Prints a markdown table and writes ``OUT/bench.json``.
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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/export-bench", help="run directory")
    args = parser.parse_args()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    job = out.parent / f"{out.name}.toml"
    job.write_text(JOB.format(out=out))
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")

    start = time.perf_counter()
    if not (out / "summary.json").is_file() or "exports" not in json.loads(
        (out / "summary.json").read_text()
    ):
        resume = ["--resume"] if (out / "job.json").is_file() else []
        subprocess.run(["edgeqra", "run", str(job), *resume], check=True)  # noqa: S603,S607
    run_seconds = time.perf_counter() - start
    summary = json.loads((out / "summary.json").read_text())

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
