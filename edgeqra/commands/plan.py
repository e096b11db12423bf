"""``edgeqra plan``: the baselines' memory on a profile, the most bits that fit, and (on a
GPU) the planned config measured, optionally under the profile's memory cap."""

from __future__ import annotations

import argparse
import contextlib
import json
import sys

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from edgeqra.commands._common import EXIT_NO_GPU, EXIT_OK, EXIT_OVER_CAP, gib, pick, with_defaults
from edgeqra.errors import EdgeQRAError

# The settings `plan` shares with `search` (same flags, help and defaults).
_KEYS = ("profile", "model", "data.group_size", "budget_gb", "budget_bits", "trust_remote_code")


def _settings() -> list:
    from edgeqra.pipeline import SearchJob

    return pick(SearchJob, _KEYS)


def add_parser(sub, common: argparse.ArgumentParser) -> None:
    """Register ``plan``."""
    from edgeqra import settings as schema

    p = sub.add_parser("plan", parents=[common], help="memory of the baselines on a profile")
    schema.add_options(p, _settings(), required={"profile"})
    p.add_argument("--rank", type=int, default=8, help="uniform LoRA rank of the baselines")
    p.add_argument(
        "--mode",
        choices=["inference", "finetune", "both"],
        help="which workload the budget is checked for (default: the profile's)",
    )
    p.add_argument(
        "--measure",
        action="store_true",
        help="GPU only: build the planned config with random weights of the model's shapes, "
        "run a short real inference / LoRA step and print predicted vs measured peak memory "
        f"(exit {EXIT_NO_GPU} without a CUDA GPU)",
    )
    p.add_argument(
        "--cap",
        action="store_true",
        help="with --measure: run inference and a few LoRA steps with PyTorch's GPU memory "
        "capped at the profile's budget (set_per_process_memory_fraction), so the config "
        f"runs as on the device; exit {EXIT_OVER_CAP} with one line naming the phase that "
        "overruns",
    )
    p.add_argument(
        "--config",
        help="with --measure: the config to run (one `bits/rank` per layer, comma-separated, "
        "or a JSON file) instead of the planned one",
    )
    p.set_defaults(func=_cmd_plan)


def _plan_budget(spec, profile, args: argparse.Namespace, out: Console):
    """The profile with its budget replaced by ``--budget-gb`` / ``--budget-bits`` (if given)."""
    import dataclasses

    from edgeqra.plan import budget_for_bits

    if args.budget_gb is not None and args.budget_bits is not None:
        raise EdgeQRAError("give the budget once: `--budget-gb` or `--budget-bits`, not both")
    if args.budget_gb is not None:
        if not args.budget_gb > 0:
            raise EdgeQRAError(f"`--budget-gb` must be positive, got {args.budget_gb}")
        budget = int(args.budget_gb * 2**30)
    elif args.budget_bits is not None:
        budget = budget_for_bits(spec, profile, args.budget_bits, group_size=args.group_size)
        if not args.json:
            out.print(
                f"--budget-bits {args.budget_bits}: the predicted memory of a rank-8 config "
                f"averaging {args.budget_bits} bits on {profile.name} = {budget:,} bytes "
                f"({budget / 2**30:.4f} GiB)"
            )
    else:
        return profile
    # The budget is memory_gib - os_reserved_gib: move the OS share so the budget is `budget`.
    return dataclasses.replace(profile, os_reserved_gib=profile.memory_gib - budget / 2**30)


