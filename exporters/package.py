"""A finished run directory -> one verifiable package folder per format (gptq | adapter | onnx).

``export_package`` reads the run (job.json, chosen.json, adapter/, summary.json), rebuilds
the run's model, data and bank through :func:`edgeqra.pipeline.prepare` (the bank is a cache
hit on the machine that searched), writes the format's files into a staging folder next to
the target, reloads them with the format's own loader, scores them on the run's eval split
(the run's scoring: :func:`edgeqra.scoring.score_task`), and only then renames the folder
into place (``os.replace``): an interrupted export leaves no partial output.

Every package holds ``manifest.json`` (what it is, where it came from, the scores before and
after merging, the sha256 of every file, and a parity probe: a fixed token input with the
reference logits the package gave at export time) and a model card ``README.md``.
``verify_package`` re-hashes every file and re-runs the probe.

Here: the export itself (build, merge, score, reuse of a verified gptq package for ONNX);
``files`` (hashes, staging, archive), ``probe`` (parity probe, format loaders), ``manifest``
(manifest and model card) and ``verify`` are beside it, their public names re-exported here.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from edgeqra.exporters import FORMATS
from edgeqra.exporters.files import (
    MANIFEST,
    PackageError,
    archive_path,
    commit,
    default_out,
    file_hashes,
    staging_dir,
    write_archive,
)
from edgeqra.exporters.manifest import build_manifest, write_card, written_bits
from edgeqra.exporters.onnx_from_gptq import onnx_budget, onnx_from_gptq, reusable_gptq
from edgeqra.exporters.probe import (
    PARITY_ATOL,
    PARITY_RTOL,
    cpu_logits,
    logits,
    max_diff,
    onnx_module,
    probe_ids,
    probe_record,
)
from edgeqra.exporters.verify import Check, VerifyReport, verify_package
from torch import nn

from edgeqra.errors import ConfigError
from edgeqra.rundir import RunDir, RunFiles, write_json
from edgeqra.space import FP16_BITS, Config

__all__ = [
    "FORMATS",
    "PARITY_ATOL",
    "PARITY_RTOL",
    "Check",
    "ExportResult",
    "PackageError",
    "RunDir",
    "VerifyReport",
    "default_out",
    "export_package",
    "export_run",
    "file_hashes",
    "verify_package",
]

log = logging.getLogger(__name__)

Stage = Callable[[str], None]


# ----------------------------------------------------------------------------- the run


def _check_format(fmt: str) -> None:
    if fmt not in FORMATS:
        raise PackageError(f"`--format` {fmt!r} is unknown; use one of {list(FORMATS)}")
    if fmt == "onnx":
        onnx_module()


def _check_target(out: Path, archive: bool, force: bool) -> None:
    """Refuse to overwrite an existing package (or archive) without ``force``."""
    taken = [p for p in (out, archive_path(out) if archive else None) if p and p.exists()]
    if taken and not force:
        raise PackageError(
            f"`{taken[0]}` already exists; pass `--force` to replace it or `--out` elsewhere"
        )


# ----------------------------------------------------------------------------- scoring


def _score(prepared: Any, model: nn.Module) -> dict[str, object]:
    """The run's metric on the run's eval split, exactly as the search scored candidates."""
    from edgeqra.evaluate import score_value

    ev = prepared.evaluator
    scores = ev.score(model)  # the search's own scoring call (batch size, text windows)
    return {
        "score": score_value(scores, ev.metric),
        "metric": ev.metric,
        "loss": scores.loss,
        "accuracy": scores.accuracy,
        "accuracy_norm": scores.accuracy_norm,
        "n": scores.n,
    }


def _run_final_score(run: RunDir, prepared: Any) -> dict[str, object] | None:
    """The run's final score as the unmerged score, when it is the same computation.

    The final tuning scored exactly this model (bank base + the adapter it saved) on this eval
    split; on the same device the numbers are the same (checked in tests), so the export does
    not pay for a second scoring (~17 s of the CPU quick-start). None: score it again.
    """
    final = run.summary.get("chosen", {}).get("final") or {}
    task, metric = prepared.evaluator.task, prepared.evaluator.metric
    if run.summary.get("device") != prepared.device or final.get("metric") != metric:
        return None
    if any(final.get(k) is None for k in ("score", "loss")):
        return None
    return {
        "score": final["score"],
        "metric": final["metric"],
        "loss": final["loss"],
        "accuracy": final.get("accuracy"),
        "accuracy_norm": final.get("accuracy_norm"),
        "n": len(task.eval_mc) if task.kind == "mc" else len(task.eval_text),
        "from_run": True,  # the final tuning's score, not scored again here
    }


# ----------------------------------------------------------------------------- export


@dataclass(frozen=True)
class ExportResult:
    """What one export wrote."""

    path: Path
    archive: Path | None
    manifest: dict[str, Any] = field(repr=False)


def export_package(
    run_dir: Path,
    fmt: str,
    out: Path | None = None,
    *,
    archive: bool = False,
    force: bool = False,
    on_stage: Stage | None = None,
    merge: Any | None = None,
    onnx: dict[str, Any] | None = None,
) -> ExportResult:
    """Write the ``fmt`` package of a finished run to ``out`` (default ``RUN_DIR/export-FMT``).

    Args:
        run_dir: a run directory a search finished (job.json, chosen.json, adapter/, summary.json).
        fmt: ``gptq`` (adapters merged, GPTQ again per unit), ``adapter`` (the search's GPTQ
            base + the PEFT adapter, unmerged) or ``onnx`` (the merged model as MatMulNBits).
        out: the package folder; refused if it exists unless ``force``.
        archive: also write ``out``.tar.gz.
        force: replace an existing package / archive.
        on_stage: called with a short description as each stage starts (progress display).
        merge: :class:`edgeqra.exporters.merge.MergeSettings` for ``gptq`` / ``onnx``
            (default: onto the bank's grid, flag layers losing over half their adapter).
        onnx: keyword arguments of :func:`edgeqra.exporters.onnx.write_onnx` (``eight_bit``,
            ``embedding_dtype``, ``accuracy_level``). An ``onnx`` export reuses the run's
            ``export-gptq`` package when it was made with the same config, journal and merge
            settings and its files verify (no second merge).
    """
    from edgeqra.exporters.merge import MergeSettings, OverThreshold

    report = on_stage or (lambda _msg: None)
    timings: list[tuple[str, float]] = []  # (stage, start): the manifest's per-stage seconds

    def stage(msg: str) -> None:
        timings.append((msg, time.perf_counter()))
        report(msg)

    merge = merge if merge is not None else MergeSettings()
    _check_format(fmt)
    run = RunDir.open(run_dir)
    out = Path(out) if out is not None else default_out(run.path, fmt)
    _check_target(out, archive, force)
    needed = tuple(sorted({c.bits for c in run.config if c.bits < FP16_BITS}))
    if not needed:
        raise ConfigError(
            f"the run's config {run.config.short()} keeps every unit at 16 bits: there is no "
            "GPTQ checkpoint to export; load the run's adapter onto the original model"
        )
    if fmt != "adapter" and merge.over_threshold is OverThreshold.UPBITS:
        # the next widths up must be in the bank (the search built them: a cache hit)
        needed = tuple(sorted(set(needed) | {b for b in run.job.eval.bits
                                             if min(needed) < b < FP16_BITS}))  # fmt: skip
    from edgeqra.pipeline import prepare

    start = time.perf_counter()
    stage("loading the run's model, data and GPTQ bank")
    prepared = prepare(
        run.job.eval, needed_bits=needed, budget_gb=run.job.budget_gb, progress=False
    )
    with staging_dir(out) as staging:
        manifest = _build(run, fmt, prepared, staging, stage, merge, dict(onnx or {}))
        manifest["seconds"] = round(time.perf_counter() - start, 2)
        ends = [t for _, t in timings[1:]] + [time.perf_counter()]
        spent: dict[str, float] = {}
        for (msg, begin), end in zip(timings, ends, strict=True):
            spent[msg] = round(spent.get(msg, 0.0) + end - begin, 2)
        manifest["stage_seconds"] = spent
        stage("hashing files, writing manifest and model card")
        write_card(staging, manifest)
        manifest["files"] = file_hashes(staging)
        write_json(staging / MANIFEST, manifest)
        commit(staging, out)
    written = None
    if archive:
        stage("writing the .tar.gz archive")
        written = write_archive(out)
    log.info("exported %s package to %s", fmt, out)
    return ExportResult(out, written, manifest)


def _build(
    run: RunDir,
    fmt: str,
    prepared: Any,
    staging: Path,
    stage: Stage,
    merge: Any,
    onnx_options: dict[str, Any],
) -> dict[str, Any]:
    """Write the format's files into ``staging``; return the manifest without ``files``."""
    from edgeqra.exporters.gptq import (
        load_adapter_form,
        load_checkpoint,
        merge_adapter,
        write_base_checkpoint,
        write_merged_checkpoint,
    )
    from edgeqra.exporters.merge import MergeMethod

    if fmt == "onnx":
        reuse = reusable_gptq(run, merge)
        if reuse is not None:
            return onnx_from_gptq(run, prepared, staging, stage, reuse, onnx_options)
    loaded, bank, config = prepared.loaded, prepared.bank, run.config
    device = prepared.device
    model = loaded.model
    bank.assemble(model, config)
    ids = probe_ids(int(model.config.get_text_config().vocab_size))

    unmerged = model
    if run.adapter is not None:
        from edgeqra.gptq import import_gptqmodel

        import_gptqmodel()  # PEFT's LoRA imports GPTQModel: quietly, once
        from peft import PeftModel

        unmerged = PeftModel.from_pretrained(model, str(run.adapter), is_trainable=False).eval()
    before = _run_final_score(run, prepared)
    if before is None:
        stage("scoring the unmerged model (bank base + adapter, as the search did)")
        before = _score(prepared, unmerged)
    unmerged_logits = logits(unmerged, ids)
    scores: dict[str, Any] = {
        "metric": before["metric"],
        "run_final": run.summary["chosen"]["final"]["score"],
        "before_merge": before,
        "after_merge": None,
        "package": None,
    }
    parity: dict[str, Any] = {}
    extra: dict[str, Any] = {}
    tokenizer = loaded.tokenizer

    if fmt == "adapter":
        stage("writing the mixed-bit GPTQ base from the bank's packed tensors")
        (staging / "base").mkdir()
        write_base_checkpoint(
            bank, loaded.path, loaded.units, config, staging / "base", tokenizer=tokenizer
        )
        adapter_dir = None
        if run.adapter is not None:
            adapter_dir = staging / "adapter"
            shutil.copytree(run.adapter, adapter_dir)
            cfg_path = adapter_dir / "adapter_config.json"
            adapter_cfg = json.loads(cfg_path.read_text())
            adapter_cfg["base_model_name_or_path"] = "../base"  # inside this package
            cfg_path.write_text(json.dumps(adapter_cfg, indent=2, sort_keys=True) + "\n")
        qcfg = json.loads((staging / "base" / "quantize_config.json").read_text())
        stage("reloading with GPTQModel + PEFT and scoring")
        reloaded = load_adapter_form(staging / "base", adapter_dir, device)
        scores["package"] = _score(prepared, reloaded)
        reference = cpu_logits(
            reloaded, device, ids, lambda: load_adapter_form(staging / "base", adapter_dir)
        )
        del reloaded
        parity = probe_record(ids, reference, "gptqmodel+peft")
        parity["vs_unmerged_in_memory_max_abs"] = max_diff(reference, unmerged_logits)
    else:
        stage("merging adapters into the dense model (W_hat + alpha/r * B A)")
        if run.adapter is not None:
            unmerged.unload()  # the same base object; PeftModel.from_pretrained below re-wraps it
        model.float()  # merge in float32 (a GPU run's model is bf16), from the exact W_hat
        bank.assemble(model, config)
        merged = merge_adapter(model, run.adapter)
        merged_logits = logits(merged, ids)
        target = staging
        scratch = None
        if fmt == "onnx":
            scratch = Path(tempfile.mkdtemp(dir=staging.parent, prefix=f".{staging.name}.gptq-"))
            target = scratch
        try:
            if merge.method is MergeMethod.GRID:
                extra["merge"] = _merge_on_grid(run, prepared, merged, target, stage, merge)
            else:
                stage("GPTQ of the merged model at each unit's bit-width (GPTQModel)")
                write_merged_checkpoint(
                    merged,
                    loaded.path,
                    loaded.units,
                    config,
                    prepared.calibration,
                    target,
                    group_size=run.job.eval.group_size,
                    seed=run.job.eval.tune.seed,
                    device=device,
                    tokenizer=tokenizer,
                )
                extra["merge"] = {"settings": merge.to_json(), "layers": None}
            qcfg = json.loads((target / "quantize_config.json").read_text())
            stage("reloading the merged checkpoint with GPTQModel and scoring")
            reloaded = load_checkpoint(target, device)
            scores["after_merge"] = _score(prepared, reloaded)
            gptq_logits = cpu_logits(reloaded, device, ids, lambda: load_checkpoint(target))
            del reloaded
            merge_diff = {
                "merged_gptq_vs_unmerged_max_abs": max_diff(gptq_logits, unmerged_logits),
                "merged_gptq_vs_merged_dense_max_abs": max_diff(gptq_logits, merged_logits),
                "merged_dense_vs_unmerged_max_abs": max_diff(merged_logits, unmerged_logits),
            }
            if fmt == "gptq":
                scores["package"] = scores["after_merge"]
                parity = probe_record(ids, gptq_logits, "gptqmodel")
                parity.update(merge_diff)
            else:
                stage("exporting the merged checkpoint to ONNX (MatMulNBits per unit)")
                onnx = onnx_module()
                extra["onnx"] = onnx.write_onnx(target, staging, progress=False, **onnx_options)
                extra["onnx"]["budget"] = onnx_budget(run, extra["onnx"])
                stage(extra["onnx"]["storage_line"] + "; " + extra["onnx"]["budget"]["line"])
                reference = torch.as_tensor(onnx.onnx_logits(staging, ids.numpy()))[0].float()
                parity = probe_record(ids, reference, "onnxruntime")
                parity["vs_merged_gptq_max_abs"] = max_diff(reference, gptq_logits)
                parity.update(merge_diff)
        finally:
            if scratch is not None:
                shutil.rmtree(scratch, ignore_errors=True)

    written = config
    if extra.get("merge") and extra["merge"].get("written_config"):
        written = Config.parse(extra["merge"]["written_config"])
    per_module = written_bits(qcfg, loaded.units, written)
    return build_manifest(run, fmt, prepared, scores, parity, qcfg, per_module, extra)


def _hessian_rows(run: RunDir, prepared: Any, want: int) -> torch.Tensor:
    """The run's calibration rows, plus fresh windows of the same source if it had fewer."""
    rows = prepared.calibration  # (n, seq)
    if rows.shape[0] >= want:
        return rows
    from edgeqra.data import calibration_batches

    job = run.job.eval
    more = calibration_batches(
        prepared.loaded.tokenizer,
        job.calibration,
        n_samples=want - rows.shape[0],
        seq_len=rows.shape[1],
        seed=job.tune.seed + 1,  # other windows than the bank's
    )
    return torch.cat([rows, more])


def _fits_budget(run: RunDir, prepared: Any) -> Callable[[Config], bool] | None:
    """Whether a config fits the run's budget by the memory model (None: no profile/budget)."""
    budget = run.chosen.get("budget_bytes")
    if prepared.profile is None or not budget:
        return None
    from edgeqra.memory import estimate_for_profile

    def fits(config: Config) -> bool:
        est = estimate_for_profile(
            prepared.spec,
            config,
            prepared.profile,
            group_size=run.job.eval.group_size,
            merged_adapters=True,
        )
        return est.total <= budget

    return fits


def _merge_on_grid(
    run: RunDir,
    prepared: Any,
    merged: nn.Module,
    target: Path,
    stage: Stage,
    settings: Any,
) -> dict[str, Any]:
    """Merge onto the bank's grid (exporters.merge), write the checkpoint; the merge record."""
    from edgeqra.exporters.gptq import write_grid_checkpoint, write_partial_adapter
    from edgeqra.exporters.merge import LayerInputs, merge_units

    from edgeqra.space import Choice

    loaded, bank, config = prepared.loaded, prepared.bank, run.config
    units = loaded.units
    # `unmerged` layers keep their adapter in target/adapter; the ONNX export holds it as
    # LoRA MatMuls beside their MatMulNBits base (exporters.onnx.write_onnx).
    pairs = list(zip(units, config, strict=True))
    target_w = {
        lin.name: merged.get_submodule(lin.name).weight.detach().float().cpu().clone()
        for u, _ in pairs
        for lin in u.linears
    }  # (d_out, d_in) W* per module (a copy: the merge writes W' into `merged` as it goes)
    w_hat = {
        lin.name: bank.entry(u.index, c.bits)[lin.name]
        for u, c in pairs
        if c.bits < FP16_BITS and c.rank > 0
        for lin in u.linears
    }
    rows = _hessian_rows(run, prepared, settings.hessian_rows)
    stage(f"capturing layer inputs of the tuned model on {rows.shape[0]} calibration rows")
    inputs = LayerInputs(merged, [u.name for u in units], rows).capture()

    @torch.no_grad()
    def on_unit(unit, weights) -> None:  # the unit as the package computes it -> next inputs
        for name, w in weights.items():
            weight = merged.get_submodule(name).weight
            weight.copy_(w.to(weight.device, weight.dtype))
        inputs.advance(unit)

    stage("merging onto the bank's grid, layer by layer (GPTQ error feedback, fixed grid)")
    try:
        packed, layers = merge_units(
            bank, units, config, target_w, w_hat, inputs.hessians, settings,
            fits=_fits_budget(run, prepared), device=prepared.device, on_unit=on_unit,
        )  # fmt: skip
    finally:
        inputs.free()
    dense = {lin.name: target_w[lin.name] for u, c in pairs if c.bits >= FP16_BITS
             for lin in u.linears}  # fmt: skip
    write_grid_checkpoint(
        bank, loaded.path, units, packed, dense, target, tokenizer=loaded.tokenizer
    )
    kept = [lin.name for u, layer in zip(units, layers, strict=True) if layer.action == "unmerged"
            for lin in u.linears]  # fmt: skip
    if kept:
        write_partial_adapter(run.adapter, kept, target / "adapter")
    written = Config(tuple(Choice(layer.bits_written, c.rank)
                           for layer, c in zip(layers, config, strict=True)))  # fmt: skip
    actions: dict[str, int] = {}
    for layer in layers:
        actions[layer.action] = actions.get(layer.action, 0) + 1
        log.info(
            "merge %s (%d-bit, rank %d): %s%s, loses %.3f of the adapter's output effect "
            "(round-to-nearest %.3f), %.2f%% codes changed",
            layer.name, layer.bits, layer.rank, layer.action,
            f" at {layer.bits_written} bits" if layer.bits_written != layer.bits else "",
            layer.lost, layer.lost_rtn, 100 * layer.codes_changed,
        )  # fmt: skip
    flagged = [layer.name for layer in layers if layer.flagged]
    if flagged:
        log.warning(
            "%d of %d layers lose more than %s of their adapter's effect in the merge (the "
            "adapter moves their weights by less than the grid step); `--over-threshold "
            "unmerged` keeps them as base + adapter (exact), `upbits` merges them at the next "
            "bit-width if the budget allows", len(flagged), len(layers), settings.threshold,
        )  # fmt: skip
    adapted = [layer.lost for layer in layers if layer.action.startswith("merged")]
    stage(
        "merge: " + ", ".join(f"{n} {a}" for a, n in sorted(actions.items()))
        + (f"; mean share of the adapter effect lost {sum(adapted) / len(adapted):.3f}" if adapted else "")
        + (f"; {len(flagged)} above threshold {settings.threshold}" if flagged else "")
    )  # fmt: skip
    return {
        "settings": settings.to_json(),
        "hessian_rows": list(rows.shape),
        "written_config": str(written),
        "unmerged_modules": kept,
        "actions": actions,
        "flagged": flagged,
        "layers": [layer.to_json() for layer in layers],
    }


# ----------------------------------------------------------------------------- job runs


def export_run(
    run_dir: Path,
    formats: tuple[str, ...],
    *,
    merge: Any = None,
    on_stage: Stage | None = None,
) -> dict[str, str]:
    """A job's ``export = [...]``: each format to ``RUN_DIR/export-FMT``, recorded in summary.json.

    The job owns its run directory, so packages from an earlier run of it are replaced.
    ``merge`` is the job's ``[merge]`` table (:class:`MergeSettings`; None: the defaults).
    Returns {format: package path relative to the run directory}.
    """
    run_dir = Path(run_dir)
    paths: dict[str, str] = {}
    for fmt in formats:
        result = export_package(run_dir, fmt, force=True, merge=merge, on_stage=on_stage)
        paths[fmt] = result.path.relative_to(run_dir).as_posix()
    RunFiles(run_dir).record_exports(paths)  # checked against summary.json's schema
    return paths
