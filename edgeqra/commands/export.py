"""``edgeqra export``, ``verify``, ``report`` and ``tui``: what comes after a search."""

from __future__ import annotations

import argparse
import contextlib
import json
import sys

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from edgeqra.commands._common import EXIT_OK, stages


def add_parsers(sub, common: argparse.ArgumentParser) -> None:
    """Register ``export``, ``verify``, ``report`` and ``tui``."""
    from edgeqra import settings as schema
    from edgeqra.exporters.merge import MergeSettings

    p = sub.add_parser(
        "export",
        parents=[common],
        help="package a finished run: merged GPTQ, adapter form or ONNX, with manifest",
        description="Writes RUN_DIR/export-FORMAT (or --out) atomically: the weights, "
        "manifest.json (sha256 of every file, scores before/after merge) and a model card.",
    )
    p.add_argument("run_dir", metavar="RUN_DIR", help="the run directory of a finished search")
    p.add_argument(
        "--format",
        required=True,
        choices=["gptq", "adapter", "onnx"],
        help="gptq: adapters merged, GPTQ again per unit; adapter: the search's GPTQ base + "
        "the PEFT adapter (exact); onnx: the merged model as MatMulNBits",
    )
    p.add_argument("--out", help="package folder (default RUN_DIR/export-FORMAT)")
    p.add_argument("--archive", action="store_true", help="also write PACKAGE.tar.gz")
    p.add_argument("--force", action="store_true", help="replace an existing package")
    schema.add_options(p, schema.settings_of(MergeSettings))
    p.add_argument(
        "--eight-bit",
        choices=["split", "float32", "native"],
        default="split",
        help="onnx: 8-bit layers as two 4-bit MatMulNBits (split, default), a float32 MatMul "
        "(fastest, 4 bytes per weight) or 8-bit MatMulNBits (native, slow on CPU)",
    )
    p.add_argument(
        "--embedding-dtype",
        choices=["float16", "bfloat16", "int8", "float32"],
        default="float16",
        help="onnx: dtype the (tied) embedding table is stored in (default float16; int8: "
        "per-row codes, half the bytes again, a small rounding the manifest reports)",
    )
    p.set_defaults(func=_cmd_export)

    p = sub.add_parser(
        "verify",
        parents=[common],
        help="re-hash a package's files and re-run its logit parity probe",
    )
    p.add_argument("package", metavar="PACKAGE", help="a folder `edgeqra export` wrote")
    p.add_argument(
        "--parity",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="reload the weights and compare logits with the stored reference",
    )
    p.set_defaults(func=_cmd_verify)

    p = sub.add_parser(
        "report",
        parents=[common],
        help="an SVG of a finished run's measured front, baselines, budget and chosen config",
    )
    p.add_argument("run_dir", metavar="RUN_DIR", help="the run directory of a finished search")
    p.add_argument("--out", help="the .svg file to write (default RUN_DIR/report.svg)")
    p.set_defaults(func=_cmd_report)

    p = sub.add_parser("tui", parents=[common], help="the terminal UI: profile, plan, search")
    p.add_argument("job", nargs="?", help="start from this job file (`w` saves back to it)")
    p.add_argument("--save-to", help="where `w` writes the job file (default edgeqra-job.toml)")
    p.set_defaults(func=_cmd_tui)


def _merge_settings(args: argparse.Namespace):
    """The export's merge settings from its flags."""
    from edgeqra import settings as schema
    from edgeqra.exporters.merge import MergeSettings

    return schema.build(MergeSettings, schema.given(args, schema.settings_of(MergeSettings)))