def _cmd_plan(args: argparse.Namespace, out: Console) -> int:
    """Memory breakdown of the baselines on a profile and the most bits that fit."""
    from edgeqra.memory import ModelSpec
    from edgeqra.models import resolve_model
    from edgeqra.plan import make_plan
    from edgeqra.profiles import BudgetMode, load_profile

    args = with_defaults(args, _settings())
    profile = load_profile(args.profile, extra_dirs=args.profiles_dir or ())
    requested = None
    if args.config is not None:  # checked from config.json / the GGUF header: nothing loads yet
        from edgeqra.space import SearchSpace

        requested = SearchSpace.from_model(
            args.model, profile.bits, trust_remote_code=args.trust_remote_code
        ).parse(args.config)
    from transformers import AutoConfig

    with out.status(f"reading model `{args.model}`…"):
        path = resolve_model(args.model)
        hf_config = AutoConfig.from_pretrained(
            path, local_files_only=True, trust_remote_code=args.trust_remote_code
        )
        spec = ModelSpec.from_config(hf_config)
    mode = BudgetMode(args.mode) if args.mode else None
    profile = _plan_budget(spec, profile, args, out)
    plan = make_plan(spec, profile, rank=args.rank, mode=mode, group_size=args.group_size)
    if args.cap or args.config:
        return _plan_capped(hf_config, plan, requested, args, out)
    unpruned = _unpruned_totals(path, plan, args.group_size)
    if args.json:
        extra: dict[str, object] = {} if unpruned is None else {"unpruned": unpruned}
        if args.measure:
            extra["measured"], extra["measure_error"] = _plan_measurement(hf_config, plan, args)
        print(json.dumps({"model": args.model, **plan.to_json(), **extra}, indent=2))
        return EXIT_NO_GPU if args.measure and extra["measured"] is None else EXIT_OK
    title = (
        f"{args.model} on {profile.display_name} — {plan.mode.value} budget "
        f"{gib(profile.budget_bytes)} GiB (batch/context or micro-batch/seq from the profile)"
    )
    rows = list(plan.rows) + ([plan.best] if plan.best else [])
    # Components down, configs across: fits an 80-column terminal.
    table = Table(title=title)
    table.add_column("GiB")
    for row in rows:
        table.add_column(
            row.label.replace("GPTQ ", "").replace("largest fitting", "best fit"), justify="right"
        )
    table.add_row("avg bits", *[f"{row.average_bits:.2f}" for row in rows])
    for c in rows[0].breakdown.components:
        table.add_row(c.replace("_", " "), *[gib(row.breakdown.components[c]) for row in rows])
    table.add_row("[bold]total[/]", *[f"[bold]{gib(row.breakdown.total)}[/]" for row in rows])
    table.add_row("fits", *["[green]yes[/]" if row.fits else "[red]no[/]" for row in rows])
    if unpruned is not None:  # a pruned folder: the same configs on the original model
        before = unpruned["totals"]
        table.add_row("unpruned", *[gib(before[row.label]) for row in rows])
    out.print(table)
    if unpruned is not None:
        out.print(
            f"pruned from `{escape(unpruned['source'])}` (ratio {unpruned['ratio']}): "
            f"{unpruned['params_after']:,} of {unpruned['params_before']:,} parameters; the "
            "`unpruned` row is the same config on the original model",
            highlight=False,
        )
    if plan.best is None:
        out.print(
            f"[yellow]No config with rank {args.rank} fits; even without adapters the "
            f"minimum is {gib(plan.minimum.breakdown.total)} GiB.[/]"
        )
    else:
        out.print(
            f"Largest average bit-width that fits at rank {args.rank}: "
            f"[bold]{plan.best.average_bits:.2f}[/] bits ({plan.best.config.short()})"
        )
    if not args.measure:
        return EXIT_OK
    with out.status(f"measuring {plan.planned.config.short()} on this GPU (random weights)…"):
        measured, reason = _plan_measurement(hf_config, plan, args)
    if measured is None:
        Console(stderr=True).print(f"[yellow]{escape(reason or '')}[/]", soft_wrap=True)
        return EXIT_NO_GPU
    _print_measurement(measured, plan, out)
    return EXIT_OK


def _unpruned_totals(path, plan, group_size: int) -> dict[str, object] | None:
    """For a folder `edgeqra prune` wrote: each plan row's total bytes on the original model."""
    from edgeqra.memory import ModelSpec, estimate_for_profile
    from edgeqra.prune import read_record, unpruned_config

    record = read_record(path)
    if record is None:
        return None
    base = ModelSpec.from_config(unpruned_config(path))
    rows = list(plan.rows) + ([plan.best] if plan.best else [])
    totals = {
        row.label: estimate_for_profile(
            base, row.config, plan.profile, mode=plan.mode, group_size=group_size
        ).total
        for row in rows
    }
    return {
        "source": record["source"],
        "ratio": record["ratio"],
        "params_before": record["parameters"]["before"],
        "params_after": record["parameters"]["after"],
        "totals": totals,
    }


