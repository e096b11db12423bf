"""A finished run directory -> one verifiable package folder per format (gptq | adapter | onnx).

``export_package`` reads the run (job.json, chosen.json, adapter/, summary.json), rebuilds
the run's model, data and bank through :func:`edgeqra.pipeline.prepare` (the bank is a cache
hit on the machine that searched), writes the format's files into a staging folder next to
the target, reloads them with the format's own loader, scores them on the run's eval split
(the run's scoring: :func:`edgeqra.evaluate.score_task`), and only then renames the folder
into place (``os.replace``): an interrupted export leaves no partial output.

Every package holds ``manifest.json`` (what it is, where it came from, the scores before and
after merging, the sha256 of every file, and a parity probe: a fixed token input with the
reference logits the package gave at export time) and a model card ``README.md``.
``verify_package`` re-hashes every file and re-runs the probe.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from edgeqra.exporters import FORMATS
from torch import nn

from edgeqra.errors import ConfigError, EdgeQRAError
from edgeqra.rundir import JOURNAL, SUMMARY, RunDir, read_json, write_json
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

MANIFEST, CARD = "manifest.json", "README.md"
MANIFEST_VERSION = 1
# verify: the same loader on the same token input in another process (or machine) gives the
# same logits up to matmul reduction order (identical in the tests on one CPU machine; thread
# counts and BLAS builds move them ~1e-6 relative), so 1e-3 + 1e-3·|ref| flags real change.
# The reference is always a CPU float32 load, also when the export ran on a GPU.
PARITY_ATOL, PARITY_RTOL = 1e-3, 1e-3
PARITY_TOKENS = 16
_PROBE_SPREAD = 32  # vocab ids sampled evenly for the stored reference, plus each row's top 4

Stage = Callable[[str], None]


class PackageError(EdgeQRAError):
    """A run directory or package is incomplete, exists already, or fails verification."""


# ----------------------------------------------------------------------------- the run


def default_out(run_dir: Path, fmt: str) -> Path:
    """Where a format's package goes by default: ``RUN_DIR/export-FORMAT``."""
    return Path(run_dir) / f"export-{fmt}"


def _archive_path(out: Path) -> Path:
    return out.with_name(f"{out.name}.tar.gz")


def _onnx_module():
    """The ONNX writer, imported lazily (a separate module with its own heavy imports)."""
    try:
        from edgeqra.exporters import onnx
    except ModuleNotFoundError as exc:
        if exc.name == "edgeqra.exporters.onnx":
            raise PackageError(
                "`--format onnx` is not available in this build (edgeqra.exporters.onnx is "
                "not installed); use `--format gptq` or `--format adapter`"
            ) from None
        raise
    return onnx


def _check_format(fmt: str) -> None:
    if fmt not in FORMATS:
        raise PackageError(f"`--format` {fmt!r} is unknown; use one of {list(FORMATS)}")
    if fmt == "onnx":
        _onnx_module()


def _check_target(out: Path, archive: bool, force: bool) -> None:
    """Refuse to overwrite an existing package (or archive) without ``force``."""
    taken = [p for p in (out, _archive_path(out) if archive else None) if p and p.exists()]
    if taken and not force:
        raise PackageError(
            f"`{taken[0]}` already exists; pass `--force` to replace it or `--out` elsewhere"
        )


# ----------------------------------------------------------------------------- files


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _package_files(root: Path) -> list[Path]:
    """Every regular file under ``root`` except the manifest, sorted by relative path."""
    return sorted(
        p for p in root.rglob("*") if p.is_file() and p.relative_to(root).as_posix() != MANIFEST
    )


def file_hashes(root: Path) -> dict[str, dict[str, object]]:
    """{relative path: {"sha256", "bytes"}} for every file of a package but the manifest."""
    return {
        p.relative_to(root).as_posix(): {"sha256": _sha256(p), "bytes": p.stat().st_size}
        for p in _package_files(root)
    }


@contextmanager
def _staging(out: Path) -> Iterator[Path]:
    """An empty folder next to ``out``; removed on any error, so nothing partial is left."""
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    try:
        yield stage
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise


