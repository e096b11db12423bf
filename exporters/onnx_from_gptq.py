"""An ONNX package from the run's verified ``export-gptq`` package: no second merge.

When the run's gptq package was made with the same config, journal and merge settings and
its files verify, the ONNX export converts its merged checkpoint and takes over its merge
record, scores and probe (the gptq reload is what the ONNX graph computes). Units that package
kept unmerged come along as LoRA MatMuls in the graph.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from edgeqra.exporters.files import MANIFEST, default_out, sha256
from edgeqra.exporters.manifest import build_manifest, written_bits
from edgeqra.exporters.probe import max_diff, onnx_module, probe_record
from edgeqra.exporters.verify import verify_package

from edgeqra.rundir import JOURNAL, RunDir, read_json
from edgeqra.space import Config

__all__ = ["onnx_budget", "onnx_from_gptq", "reusable_gptq"]

log = logging.getLogger(__name__)

Stage = Callable[[str], None]


def onnx_budget(run: RunDir, info: dict[str, Any]) -> dict[str, Any]:
    """The ONNX weights' bytes next to the memory model's weight bytes and the run's budget."""
    stored = sum(row["bytes"] for row in info["storage"].values()) + info["embedding"]["bytes"]
    components = (run.chosen.get("predicted_memory") or {}).get("components") or {}
    predicted = sum(components.get(k, 0) for k in ("quantized_weights", "unquantized_weights"))
    budget = run.chosen.get("budget_bytes")
    mib = 2**20
    line = f"ONNX linears + embedding {stored / mib:.1f} MiB"
    if predicted:
        line += f" (memory model's weights {predicted / mib:.1f} MiB)"
    if budget:
        line += f", budget {budget / mib:.0f} MiB"
    return {"stored_bytes": stored, "predicted_weight_bytes": predicted or None,
            "budget_bytes": budget, "line": line}  # fmt: skip


def reusable_gptq(run: RunDir, merge: Any) -> Path | None:
    """The run's ``export-gptq`` package if the ONNX export may reuse its merged checkpoint.

    Units that package kept unmerged come along: their adapter (``adapter/``) becomes LoRA
    MatMuls in the graph (``write_onnx``), so the ONNX package is what the gptq one loads as.
    """
    root = default_out(run.path, "gptq")
    if not (root / MANIFEST).is_file():
        return None
    m = read_json(root / MANIFEST)
    journal = run.path / JOURNAL
    wanted = [merge.to_json()]
    merge_record = m.get("merge") or {}
    reasons = []
    if m.get("format") != "gptq" or m.get("config", {}).get("spec") != str(run.config):
        reasons.append("another config")
    if (m.get("journal") or {}).get("sha256") != (sha256(journal) if journal.is_file() else None):
        reasons.append("another journal")
    if merge_record.get("settings") not in wanted:
        reasons.append("other merge settings")
    if not reasons and not verify_package(root, parity=False).ok:
        reasons.append("its files do not verify")
    if reasons:
        log.info("not reusing %s for the ONNX export: %s", root, ", ".join(reasons))
        return None
    return root


def onnx_from_gptq(
    run: RunDir,
    prepared: Any,
    staging: Path,
    stage: Stage,
    gptq: Path,
    onnx_options: dict[str, Any],
) -> dict[str, Any]:
    """The ONNX package from the run's verified gptq package (its merge, scores and probe)."""
    m = read_json(gptq / MANIFEST)
    stage(f"reusing the run's gptq package `{gptq}` (same config, journal and merge; verified)")
    onnx = onnx_module()
    kept = len((m.get("merge") or {}).get("unmerged_modules") or [])
    stage("exporting the merged checkpoint to ONNX (MatMulNBits per unit"
          + (f"; LoRA MatMuls for the {kept} modules kept unmerged)" if kept else ")"))  # fmt: skip
    info = onnx.write_onnx(gptq, staging, progress=False, **onnx_options)
    info["budget"] = onnx_budget(run, info)
    stage(info["storage_line"] + "; " + info["budget"]["line"])
    probe = m["parity"]
    ids = torch.tensor(probe["input_ids"], dtype=torch.long)  # (1, seq)
    reference = torch.as_tensor(onnx.onnx_logits(staging, ids.numpy()))[0].float()
    parity = probe_record(ids, reference, "onnxruntime")
    got = reference[:, probe["vocab_ids"]]  # (seq, k): where the gptq probe stored logits
    parity["vs_merged_gptq_max_abs"] = max_diff(got, torch.tensor(probe["reference"]))
    parity.update({k: v for k, v in probe.items() if k.startswith("merged_")})
    scores = {**m["scores"], "package": None}
    qcfg = json.loads((gptq / "quantize_config.json").read_text())
    merge_record = m.get("merge") or {}
    written = Config.parse(merge_record.get("written_config") or str(run.config))
    per_module = written_bits(qcfg, prepared.loaded.units, written)
    extra = {
        "onnx": info,
        "merge": merge_record,
        "reused_gptq": {"path": str(gptq.resolve()), "manifest_sha256": sha256(gptq / MANIFEST)},
    }
    return build_manifest(run, "onnx", prepared, scores, parity, qcfg, per_module, extra)
