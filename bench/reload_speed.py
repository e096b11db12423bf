"""Reload of a GPTQ checkpoint on CPU: GPTQModel's compiled vs eager TorchLinear (issue 21).

    python bench/reload_speed.py --checkpoint GPTQ_DIR [--threads 1]

Each mode runs in a fresh process (dynamo's caches are per process): ``load_checkpoint``
(float32, torch kernel), one forward over 32 tokens, then greedy generation of 16 tokens;
prints seconds per phase and the number of torch._dynamo recompile warnings seen.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path


def _child(checkpoint: Path, compile_kernels: bool) -> dict:
    """One measurement, in this process."""
    import logging

    import torch

    seen: list[str] = []

    class Count(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if "recompil" in record.getMessage():
                seen.append(record.getMessage())

    logging.getLogger("torch._dynamo").addHandler(Count())
    from edgeqra.exporters.gptq import load_checkpoint

    started = time.perf_counter()
    model = load_checkpoint(checkpoint, compile_kernels=compile_kernels)
    load_s = time.perf_counter() - started
    ids = torch.arange(100, 132)[None]  # (1, 32)
    started = time.perf_counter()
    with torch.no_grad():
        model(ids)
    first_s = time.perf_counter() - started
    started = time.perf_counter()
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=16, min_new_tokens=16, do_sample=False,
                             attention_mask=torch.ones_like(ids), pad_token_id=0)  # fmt: skip
    gen_s = time.perf_counter() - started
    return {
        "compile_kernels": compile_kernels,
        "load_s": round(load_s, 2),
        "first_forward_s": round(first_s, 2),
        "generate_16_s": round(gen_s, 2),
        "tokens_per_s": round(16 / gen_s, 2),
        "recompile_warnings": len(seen),
        "tokens": out[0, 32:].tolist(),
    }


def main() -> None:
    """Run both modes in subprocesses and print a markdown table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--child", choices=["compiled", "eager"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        import torch

        torch.set_num_threads(args.threads)
        print(json.dumps(_child(args.checkpoint, args.child == "compiled")))
        return
    rows = []
    for mode in ("compiled", "eager"):
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
        started = time.perf_counter()
        out = subprocess.run(  # noqa: S603 - this script, fixed arguments
            [sys.executable, __file__, "--checkpoint", str(args.checkpoint), "--threads",
             str(args.threads), "--child", mode],
            capture_output=True, text=True, env=env, check=True,
        )  # fmt: skip
        row = json.loads(out.stdout.strip().splitlines()[-1])
        row["process_s"] = round(time.perf_counter() - started, 1)
        row["stderr_recompile_lines"] = out.stderr.count("recompil")
        rows.append(row)
    print(
        "| TorchLinear | load s | first forward s | greedy 16 tok/s | recompile warnings | process s |"
    )
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {'compiled (GPTQModel default)' if r['compile_kernels'] else 'eager (edgeqra)'} "
              f"| {r['load_s']} | {r['first_forward_s']} | {r['tokens_per_s']} | "
              f"{max(r['recompile_warnings'], r['stderr_recompile_lines'])} | {r['process_s']} |")  # fmt: skip
    print("same greedy tokens:", rows[0]["tokens"] == rows[1]["tokens"])


if __name__ == "__main__":
    main()