def _cmd_export(args: argparse.Namespace, out: Console) -> int:
    """Package a finished run in one format; print where it went and the scores."""
    from pathlib import Path

    from edgeqra.exporters import export_package

    merge = _merge_settings(args)

    with stages(quiet=args.json) as on_stage, contextlib.redirect_stdout(sys.stderr):
        result = export_package(
            Path(args.run_dir),
            args.format,
            Path(args.out) if args.out else None,
            archive=args.archive,
            force=args.force,
            on_stage=on_stage,
            merge=merge,
            onnx={"eight_bit": args.eight_bit, "embedding_dtype": args.embedding_dtype},
        )
    m = result.manifest
    data = {
        "package": str(result.path),
        "archive": str(result.archive) if result.archive else None,
        "format": m["format"],
        "scores": m["scores"],
        "parity": {k: v for k, v in m["parity"].items() if k.endswith("_max_abs")},
        "bytes": sum(f["bytes"] for f in m["files"].values()),
    }
    if args.json:
        print(json.dumps(data, indent=2))
        return EXIT_OK
    s = m["scores"]

    def score(entry) -> str:
        return "—" if not entry else f"{entry['score']:.4f}"

    table = Table(title=f"{m['format']} package of {m['config']['short']}", show_header=False)
    table.add_row("package", str(result.path))
    if result.archive:
        table.add_row(
            "archive", f"{result.archive} ({result.archive.stat().st_size / 2**20:.1f} MiB)"
        )
    table.add_row("files", f"{len(m['files'])}, {data['bytes'] / 2**20:.1f} MiB")
    table.add_row(f"run's final score ({s['metric']})", f"{s['run_final']:.4f}")
    table.add_row("before merge (bank base + adapter)", score(s["before_merge"]))
    table.add_row(f"after merge ({merge.method.value}, reloaded)", score(s["after_merge"]))
    merge = m.get("merge") or {}
    if merge.get("actions"):
        table.add_row("merge, per layer", ", ".join(f"{n} {a}" for a, n in
                                                    sorted(merge["actions"].items())))  # fmt: skip
    if merge.get("flagged"):
        table.add_row("layers above threshold", ", ".join(merge["flagged"]))
    table.add_row("this package, reloaded", score(s["package"]))
    for key, value in data["parity"].items():
        table.add_row(key.replace("_", " "), f"{value:.3e}")
    table.add_row("time", f"{m['seconds']:.0f} s")
    out.print(table)
    return EXIT_OK


def _cmd_verify(args: argparse.Namespace, out: Console) -> int:
    """Re-hash a package's files and re-run its parity probe; exit 2 naming what failed."""
    from pathlib import Path

    from edgeqra.exporters import verify_package
    from edgeqra.exporters.package import PackageError

    with contextlib.redirect_stdout(sys.stderr):
        report = verify_package(Path(args.package), parity=args.parity)
    if args.json:
        print(
            json.dumps(
                {
                    "package": str(report.path),
                    "format": report.format,
                    "ok": report.ok,
                    "checks": [c.__dict__ for c in report.checks],
                },
                indent=2,
            )
        )
    else:
        table = Table(title=f"verify {report.path} ({report.format})")
        for column in ("check", "result", "detail"):
            table.add_column(column)
        for c in report.checks:
            table.add_row(c.name, "[green]ok[/]" if c.ok else "[red]FAILED[/]", escape(c.detail))
        out.print(table)
    if not report.ok:
        bad = ", ".join(f"{c.name} ({c.detail})" for c in report.failures())
        raise PackageError(f"`{report.path}` failed verification: {bad}")
    return EXIT_OK


def _cmd_report(args: argparse.Namespace, out: Console) -> int:
    """Draw a finished run directory's measured front as SVG (edgeqra.report)."""
    from edgeqra.report import write_report

    path = write_report(args.run_dir, args.out)
    if args.json:
        print(json.dumps({"run_dir": args.run_dir, "report": str(path)}))
    else:
        out.print(f"report: {path}", highlight=False, soft_wrap=True)
    return EXIT_OK


def _cmd_tui(args: argparse.Namespace, out: Console) -> int:
    """Start the Textual app (a thin face over the same job and pipeline as `run`)."""
    from edgeqra.tui.app import run_tui

    run_tui(args.job, save_to=args.save_to)
    return EXIT_OK