def _plan_capped(hf_config, plan, requested, args: argparse.Namespace, out: Console) -> int:
    """``plan --measure --cap``: run the planned (or ``--config``) config under the budget."""
    import dataclasses
    import tempfile
    from pathlib import Path

    import torch

    if not args.measure:
        flag = "--cap" if args.cap else "--config"
        raise EdgeQRAError(f"`{flag}` picks what `--measure` runs; add `--measure`")
    config = plan.planned.config if requested is None else requested  # checked in _cmd_plan
    if not args.cap:  # --config without --cap: the plain measurement of that config
        plan = dataclasses.replace(plan, best=dataclasses.replace(plan.planned, config=config))
        measured, reason = _plan_measurement(hf_config, plan, args)
        if measured is None:
            Console(stderr=True).print(f"[yellow]{escape(reason or '')}[/]", soft_wrap=True)
            return EXIT_NO_GPU
        if args.json:
            print(json.dumps({"model": args.model, **plan.to_json(), "measured": measured}))
        else:
            _print_measurement(measured, plan, out)
        return EXIT_OK
    if not torch.cuda.is_available():
        Console(stderr=True).print(
            "[yellow]`plan --measure --cap` needs a CUDA GPU and none is visible "
            f"(torch.cuda.is_available() is False); nothing was run (exit code {EXIT_NO_GPU})[/]",
            soft_wrap=True,
        )
        return EXIT_NO_GPU
    from edgeqra.measure import capped_run

    with (
        tempfile.TemporaryDirectory(prefix="edgeqra-cap-") as tmp,
        contextlib.redirect_stdout(sys.stderr),
    ):
        result = capped_run(
            hf_config, config, plan.profile, work_dir=Path(tmp), group_size=args.group_size
        )
    data = {
        "model": args.model,
        "profile": plan.profile.name,
        "config": result.config,
        "fits": result.fits,
        "budget_bytes": result.budget_bytes,
        "cap_bytes": result.cap_bytes,
        "outside_bytes": result.outside_bytes,
        "overrun": result.overrun,
        "measured": result.record,
    }
    if args.json:
        print(json.dumps(data, indent=2))
    elif result.fits:
        _print_measurement(result.record, plan, out)
        out.print(
            f"[green]fits:[/] {result.config} ran inside {plan.profile.name}'s budget of "
            f"{gib(result.budget_bytes)} GiB (cap {gib(result.cap_bytes)} GiB for PyTorch)",
            highlight=False,
        )
    if result.fits:
        return EXIT_OK
    Console(stderr=True).print(
        f"[red]over budget:[/] {escape(result.overrun or '')}", highlight=False, soft_wrap=True
    )
    return EXIT_OVER_CAP


def _plan_measurement(hf_config, plan, args: argparse.Namespace) -> tuple[dict | None, str | None]:
    """Run a short real step of the planned config on the GPU: (record, None) or (None, why)."""
    import tempfile
    from pathlib import Path

    import torch

    if not torch.cuda.is_available():
        return None, (
            "`plan --measure` needs a CUDA GPU and none is visible (torch.cuda.is_available() "
            f"is False); nothing was measured, the table is the memory model's prediction "
            f"only (exit code {EXIT_NO_GPU})"
        )
    from edgeqra.measure import measure_config

    modes = ["inference", "finetune"] if plan.mode.value == "both" else [plan.mode.value]
    # GPTQModel prints banners to stdout; keep stdout for the table / --json.
    with (
        tempfile.TemporaryDirectory(prefix="edgeqra-measure-") as tmp,
        contextlib.redirect_stdout(sys.stderr),
    ):
        record = measure_config(
            hf_config,
            plan.planned.config,
            plan.profile,
            work_dir=Path(tmp),
            modes=modes,
            checkpointing=(plan.profile.finetune.gradient_checkpointing,),
            group_size=args.group_size,
            kernels=plan.profile.kernels,
        )
    return record, None


def _print_measurement(record: dict, plan, out: Console) -> None:
    """Predicted next to measured, per phase (GiB)."""
    table = Table(title=f"{record['config']}: predicted vs measured on this GPU (random weights)")
    for col in ("phase", "predicted", "peak allocated", "error", "pred + reserve", "process"):
        table.add_column(col, justify="right")
    for ph in record["phases"]:
        if "measured" not in ph:
            table.add_row(
                ph["mode"], "[red]failed[/]", escape(ph.get("error", ""))[:40], "", "", ""
            )
            continue
        m = ph["measured"]
        table.add_row(
            ph["mode"],
            gib(ph["predicted_without_reserve"]),
            gib(m["peak_allocated"]),
            f"{ph['error_allocated_pct']:+.1f} %",
            gib(ph["predicted_total"]),
            gib(m["process_peak"]),
        )
    out.print(table)
    kernels = "; ".join(f"{mode}: {k}" for mode, k in record["kernels"].items())
    out.print(f"kernels by bit-width: {kernels or 'none (16-bit)'}", highlight=False)
