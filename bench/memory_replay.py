"""Replay measured memory-truth rows through the current memory model, offline (issue 15).

Each row of a ``bench/memory_truth.py --out`` JSON holds the architecture, the config label,
the phase's workload and the measured peaks. This script rebuilds the config from the label
(``memory_truth.grid``, same seed), predicts it with today's ``memory.estimate`` under the
conditions of that measurement, and prints predicted vs measured peak allocated:

* the GPU's compute capability (the JSON's ``gpu``; 9.0 for an H200: 32 MiB cuBLAS workspaces);
* the quantized backward the row ran: JSONs without ``quantized_backward`` (before issue 15)
  ran GPTQModel's own path, which saves every dense weight (``saved``);
* cuBLAS handles alive in the process: one per thread that ran a matmul. Before issue 15
  every phase ran in one process per call, so every phase after the first config's
  fine-tuning already had the autograd thread's handle too (2); JSONs with
  ``fresh_process_per_phase`` start each phase clean (1 for inference, 2 for fine-tuning).

    python bench/memory_replay.py bench/measurements/*.json            # table + worst cases
    python bench/memory_replay.py --json out.json bench/measurements/*.json

For quantized fine-tuning rows it also prints the prediction for edgeqra's recompute path
(what the same config costs with ``edgeqra.qlinear``): lower by the dense-weights term.

``--reserve`` prints, per profile, the runtime reserve the measurements call for (how
``bench/gpu/README.md`` says to fold them in): the most the process held outside PyTorch's
allocator (CUDA context, libraries: process peak − peak reserved) plus the most allocator
slack (peak reserved − peak allocated) among the measured phases whose process peak fits
that profile's budget — those at the profile's own workloads when any were measured —,
rounded up to 64 MiB. Phases marked as carrying an earlier phase's
reserved memory (``ft+ckpt`` before ``fresh_process_per_phase``) are left out.

    python bench/memory_replay.py --reserve bench/measurements/*.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
GiB = 1 << 30
_CC = {"H200": (9, 0), "H100": (9, 0), "A100": (8, 0), "4090": (8, 9), "L4": (8, 9)}


def _capability(gpu: str | None) -> tuple[int, int] | None:
    """Compute capability from the JSON's GPU name (None: unknown, the model's largest)."""
    for key, cc in _CC.items():
        if gpu and key in gpu:
            return cc
    return None


def replay(payload: dict) -> list[dict]:
    """One dict per measured phase: label, phase, predicted, measured, error %."""
    sys.path.insert(0, str(REPO))
    sys.path.insert(0, str(REPO / "bench"))
    from memory_truth import ARCH_DIR, grid
    from transformers import AutoConfig

    from edgeqra.memory import ModelSpec, QuantizedBackward, estimate
    from edgeqra.profiles import BudgetMode, FinetuneWorkload, InferenceWorkload
    from edgeqra.space import FP16_BITS

    cc = _capability(payload.get("environment", {}).get("gpu"))
    fresh = bool(payload.get("fresh_process_per_phase"))
    group = payload.get("group_size", 64)
    rows: list[dict] = []
    trained = False  # has this process run a fine-tuning phase yet (autograd thread's handle)
    for arch, records in payload["results"].items():
        hf = AutoConfig.from_pretrained(ARCH_DIR / arch)
        spec = ModelSpec.from_config(hf)
        configs = grid(spec.n_units, 6, 0, arch)
        for rec in records:
            config = configs[rec["label"]]
            assert config.short() == rec["config"], (arch, rec["label"])  # noqa: S101
            quantized = any(c.bits < FP16_BITS for c in config)
            for ph in rec["phases"]:
                if "measured" not in ph:
                    continue
                finetune = ph["mode"] == "finetune"
                w = ph["workload"]
                backward = ph.get("quantized_backward", QuantizedBackward.SAVED.value)
                handles = (2 if finetune else 1) if fresh else (2 if finetune or trained else 1)
                kwargs = dict(group_size=group, compute_capability=cc, cublas_handles=handles)
                if finetune:
                    work = FinetuneWorkload(**w)
                    pred = estimate(
                        spec, config, mode=BudgetMode.FINETUNE, finetune=work,
                        quantized_backward=backward, **kwargs,
                    )  # fmt: skip
                    new = estimate(
                        spec, config, mode=BudgetMode.FINETUNE, finetune=work,
                        quantized_backward=QuantizedBackward.RECOMPUTE, **kwargs,
                    )  # fmt: skip
                    name = "ft+ckpt" if work.gradient_checkpointing else "ft"
                else:
                    work = InferenceWorkload(**w)
                    pred = new = estimate(
                        spec, config, mode=BudgetMode.INFERENCE, inference=work, **kwargs
                    )
                    name = "inference"
                measured = ph["measured"]["peak_allocated"]
                rows.append(
                    {
                        "arch": arch,
                        "label": rec["label"],
                        "phase": name,
                        "quantized": quantized,
                        "predicted": pred.total,
                        "measured": measured,
                        "error_pct": round(100.0 * (pred.total - measured) / measured, 2),
                        "predicted_recompute": new.total,
                        "components": pred.components,
                    }
                )
                trained = trained or finetune
    return rows


def summary(rows: list[dict]) -> dict[str, dict]:
    """Worst under- and over-prediction per phase."""
    out: dict[str, dict] = {}
    for phase in ("inference", "ft", "ft+ckpt"):
        sel = [r for r in rows if r["phase"] == phase]
        if sel:
            lo = min(sel, key=lambda r: r["error_pct"])
            hi = max(sel, key=lambda r: r["error_pct"])
            out[phase] = {
                "rows": len(sel),
                "worst_under": (lo["error_pct"], f"{lo['arch']}/{lo['label']}"),
                "worst_over": (hi["error_pct"], f"{hi['arch']}/{hi['label']}"),
            }
    return out


def _matches(workload: dict, profile: dict) -> bool:
    """Whether a measured phase ran at the profile's own workload (inference or fine-tuning)."""
    if "context" in workload:
        inf = profile.get("inference", {})
        return (workload["batch"], workload["context"]) == (inf.get("batch"), inf.get("context"))
    ft = profile.get("finetune", {})
    return (workload["micro_batch"], workload["seq_len"]) == (
        ft.get("micro_batch"),
        ft.get("seq_len"),
    )