def _commit(stage: Path, out: Path) -> None:
    """Move the finished staging folder to ``out`` (an existing one is replaced, --force)."""
    if not out.exists():
        os.replace(stage, out)
        return
    old = out.with_name(f".{out.name}.old-{os.getpid()}")
    os.replace(out, old)
    try:
        os.replace(stage, out)
    except BaseException:
        os.replace(old, out)
        raise
    if old.is_dir():
        shutil.rmtree(old, ignore_errors=True)
    else:
        old.unlink(missing_ok=True)


def _write_archive(out: Path) -> Path:
    """``out``.tar.gz beside the package, written to a temp file and renamed."""
    target = _archive_path(out)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{target.name}.", suffix=".tmp")
    os.close(fd)
    try:
        with tarfile.open(tmp, "w:gz") as tar:
            tar.add(out, arcname=out.name)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target


# ----------------------------------------------------------------------------- scoring


def _score(prepared: Any, model: nn.Module) -> dict[str, object]:
    """The run's metric on the run's eval split, exactly as the search scored candidates."""
    from edgeqra.evaluate import _score_value

    ev = prepared.evaluator
    scores = ev.score(model)  # the search's own scoring call (batch size, text windows)
    return {
        "score": _score_value(scores, ev.metric),
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


def _probe_ids(vocab: int) -> torch.Tensor:
    """The fixed parity input: (1, PARITY_TOKENS) seeded token ids."""
    generator = torch.Generator().manual_seed(0)
    return torch.randint(0, vocab, (1, PARITY_TOKENS), generator=generator)


@torch.no_grad()
def _logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """(seq, vocab) float32 logits of a (1, seq) input on the model's device."""
    device = next(model.parameters()).device
    return model(input_ids=ids.to(device)).logits[0].float().cpu()  # (seq, vocab)


def _probe(ids: torch.Tensor, reference: torch.Tensor, loader: str) -> dict[str, object]:
    """The parity record: input, a vocab subset and the reference logits there (seq, k)."""
    vocab = reference.shape[-1]
    spread = set(range(0, vocab, max(1, vocab // _PROBE_SPREAD)))
    top = set(reference.topk(min(4, vocab), dim=-1).indices.flatten().tolist())
    vocab_ids = sorted(spread | top)
    return {
        "input_ids": ids.tolist(),
        "vocab_ids": vocab_ids,
        "reference": reference[:, vocab_ids].tolist(),  # (seq, k)
        "argmax": reference.argmax(-1).tolist(),  # (seq,)
        "atol": PARITY_ATOL,
        "rtol": PARITY_RTOL,
        "loader": loader,
    }


def _cpu_logits(
    model: nn.Module, device: str, ids: torch.Tensor, load_cpu: Callable[[], nn.Module]
) -> torch.Tensor:
    """Logits from a CPU float32 load, as ``verify`` re-runs them (``model`` itself on CPU)."""
    return _logits(model if device == "cpu" else load_cpu(), ids)


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max())


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
    with _staging(out) as staging:
        manifest = _build(run, fmt, prepared, staging, stage, merge, dict(onnx or {}))
        manifest["seconds"] = round(time.perf_counter() - start, 2)
        ends = [t for _, t in timings[1:]] + [time.perf_counter()]
        spent: dict[str, float] = {}
        for (msg, begin), end in zip(timings, ends, strict=True):
            spent[msg] = round(spent.get(msg, 0.0) + end - begin, 2)
        manifest["stage_seconds"] = spent
        stage("hashing files, writing manifest and model card")
        _write_card(staging, manifest)
        manifest["files"] = file_hashes(staging)
        write_json(staging / MANIFEST, manifest)
        _commit(staging, out)
    written = None
    if archive:
        stage("writing the .tar.gz archive")
        written = _write_archive(out)
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
        reuse = _reusable_gptq(run, merge)
        if reuse is not None:
            return _onnx_from_gptq(run, prepared, staging, stage, reuse, onnx_options)
    loaded, bank, config = prepared.loaded, prepared.bank, run.config
    device = prepared.device
    model = loaded.model
    bank.assemble(model, config)
    ids = _probe_ids(int(model.config.get_text_config().vocab_size))

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
    unmerged_logits = _logits(unmerged, ids)
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
        reference = _cpu_logits(
            reloaded, device, ids, lambda: load_adapter_form(staging / "base", adapter_dir)
        )
        del reloaded
        parity = _probe(ids, reference, "gptqmodel+peft")
        parity["vs_unmerged_in_memory_max_abs"] = _max_diff(reference, unmerged_logits)
    else:
        stage("merging adapters into the dense model (W_hat + alpha/r * B A)")
        if run.adapter is not None:
            unmerged.unload()  # the same base object; PeftModel.from_pretrained below re-wraps it
        model.float()  # merge in float32 (a GPU run's model is bf16), from the exact W_hat
        bank.assemble(model, config)
        merged = merge_adapter(model, run.adapter)
        merged_logits = _logits(merged, ids)
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
            gptq_logits = _cpu_logits(reloaded, device, ids, lambda: load_checkpoint(target))
            del reloaded
            merge_diff = {
                "merged_gptq_vs_unmerged_max_abs": _max_diff(gptq_logits, unmerged_logits),
                "merged_gptq_vs_merged_dense_max_abs": _max_diff(gptq_logits, merged_logits),
                "merged_dense_vs_unmerged_max_abs": _max_diff(merged_logits, unmerged_logits),
            }
            if fmt == "gptq":
                scores["package"] = scores["after_merge"]
                parity = _probe(ids, gptq_logits, "gptqmodel")
                parity.update(merge_diff)
            else:
                stage("exporting the merged checkpoint to ONNX (MatMulNBits per unit)")
                onnx = _onnx_module()
                extra["onnx"] = onnx.write_onnx(target, staging, progress=False, **onnx_options)
                extra["onnx"]["budget"] = _onnx_budget(run, extra["onnx"])
                stage(extra["onnx"]["storage_line"] + "; " + extra["onnx"]["budget"]["line"])
                reference = torch.as_tensor(onnx.onnx_logits(staging, ids.numpy()))[0].float()
                parity = _probe(ids, reference, "onnxruntime")
                parity["vs_merged_gptq_max_abs"] = _max_diff(reference, gptq_logits)
                parity.update(merge_diff)
        finally:
            if scratch is not None:
                shutil.rmtree(scratch, ignore_errors=True)

    written = config
    if extra.get("merge") and extra["merge"].get("written_config"):
        written = Config.parse(extra["merge"]["written_config"])
    per_module = _written_bits(qcfg, loaded.units, written)
    return _manifest(run, fmt, prepared, scores, parity, qcfg, per_module, extra)


def _onnx_budget(run: RunDir, info: dict[str, Any]) -> dict[str, Any]:
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


def _reusable_gptq(run: RunDir, merge: Any) -> Path | None:
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
    if (m.get("journal") or {}).get("sha256") != (_sha256(journal) if journal.is_file() else None):
        reasons.append("another journal")
    if merge_record.get("settings") not in wanted:
        reasons.append("other merge settings")
    if not reasons and not verify_package(root, parity=False).ok:
        reasons.append("its files do not verify")
    if reasons:
        log.info("not reusing %s for the ONNX export: %s", root, ", ".join(reasons))
        return None
    return root


def _onnx_from_gptq(
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
    onnx = _onnx_module()
    kept = len((m.get("merge") or {}).get("unmerged_modules") or [])
    stage("exporting the merged checkpoint to ONNX (MatMulNBits per unit"
          + (f"; LoRA MatMuls for the {kept} modules kept unmerged)" if kept else ")"))  # fmt: skip
    info = onnx.write_onnx(gptq, staging, progress=False, **onnx_options)
    info["budget"] = _onnx_budget(run, info)
    stage(info["storage_line"] + "; " + info["budget"]["line"])
    probe = m["parity"]
    ids = torch.tensor(probe["input_ids"], dtype=torch.long)  # (1, seq)
    reference = torch.as_tensor(onnx.onnx_logits(staging, ids.numpy()))[0].float()
    parity = _probe(ids, reference, "onnxruntime")
    got = reference[:, probe["vocab_ids"]]  # (seq, k): where the gptq probe stored logits
    parity["vs_merged_gptq_max_abs"] = _max_diff(got, torch.tensor(probe["reference"]))
    parity.update({k: v for k, v in probe.items() if k.startswith("merged_")})
    scores = {**m["scores"], "package": None}
    qcfg = json.loads((gptq / "quantize_config.json").read_text())
    merge_record = m.get("merge") or {}
    written = Config.parse(merge_record.get("written_config") or str(run.config))
    per_module = _written_bits(qcfg, prepared.loaded.units, written)
    extra = {
        "onnx": info,
        "merge": merge_record,
        "reused_gptq": {"path": str(gptq.resolve()), "manifest_sha256": _sha256(gptq / MANIFEST)},
    }
    return _manifest(run, "onnx", prepared, scores, parity, qcfg, per_module, extra)


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


def _written_bits(qcfg: dict[str, Any], units: Any, config: Config) -> dict[str, int]:
    """Per-module bits the written quantize config resolves to; must equal the run's config."""
    from edgeqra.exporters.gptq import module_bits

    names = [lin.name for unit in units for lin in unit.linears]
    got = module_bits(qcfg, names)
    want = {lin.name: c.bits for unit, c in zip(units, config, strict=True) for lin in unit.linears}
    wrong = sorted(n for n in names if got[n] != want[n])
    if wrong:  # a bug in the writer, never the user's input
        raise RuntimeError(
            f"written quantize config disagrees with the run's config on {len(wrong)} modules, "
            f"e.g. {wrong[0]}: {got[wrong[0]]} vs {want[wrong[0]]}"
        )
    return got


def _manifest(
    run: RunDir,
    fmt: str,
    prepared: Any,
    scores: dict[str, Any],
    parity: dict[str, Any],
    qcfg: dict[str, Any],
    per_module: dict[str, int],
    extra: dict[str, Any],
) -> dict[str, Any]:
    """Everything the package states about itself (``files`` is added last)."""
    import edgeqra
    from edgeqra.bank import model_digest

    journal = run.path / JOURNAL
    search = dict(run.summary.get("search", {}))
    front = search.pop("front", [])
    job = run.job
    units = [
        {"unit": u.index, "name": u.name, "bits": c.bits, "rank": c.rank, "params": u.params}
        for u, c in zip(prepared.loaded.units, run.config, strict=True)
    ]
    return {
        "manifest_version": MANIFEST_VERSION,
        "format": fmt,
        "edgeqra_version": edgeqra.__version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "run_dir": str(run.path.resolve()),
        "model": {
            "source": job.eval.model,
            "sha256": model_digest(prepared.loaded.path),
            "architecture": type(prepared.loaded.model).__name__,
        },
        "task": job.eval.task,
        "profile": run.summary.get("profile"),
        "budget_bytes": run.chosen.get("budget_bytes"),
        "config": {
            "spec": str(run.config),
            "short": run.config.short(),
            "average_bits": run.chosen.get("average_bits"),
            "units": units,
        },
        "quantization": {
            "group_size": qcfg.get("group_size"),
            "sym": qcfg.get("sym"),
            "desc_act": qcfg.get("desc_act"),
            "checkpoint_format": qcfg.get("checkpoint_format"),
            "default_bits": qcfg.get("bits"),
            "dynamic": qcfg.get("dynamic"),
            "module_bits": per_module,
            "calibration_rows": list(prepared.calibration.shape),
        },
        "predicted_memory": run.chosen.get("predicted_memory"),
        "scores": scores,
        "search": {**search, "front_size": len(front)},
        "journal": {
            "sha256": _sha256(journal) if journal.is_file() else None,
            "evaluations": len(journal.read_text().splitlines()) if journal.is_file() else 0,
        },
        "parity": parity,
        **extra,
    }


# ----------------------------------------------------------------------------- model card

_LOADING = {
    "gptq": """```python
from edgeqra.gptq import load_quantized          # GPTQModel.load, float32 on CPU
from transformers import AutoTokenizer
model = load_quantized("{name}")                 # or gptqmodel.GPTQModel.load("{name}")
tok = AutoTokenizer.from_pretrained("{name}")
print(tok.decode(model.generate(**tok("Hello", return_tensors="pt"), max_new_tokens=20)[0]))
```""",
    "adapter": """```python
from edgeqra.gptq import load_quantized          # GPTQModel.load, float32 on CPU
from peft import PeftModel
from transformers import AutoTokenizer
model = PeftModel.from_pretrained(load_quantized("{name}/base"), "{name}/adapter")
tok = AutoTokenizer.from_pretrained("{name}/base")
```""",
    "onnx": """```python
import numpy as np
from edgeqra.exporters.onnx import greedy_generate  # onnxruntime on {name}/model.onnx, KV cache
from transformers import AutoTokenizer
tok = AutoTokenizer.from_pretrained("{name}")
print(tok.decode(greedy_generate("{name}", np.array(tok("Hello")["input_ids"]), 20)))
```

Or with onnxruntime-genai alone (`pip install onnxruntime-genai`; `genai_config.json` is here):

```python
import onnxruntime_genai as og
model = og.Model("{name}")
tok = og.Tokenizer(model)
params = og.GeneratorParams(model)
params.set_search_options(max_length=64, do_sample=False)
gen = og.Generator(model, params)
gen.append_tokens(tok.encode("Hello"))
while not gen.is_done():
    gen.generate_next_token()
print(tok.decode(gen.get_sequence(0)))
```""",
}

_WHAT = {
    "gptq": "the tuned model with its LoRA adapters merged into the weights "
    "(W' = Dequant(Q(W)) + (alpha/r)·B·A per unit), rounded onto the GPTQ grid of each "
    "unit's bit-width (see the merge table below): one mixed-precision GPTQ checkpoint.",
    "adapter": "the exact form the search tuned: `base/` is the mixed-precision GPTQ "
    "checkpoint holding the very quantized values of the search's GPTQ bank, `adapter/` "
    "the PEFT LoRA adapter with one rank per unit (`rank_pattern`), not merged.",
    "onnx": "the merged model (as in the `gptq` format) as an ONNX graph whose linear layers "
    "are onnxruntime `MatMulNBits` nodes carrying the GPTQ values, each at its unit's width; "
    "units the merge kept unmerged add their LoRA branch (s·(x Aᵀ) Bᵀ, float32 MatMuls) "
    "beside it.",
}


def _fmt_score(entry: dict[str, Any] | None) -> str:
    return "—" if not entry else f"{entry['score']:.4f}"


def _merge_label(m: dict[str, Any]) -> str:
    """How the package's merge was done, in a few words."""
    method = ((m.get("merge") or {}).get("settings") or {}).get("method")
    return "on the bank's grid" if method == "grid" else "GPTQ again per unit"


def _merge_lines(m: dict[str, Any]) -> list[str]:
    """The model card's per-layer merge table (grid merge only)."""
    merge = m.get("merge") or {}
    if not merge.get("layers"):
        return []
    lines = [
        "",
        "## Merge, per layer",
        "",
        "W' = Dequant(Q(W)) + (alpha/r)·B·A rounded onto the bank's own scales and zero points "
        "with GPTQ error feedback. *lost*: the fraction of the adapter's effect on the layer's "
        "outputs that the rounding loses (0 = kept, 1 = as if dropped; round-to-nearest in "
        f"brackets); threshold {merge['settings']['threshold']}, above it: "
        f"`{merge['settings']['over_threshold']}`.",
        "",
        "| unit | bits → written | rank | action | lost (RTN) | codes changed |",
        "|---|---|---|---|---|---|",
    ]
    for layer in merge["layers"]:
        flag = " ⚠" if layer["flagged"] else ""
        lines.append(
            f"| {layer['unit']} | {layer['bits']} → {layer['bits_written']} | {layer['rank']} | "
            f"{layer['action']}{flag} | {layer['lost']:.3f} ({layer['lost_rtn']:.3f}) | "
            f"{100 * layer['codes_changed']:.2f}% |"
        )
    if merge.get("unmerged_modules") and m["format"] == "onnx":
        lora = (m.get("onnx") or {}).get("lora") or {}
        lines += ["", f"Units kept unmerged: their adapter is in the graph as float32 LoRA "
                      f"MatMuls ({len(merge['unmerged_modules'])} modules, "
                      f"{lora.get('bytes', 0) / 2**20:.1f} MiB) beside the MatMulNBits base."]  # fmt: skip
    elif merge.get("unmerged_modules"):
        lines += ["", "Units kept unmerged: their adapter is in `adapter/` and loads on top."]
    return lines


def _write_card(root: Path, m: dict[str, Any]) -> None:
    """The package's README.md: what it is, how to load it, the per-layer config, the scores."""
    fmt, s = m["format"], m["scores"]
    name = "PACKAGE_DIR"
    lines = [
        f"# {m['model']['source']} — edgeqra `{fmt}` export",
        "",
        f"This package is {_WHAT[fmt]}",
        "",
        f"- searched for the `{m['profile']}` profile under a budget of "
        f"{(m['budget_bytes'] or 0) / 2**30:.3f} GiB (predicted: "
        f"{(m['predicted_memory'] or {}).get('total', 0) / 2**30:.3f} GiB)",
        f"- task `{m['task']}`, metric `{s['metric']}`; config `{m['config']['short']}` "
        f"({m['config']['average_bits']:.2f} average bits)",
        f"- edgeqra {m['edgeqra_version']}, model sha256 `{m['model']['sha256'][:16]}…`",
        "",
        "## Load it",
        "",
        _LOADING[fmt].format(name=name),
        "",
    ]
    if fmt in ("gptq", "adapter"):
        lines += [
            "Load it with GPTQModel (`GPTQModel.load`), not with transformers: transformers "
            "cannot load checkpoints with a per-module `dynamic` quantize config (shape "
            "mismatches) and mis-loads even uniform GPTQModel checkpoints (garbage logits), "
            "as measured in edgeqra's FINDINGS.md. GPTQModel picks a kernel per bit-width.",
            "",
        ]
    lines += [
        "Check the files and a short logit parity probe with `edgeqra verify PACKAGE_DIR`.",
        "",
        "## Scores (held-out split of the run)",
        "",
        "| measured | score |",
        "|---|---|",
        f"| the run's final score (search, float32) | {s['run_final']:.4f} |",
        f"| unmerged: bank GPTQ base + adapter, in memory | {_fmt_score(s['before_merge'])} |",
        f"| merged, {_merge_label(m)} (reloaded) | {_fmt_score(s['after_merge'])} |",
        f"| this package, reloaded with its loader | {_fmt_score(s['package'])} |",
        "",
        "## Per-layer config",
        "",
        "| unit | module prefix | bits | LoRA rank |",
        "|---|---|---|---|",
    ]
    for u in m["config"]["units"]:
        bits = "16 (dense)" if u["bits"] >= FP16_BITS else str(u["bits"])
        lines.append(f"| {u['unit']} | `{u['name']}` | {bits} | {u['rank']} |")
    lines += _merge_lines(m)
    lines += [
        "",
        f"GPTQ group size {m['quantization']['group_size']}, symmetric "
        f"{m['quantization']['sym']}, act-order {m['quantization']['desc_act']}; "
        f"{m['quantization']['calibration_rows'][0]} calibration rows of "
        f"{m['quantization']['calibration_rows'][1]} tokens. `manifest.json` lists every "
        "module's bits, the memory breakdown, the search summary and each file's sha256.",
        "",
    ]
    (root / CARD).write_text("\n".join(lines))


# ----------------------------------------------------------------------------- verify


@dataclass(frozen=True)
class Check:
    """One verification check."""

    name: str
    ok: bool
    detail: str


@dataclass(frozen=True)
class VerifyReport:
    """All checks of one package; ``ok`` when every one passed."""

    path: Path
    format: str
    checks: tuple[Check, ...]

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)

    def failures(self) -> list[Check]:
        return [c for c in self.checks if not c.ok]


def _package_logits(root: Path, fmt: str, ids: torch.Tensor) -> torch.Tensor:
    """(seq, vocab) logits of the package on ``ids``, through the format's own loader."""
    if fmt == "onnx":
        return torch.as_tensor(_onnx_module().onnx_logits(root, ids.numpy()))[0].float()
    from edgeqra.exporters.gptq import load_adapter_form, load_checkpoint

    if fmt == "adapter":
        adapter = root / "adapter" if (root / "adapter").is_dir() else None
        model = load_adapter_form(root / "base", adapter)
    else:
        model = load_checkpoint(root)
    return _logits(model, ids)


def verify_package(path: Path, *, parity: bool = True) -> VerifyReport:
    """Re-hash every file against the manifest, then re-run the logit parity probe.

    A missing, changed or unlisted file fails naming the file (and the probe is skipped:
    the weights are not the exported ones). The probe reloads the package with its format's
    loader and compares the logits at the stored vocab ids with the stored reference:
    ``|got - ref| <= atol + rtol·|ref|`` (manifest ``parity.atol`` / ``parity.rtol``), and
    the arg-max token at every position must agree.
    """
    root = Path(path)
    if not (root / MANIFEST).is_file():
        raise PackageError(f"`{root}` has no {MANIFEST}; pass a folder `edgeqra export` wrote")
    manifest = read_json(root / MANIFEST)
    listed = manifest.get("files") or {}
    checks: list[Check] = []
    for rel, want in sorted(listed.items()):
        file = root / rel
        if not file.is_file():
            checks.append(Check(f"file {rel}", False, "missing"))
            continue
        got = _sha256(file)
        ok = got == want["sha256"]
        detail = "sha256 ok" if ok else f"sha256 {got[:12]}… != manifest {want['sha256'][:12]}…"
        checks.append(Check(f"file {rel}", ok, detail))
    for file in _package_files(root):
        rel = file.relative_to(root).as_posix()
        if rel not in listed:
            checks.append(Check(f"file {rel}", False, "not listed in the manifest"))
    fmt = manifest.get("format", "?")
    if not parity:
        return VerifyReport(root, fmt, tuple(checks))
    if not all(c.ok for c in checks):
        checks.append(Check("parity", False, "skipped: the files are not the exported ones"))
        return VerifyReport(root, fmt, tuple(checks))
    probe = manifest["parity"]
    ids = torch.tensor(probe["input_ids"], dtype=torch.long)  # (1, seq)
    ref = torch.tensor(probe["reference"], dtype=torch.float32)  # (seq, k)
    try:
        logits = _package_logits(root, fmt, ids)  # (seq, vocab)
    except Exception as exc:  # noqa: BLE001 - any load failure is a failed check, reported
        checks.append(Check("parity", False, f"cannot load with its loader: {exc}"))
        return VerifyReport(root, fmt, tuple(checks))
    got = logits[:, probe["vocab_ids"]]
    excess = float(((got - ref).abs() - probe["atol"] - probe["rtol"] * ref.abs()).max())
    diff = float((got - ref).abs().max())
    same_argmax = logits.argmax(-1).tolist() == probe["argmax"]
    ok = excess <= 0 and same_argmax
    detail = (
        f"max |Δlogit| {diff:.2e} (tolerance {probe['atol']:g} + {probe['rtol']:g}·|ref|) "
        f"over {ids.shape[1]} tokens × {len(probe['vocab_ids'])} vocab ids via "
        f"{probe['loader']}; arg-max {'same' if same_argmax else 'DIFFERENT'}"
    )
    checks.append(Check("parity", ok, detail))
    return VerifyReport(root, fmt, tuple(checks))


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
    summary_path = run_dir / SUMMARY
    summary = read_json(summary_path)
    summary["exports"] = paths
    write_json(summary_path, summary)
    return paths