def reserves(payloads: list[dict]) -> dict[str, dict[str, int]]:
    """Per profile: measured outside-allocator bytes, slack, and the reserve (MiB) they give.

    The slack is taken from the phases measured at the profile's own workloads when there are
    any that fit its budget (``matched``), else from every phase that fits: allocator slack
    grows with the step's activations, and a 12 GiB card fine-tuning 1 × 512 tokens should not
    inherit the slack of a 2 × 1024 step (2026-12-04: 2,184 MiB, Qwen2.5-7B at the 4090's
    workloads).
    """
    import tomllib

    phases = []
    for payload in payloads:
        fresh = bool(payload.get("fresh_process_per_phase"))
        for records in payload["results"].values():
            for rec in records:
                for ph in rec["phases"]:
                    m = ph.get("measured")
                    carried = ph["workload"].get("gradient_checkpointing") and not fresh
                    if m and not carried:
                        phases.append((ph["workload"], m))
    outside = max(m["process_peak"] - m["peak_reserved"] for _, m in phases)
    out: dict[str, dict[str, int]] = {}
    for path in sorted((REPO / "profiles").glob("*.toml")):
        data = tomllib.loads(path.read_text())
        budget = (data["memory_gib"] - data["os_reserved_gib"]) * GiB
        fit = [(w, m) for w, m in phases if m["process_peak"] <= budget]
        own = [(w, m) for w, m in fit if _matches(w, data)]
        chosen = own or fit
        slack = max((m["peak_reserved"] - m["peak_allocated"] for _, m in chosen), default=0)
        mib = -(-(outside + slack) // (64 << 20)) * 64
        out[path.stem] = {
            "outside_mib": outside >> 20,
            "slack_mib": slack >> 20,
            "reserve_mib": mib,
            "matched": int(bool(own)),
        }
    return out


def main(argv: list[str] | None = None) -> int:
    """Entry point: exit 1 if any row is under-predicted."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("files", nargs="+", type=Path)
    p.add_argument("--json", type=Path, help="write the rows here")
    p.add_argument("--reserve", action="store_true", help="print the reserve per profile")
    args = p.parse_args(argv)
    if args.reserve:
        for name, r in reserves([json.loads(f.read_text()) for f in args.files]).items():
            source = "its own workloads" if r["matched"] else "any workload"
            print(f"{name}: outside {r['outside_mib']} MiB + slack {r['slack_mib']} MiB "
                  f"({source}) -> runtime_reserve_mib = {r['reserve_mib']}")  # fmt: skip
        return 0
    rows: list[dict] = []
    for path in args.files:
        rows += replay(json.loads(path.read_text()))
    print(f"{'arch':>14} {'cfg':>5} {'phase':>9} {'pred GiB':>9} {'meas GiB':>9} {'err %':>7} "
          f"{'recompute GiB':>13}")  # fmt: skip
    for r in rows:
        print(f"{r['arch']:>14} {r['label']:>5} {r['phase']:>9} {r['predicted'] / GiB:9.3f} "
              f"{r['measured'] / GiB:9.3f} {r['error_pct']:+7.2f} "
              f"{r['predicted_recompute'] / GiB:13.3f}")  # fmt: skip
    for phase, s in summary(rows).items():
        print(f"{phase}: {s['rows']} rows, worst under {s['worst_under'][0]:+.2f} % "
              f"({s['worst_under'][1]}), worst over {s['worst_over'][0]:+.2f} % "
              f"({s['worst_over'][1]})")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 1 if any(r["error_pct"] < 0 for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
