"""The ``edgeqra`` command: thin argument parsing over the library, rich output, ``--json``.

Exit codes: 0 success, 1 internal error, 2 bad input (an :class:`EdgeQRAError`, one red
line), 3 nothing fits the memory budget, 4 ``plan --measure`` without a CUDA GPU (the
prediction is printed, nothing was measured), 5 ``plan --measure --cap``: a phase ran out
of the profile's budget (one line names it).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from edgeqra.errors import BudgetError, EdgeQRAError

if TYPE_CHECKING:
    from edgeqra.space import Config

__all__ = ["main"]

GiB = 1 << 30
EXIT_OK, EXIT_INTERNAL, EXIT_INPUT, EXIT_BUDGET = 0, 1, 2, 3
EXIT_NO_GPU = 4  # `plan --measure` asked for a measurement this machine cannot make
EXIT_OVER_CAP = 5  # `plan --measure --cap`: the config overran the profile's budget on the GPU


def _gib(n: int) -> str:
    """Bytes as GiB with two decimals."""
    return f"{n / GiB:.2f}"


def _quiet_libraries() -> None:
    """Keep third-party import chatter out of user output (errors still show)."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    for name in ("torchao", "transformers", "gptqmodel", "torch.utils._pytree"):
        logging.getLogger(name).setLevel(logging.ERROR)


def _cmd_profiles(args: argparse.Namespace, out: Console) -> int:
    """List profiles, or show one."""
    from edgeqra.profiles import list_profiles, load_profile

    extra = args.profiles_dir or ()
    names = [n for n in args.name if n != "show"] if args.name[:1] == ["show"] else args.name
    if len(names) > 1:
        raise EdgeQRAError(f"`profiles show` takes one profile name, got {names}; pass just one")
    if names:
        profile = load_profile(names[0], extra_dirs=extra)
        data = _profile_json(profile)
        if args.json:
            print(json.dumps(data, indent=2))
            return EXIT_OK
        table = Table(title=profile.display_name, show_header=False)
        for key, value in data.items():
            table.add_row(key, str(value))
        out.print(table)
        return EXIT_OK
    profiles = list_profiles(extra_dirs=extra)
    if args.json:
        print(json.dumps([_profile_json(p) for p in profiles], indent=2))
        return EXIT_OK
    table = Table(title="Device profiles")
    for column in (
        "name",
        "device",
        "memory GiB",
        "budget GiB",
        "reserve MiB",
        "cc",
        "bits",
        "mode",
    ):
        table.add_column(column, justify="right" if "GiB" in column or "MiB" in column else "left")
    for p in profiles:
        table.add_row(
            p.name,
            p.display_name,
            f"{p.memory_gib:g}",
            _gib(p.budget_bytes),
            f"{p.runtime_reserve_mib:g}",
            p.compute_capability,
            ",".join(map(str, p.bits)),
            p.mode.value,
        )
    out.print(table)
    return EXIT_OK


def _profile_json(profile: object) -> dict[str, object]:
    """A profile as a flat JSON-ready dict."""
    p = profile
    return {
        "name": p.name,
        "display_name": p.display_name,
        "memory_gib": p.memory_gib,
        "unified_memory": p.unified_memory,
        "os_reserved_gib": p.os_reserved_gib,
        "runtime_reserve_mib": p.runtime_reserve_mib,
        "budget_bytes": p.budget_bytes,
        "compute_capability": p.compute_capability,
        "kernels": list(p.kernels),
        "bits": list(p.bits),
        "mode": p.mode.value,
        "inference": {"batch": p.inference.batch, "context": p.inference.context},
        "finetune": {
            "micro_batch": p.finetune.micro_batch,
            "seq_len": p.finetune.seq_len,
            "gradient_checkpointing": p.finetune.gradient_checkpointing,
        },
        "source": p.source,
        "path": str(p.path) if p.path else None,
    }


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

    profile = load_profile(args.profile, extra_dirs=args.profiles_dir or ())
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
        return _plan_capped(hf_config, spec, plan, args, out)
    unpruned = _unpruned_totals(path, plan, args.group_size)
    if args.json:
        extra: dict[str, object] = {} if unpruned is None else {"unpruned": unpruned}
        if args.measure:
            extra["measured"], extra["measure_error"] = _plan_measurement(hf_config, plan, args)
        print(json.dumps({"model": args.model, **plan.to_json(), **extra}, indent=2))
        return EXIT_NO_GPU if args.measure and extra["measured"] is None else EXIT_OK
    title = (
        f"{args.model} on {profile.display_name} — {plan.mode.value} budget "
        f"{_gib(profile.budget_bytes)} GiB (batch/context or micro-batch/seq from the profile)"
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
        table.add_row(c.replace("_", " "), *[_gib(row.breakdown.components[c]) for row in rows])
    table.add_row("[bold]total[/]", *[f"[bold]{_gib(row.breakdown.total)}[/]" for row in rows])
    table.add_row("fits", *["[green]yes[/]" if row.fits else "[red]no[/]" for row in rows])
    if unpruned is not None:  # a pruned folder: the same configs on the original model
        before = unpruned["totals"]
        table.add_row("unpruned", *[_gib(before[row.label]) for row in rows])
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
            f"minimum is {_gib(plan.minimum.breakdown.total)} GiB.[/]"
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


def _plan_capped(hf_config, spec, plan, args: argparse.Namespace, out: Console) -> int:
    """``plan --measure --cap``: run the planned (or ``--config``) config under the budget."""
    import dataclasses
    import tempfile
    from pathlib import Path

    import torch

    from edgeqra.space import Config

    if not args.measure:
        flag = "--cap" if args.cap else "--config"
        raise EdgeQRAError(f"`{flag}` picks what `--measure` runs; add `--measure`")
    config = plan.planned.config if args.config is None else Config.parse(args.config)
    if len(config) != spec.n_units:
        raise EdgeQRAError(
            f"`--config` has {len(config)} units but `{args.model}` has {spec.n_units} "
            "decoder layers; give one `bits/rank` per layer"
        )
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
            f"{_gib(result.budget_bytes)} GiB (cap {_gib(result.cap_bytes)} GiB for PyTorch)",
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
            _gib(ph["predicted_without_reserve"]),
            _gib(m["peak_allocated"]),
            f"{ph['error_allocated_pct']:+.1f} %",
            _gib(ph["predicted_total"]),
            _gib(m["process_peak"]),
        )
    out.print(table)
    kernels = "; ".join(f"{mode}: {k}" for mode, k in record["kernels"].items())
    out.print(f"kernels by bit-width: {kernels or 'none (16-bit)'}", highlight=False)


def _cmd_prune(args: argparse.Namespace, out: Console) -> int:
    """Prune a model (Torch-Pruning) into a new HF folder with pruning.json."""
    from pathlib import Path

    from edgeqra.pipeline import resolve_device
    from edgeqra.prune import PruneSettings, prune_folder

    settings = PruneSettings(**{k: getattr(args, k) for k in _PRUNE_FIELDS})
    device = resolve_device(args.device)
    with (
        out.status(f"pruning `{escape(args.model)}` ({settings.importance.value}, ratio "
                   f"{settings.ratio})…"),
        contextlib.redirect_stdout(sys.stderr),
    ):  # fmt: skip
        record = prune_folder(
            args.model,
            Path(args.out),
            settings,
            device=device,
            trust_remote_code=args.trust_remote_code,
        )
    if args.json:
        brief = {k: v for k, v in record.items() if k not in ("kept", "source_config")}
        print(json.dumps({"out": args.out, **brief}, indent=2))
        return EXIT_OK
    shapes, params = record["shapes"], record["parameters"]
    table = Table(title=f"pruned {args.model} -> {args.out}")
    for column in ("", "before", "after"):
        table.add_column(column, justify="left" if not column else "right")
    for key in ("intermediate_size", "num_attention_heads", "num_key_value_heads"):
        table.add_row(key, str(shapes["before"][key]), str(shapes["after"][key]))
    table.add_row("parameters", f"{params['before']:,}", f"{params['after']:,}")
    out.print(table)
    out.print(
        f"removed {params['removed_fraction']:.1%} of the parameters in {record['seconds']:.1f} s; "
        f"plan it against the original: edgeqra plan --profile P --model {args.out}",
        highlight=False,
        soft_wrap=True,
    )
    return EXIT_OK


_PRUNE_FIELDS = (
    "ratio",
    "importance",
    "layout",
    "calib_samples",
    "calib_seq_len",
    "calibration",
    "seed",
    "heads",
    "round_to",
)


def _prune_args(p: argparse.ArgumentParser) -> None:
    """`edgeqra prune`'s options, with PruneSettings' help and defaults (said once there)."""
    import dataclasses

    from edgeqra.prune import Importance, Layout, PruneSettings

    choices = {"importance": [i.value for i in Importance], "layout": [x.value for x in Layout]}
    for f in dataclasses.fields(PruneSettings):
        default = f.default.value if hasattr(f.default, "value") else f.default
        kind = {"ratio": float, "calibration": str}.get(f.name, str if f.name in choices else int)
        p.add_argument(
            f"--{f.name.replace('_', '-')}",
            type=kind,
            default=default,
            choices=choices.get(f.name),
            help=f.metadata["help"] + ("" if default is None else f" (default {default})"),
        )


def _int_list(text: str) -> tuple[int, ...]:
    """``"2,3,4,8"`` -> (2, 3, 4, 8) for argparse."""
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}"
        ) from None


def _requested_config(args: argparse.Namespace, n_units: int) -> Config:
    """The config named by --config / --uniform / --fp16."""
    from edgeqra.space import FP16_BITS, Config

    if args.config is not None:
        return Config.parse(args.config)
    if args.fp16:
        return Config.uniform(n_units, FP16_BITS, args.rank)
    return Config.uniform(n_units, args.uniform, args.rank)


def _cmd_evaluate(args: argparse.Namespace, out: Console) -> int:
    """Tune one config for --steps and score it on the task's held-out split."""
    from transformers import AutoConfig

    from edgeqra.memory import ModelSpec
    from edgeqra.models import resolve_model
    from edgeqra.pipeline import prepare
    from edgeqra.profiles import load_profile
    from edgeqra.space import FP16_BITS, SearchSpace

    if args.profile:
        load_profile(args.profile)  # fail fast on a bad profile name
    # Check the config against the model's shape before any loading or GPTQ.
    with out.status(f"reading model `{args.model}`…"):
        path = resolve_model(args.model)
        shape = ModelSpec.from_config(
            AutoConfig.from_pretrained(
                path, local_files_only=True, trust_remote_code=args.trust_remote_code
            )
        )
    config = _requested_config(args, shape.n_units)
    SearchSpace(shape.n_units, args.bits, args.ranks).validate(config)
    job = _eval_job(args, steps=args.steps)
    needed = tuple(sorted({c.bits for c in config if c.bits < FP16_BITS}))
    # Third-party banners (GPTQModel prints one on import) go to stderr: stdout stays clean JSON.
    with contextlib.redirect_stdout(sys.stderr):
        prepared = prepare(job, needed_bits=needed, progress=not args.json)
        result = prepared.evaluator.evaluate(config, args.steps)
    data = {
        "model": args.model,
        "task": args.task,
        "device": prepared.device,
        "profile": args.profile,
        "average_bits": config.average_bits(prepared.spec.unit_params),
        **result.to_json(),
    }
    if args.json:
        print(json.dumps(data, indent=2))
        return EXIT_OK
    table = Table(
        title=f"{args.task}: {config.short()} after {args.steps} steps", show_header=False
    )
    table.add_row("score", f"{result.score:.4f} ({result.metric})")
    if result.accuracy is not None:
        table.add_row("accuracy", f"{result.accuracy:.4f}")
        table.add_row("accuracy (length-normalised)", f"{result.accuracy_norm:.4f}")
    table.add_row("held-out loss / perplexity", f"{result.loss:.4f} / {result.perplexity:.2f}")
    table.add_row("average bits", f"{data['average_bits']:.2f}")
    memory = f"{_gib(result.memory_bytes)} GiB"
    if result.fits is not None:
        memory += f" on {args.profile}: " + (
            "[green]fits[/]" if result.fits else "[red]does not fit[/]"
        )
    table.add_row("predicted memory", memory)
    table.add_row("time", f"{result.seconds:.1f} s on {prepared.device}")
    out.print(table)
    return EXIT_OK


def _eval_job(args: argparse.Namespace, *, steps: int):
    """The EvalJob that ``evaluate`` and ``search`` build from the shared tuning options."""
    from edgeqra.evaluate import EvalSettings
    from edgeqra.pipeline import EvalJob
    from edgeqra.tune import TuneSettings

    return EvalJob(
        model=args.model,
        task=args.task,
        bits=args.bits,
        ranks=args.ranks,
        group_size=args.group_size,
        calib_samples=args.calib_samples,
        tune=TuneSettings(
            steps=steps,
            lr=args.lr,
            batch_size=args.batch_size,
            seed=args.seed,
            gradient_checkpointing=args.gradient_checkpointing,
        ),
        eval=EvalSettings(
            n_train=args.n_train, n_eval=args.n_eval, seq_len=args.seq_len, metric=args.metric
        ),
        device=args.device,
        profile=args.profile,
        trust_remote_code=args.trust_remote_code,
    )


def _cmd_search(args: argparse.Namespace, out: Console) -> int:
    """Joint bit/rank search under the profile's budget; everything lands in a run directory."""
    import dataclasses
    import time
    from pathlib import Path

    from edgeqra.pipeline import SearchJob, open_run_dir
    from edgeqra.profiles import load_profile
    from edgeqra.search.bayes import BayesSettings
    from edgeqra.search.driver import SearchSettings
    from edgeqra.search.evolution import EvolutionSettings
    from edgeqra.search.executors import check_available

    if args.resume:
        run_dir = Path(args.resume)
        job = open_run_dir(run_dir, None, resume=True)
        if _executor_given(args):  # resume elsewhere (e.g. on the cluster): same answers
            job = dataclasses.replace(job, executor=_executor_settings(args, job.executor))
        check_available(job.executor)
    else:
        if not args.profile:
            raise EdgeQRAError("`search` needs `--profile NAME` (or `--resume RUN_DIR`)")
        load_profile(args.profile)  # fail fast on a bad profile name
        executor = _executor_settings(args)
        check_available(executor)  # e.g. Ray missing: say so before any work
        settings = SearchSettings(
            steps=args.steps,
            eta=args.eta,
            n_rungs=args.rungs,
            max_evals=args.evals,
            time_limit=args.time_limit,
            seed=args.seed,
            use_sensitivity=args.sensitivity,
            use_evolution=args.evolution,
            use_bayes=args.bayes,
            fill=args.fill,
            evolution=EvolutionSettings(
                population=args.population,
                children=args.children,
                generations=args.generations,
                front=args.front or args.alpha is not None,  # a trade-off needs a front
            ),
            bayes=BayesSettings(seed=args.seed, method=args.stage3),
        )
        job = SearchJob(
            eval=_eval_job(args, steps=args.steps),
            search=settings,
            budget_gb=args.budget_gb,
            budget_bits=args.budget_bits,
            baseline_rank=args.baseline_rank,
            final_steps=args.final_steps,
            alpha=args.alpha,
            baselines=args.baselines,
            executor=executor,
        )
        run_dir = Path(args.out or Path("runs") / time.strftime("search-%Y%m%d-%H%M%S"))
        open_run_dir(run_dir, job, resume=False)

    summary = _run_search(job, run_dir, quiet=args.json)
    _print_summary(summary, run_dir, job, out, as_json=args.json)
    return EXIT_OK


def _executor_given(args: argparse.Namespace) -> bool:
    """Whether any executor option was on the command line."""
    return any(
        getattr(args, k) is not None for k in ("executor", "workers", "ray_address", "attempts")
    )


def _executor_settings(args: argparse.Namespace, base=None):
    """ExecutorSettings from --executor/--workers/--ray-address/--attempts over ``base``."""
    from edgeqra.search.executors import ExecutorSettings

    base = base or ExecutorSettings()
    kind = args.executor or ("ray" if args.ray_address else base.kind)
    return ExecutorSettings(
        kind=kind,
        workers=args.workers if args.workers is not None else base.workers,
        ray_address=args.ray_address if args.ray_address is not None else base.ray_address,
        attempts=args.attempts if args.attempts is not None else base.attempts,
    )


def _running(event) -> str:
    """What each busy worker evaluates, e.g. ``w0 cpu: 4/8x6@8  w1 cpu: …``."""
    return "  ".join(f"{r.worker}: {r.config.short()}@{r.fidelity}" for r in event.running)


def _run_search(job, run_dir, *, quiet: bool) -> dict[str, object]:
    """Run (or resume) ``job`` in ``run_dir`` with live progress on a terminal, one plain line
    per evaluation otherwise (CI logs), nothing but the summary with ``quiet``."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

    from edgeqra.pipeline import run_search_job
    from edgeqra.space import Config

    err = Console(stderr=True)
    with Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=err,
        disable=quiet or not err.is_terminal,  # CI logs get plain lines, no live redraw
        transient=True,
    ) as bar:
        task = bar.add_task("preparing", total=job.search.max_evals)
        parallel = job.executor.kind != "local"
        # The second line of the live display: one "worker: config@steps" per busy worker.
        flight = bar.add_task("", total=None, visible=False)

        def on_event(event) -> None:
            best = "—" if event.best_score is None else f"{event.best_score:.4f}"
            busy = f" · {len(event.running)} running" if parallel else ""
            bar.update(
                task,
                completed=min(event.evaluations, job.search.max_evals),
                description=f"{event.stage} · best {best} · front {event.front_size}{busy}",
            )
            bar.update(flight, description=_running(event) if parallel else "", visible=parallel)
            r = event.result
            if r is not None and not quiet:
                mem = "" if r.memory_bytes is None else f"{_gib(r.memory_bytes)} GiB"
                hit = " (journal)" if event.cached else f" {r.seconds:.1f} s"
                if parallel and event.worker:
                    hit += escape(f" [{event.worker}]")  # a literal bracket, not rich markup
                bar.console.print(
                    f"  {event.stage:<18} steps {r.fidelity:>4}  score {r.score:.4f}  {mem}"
                    f"{hit}  {escape(Config.parse(r.config).short())}",
                    highlight=False,
                    soft_wrap=True,  # one line per evaluation, also in narrow CI logs
                )
            elif event.message and not quiet:
                bar.console.print(f"[bold]{event.stage}[/]: {escape(event.message)}")

        with contextlib.redirect_stdout(sys.stderr):  # library banners stay off stdout
            return run_search_job(job, run_dir, on_event=on_event, progress=not quiet)


def _print_summary(summary, run_dir, job, out: Console, *, as_json: bool) -> None:
    """The run's result: JSON on stdout, or a table."""
    if as_json:
        print(json.dumps({"run_dir": str(run_dir), **summary}, indent=2))
        return
    chosen = summary["chosen"]
    final = chosen["final"]
    table = Table(title=f"Search on {summary['profile']} ({summary['task']})", show_header=False)
    table.add_row("chosen config (bits/rank per layer)", chosen["short"])
    table.add_row("average bits", f"{chosen['average_bits']:.2f}")
    table.add_row(
        "predicted memory / budget",
        f"{_gib(chosen['predicted_memory_bytes'])} / {summary['budget_gib']:.2f} GiB",
    )
    table.add_row(
        f"score after {final['fidelity']} steps", f"{final['score']:.4f} ({final['metric']})"
    )
    for label, base in summary["baselines"].items():
        table.add_row(f"  {label} rank {job.baseline_rank}", f"{base['score']:.4f}")
    s = summary["search"]
    table.add_row(
        "search",
        f"{s['evaluations']} evaluations ({s['fresh_evaluations']} run now), "
        f"{s['seconds']:.0f} s, {s['epochs']:.2f} epochs; stopped: {s['stopped']}",
    )
    table.add_row("run directory", str(run_dir))
    out.print(table)
    out.print(f"per-layer config: {chosen['config']}", highlight=False, soft_wrap=True)


def _cmd_run(args: argparse.Namespace, out: Console) -> int:
    """Run a job file: (prune ->) search -> final tuning (-> export), no terminal needed."""
    import dataclasses
    from pathlib import Path

    from edgeqra.job import load_job, with_out
    from edgeqra.pipeline import PRUNED_DIR, open_run_dir
    from edgeqra.profiles import load_profile

    spec = load_job(args.job)
    if args.out:
        spec = with_out(spec, Path(args.out))
    if args.resume:
        job = open_run_dir(spec.out, None, resume=True)
        expected = spec.search
        if spec.prune is not None:  # the run's model is its pruned folder (pipeline.prune_stage)
            pruned = str((spec.out / PRUNED_DIR).resolve())
            expected = dataclasses.replace(
                expected, eval=dataclasses.replace(expected.eval, model=pruned)
            )
        if job.to_json() != expected.to_json():
            Console(stderr=True).print(
                f"[yellow]note:[/] `{escape(str(spec.out))}` was started from a different job; "
                "resuming it with the settings in its job.json",
                highlight=False,
            )
    else:
        load_profile(spec.search.eval.profile or "")  # fail fast on a bad profile name
        if spec.prune is not None and not args.json:
            Console(stderr=True).print(
                f"prune: ratio {spec.prune.ratio} ({spec.prune.importance.value}) into "
                f"{escape(str(spec.out / PRUNED_DIR))}",
                highlight=False,
            )
        with contextlib.redirect_stdout(sys.stderr):
            job = open_run_dir(spec.out, spec.search, resume=False, prune=spec.prune)
    summary = _run_search(job, spec.out, quiet=args.json)
    if spec.export:  # the job's `export = [...]`, recorded in summary.json
        from edgeqra.exporters import export_run

        with _stages(quiet=args.json) as on_stage, contextlib.redirect_stdout(sys.stderr):
            summary["exports"] = export_run(spec.out, spec.export, on_stage=on_stage)
    _print_summary(summary, spec.out, job, out, as_json=args.json)
    if not args.json:
        for fmt, path in summary.get("exports", {}).items():
            out.print(f"{fmt} package: {spec.out / path}", highlight=False, soft_wrap=True)
        out.print(f"summary: {spec.out / 'summary.json'}", highlight=False, soft_wrap=True)
    return EXIT_OK


@contextlib.contextmanager
def _stages(*, quiet: bool):
    """A rich spinner over an export's stages, and one printed line per stage (CI logs too)."""
    from rich.progress import Progress, SpinnerColumn, TimeElapsedColumn

    err = Console(stderr=True)
    live = not quiet and err.is_terminal
    with Progress(
        SpinnerColumn(),
        "[progress.description]{task.description}",
        TimeElapsedColumn(),
        console=err,
        disable=not live,
        transient=True,
    ) as bar:
        task = bar.add_task("export", total=None)

        def on_stage(message: str) -> None:
            bar.update(task, description=message)
            if not quiet:
                bar.console.print(f"  export: {escape(message)}", highlight=False, soft_wrap=True)

        yield on_stage


def _merge_settings(args: argparse.Namespace):
    """The export's merge settings from its flags."""
    from edgeqra.exporters.merge import MergeSettings

    return MergeSettings(
        method=args.merge, threshold=args.merge_threshold, over_threshold=args.over_threshold
    )


def _cmd_export(args: argparse.Namespace, out: Console) -> int:
    """Package a finished run in one format; print where it went and the scores."""
    from pathlib import Path

    from edgeqra.exporters import export_package

    with _stages(quiet=args.json) as on_stage, contextlib.redirect_stdout(sys.stderr):
        result = export_package(
            Path(args.run_dir),
            args.format,
            Path(args.out) if args.out else None,
            archive=args.archive,
            force=args.force,
            on_stage=on_stage,
            merge=_merge_settings(args),
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
    table.add_row(f"after merge ({args.merge}, reloaded)", score(s["after_merge"]))
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


def _parser() -> argparse.ArgumentParser:
    """The argument parser (help text lives here once)."""
    parser = argparse.ArgumentParser(
        prog="edgeqra",
        description="Joint per-layer GPTQ bit-width / LoRA rank search under a device memory budget.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = parser.add_subparsers(dest="command", required=True)

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", action="store_true", help="print JSON for machines")
    common.add_argument(
        "--profiles-dir",
        action="append",
        metavar="DIR",
        help="extra folder of profile TOML files (repeatable)",
    )

    p = sub.add_parser("profiles", parents=[common], help="list device profiles, or show one")
    p.add_argument(
        "name",
        nargs="*",
        metavar="[show] NAME",
        help="profile name or .toml path to show (`edgeqra profiles show NAME`)",
    )
    p.set_defaults(func=_cmd_profiles)

    p = sub.add_parser("plan", parents=[common], help="memory of the baselines on a profile")
    p.add_argument("--profile", required=True, help="profile name or .toml path")
    p.add_argument(
        "--model",
        default="smollm2",
        help="`smollm2` (embedded default), a HF folder (config.json is enough) or a .gguf",
    )
    p.add_argument("--rank", type=int, default=8, help="uniform LoRA rank of the baselines")
    p.add_argument("--group-size", type=int, default=64, help="GPTQ group size")
    p.add_argument("--budget-gb", type=float, help="override the profile's usable budget (GiB)")
    p.add_argument(
        "--budget-bits",
        type=float,
        metavar="B",
        help="budget = the predicted memory of a rank-8 config averaging B bits (e.g. 3.5)",
    )
    p.add_argument(
        "--mode",
        choices=["inference", "finetune", "both"],
        help="which workload the budget is checked for (default: the profile's)",
    )
    p.add_argument("--trust-remote-code", action="store_true", help="allow custom model code")
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

    p = sub.add_parser(
        "prune",
        parents=[common],
        help="structured pruning (Torch-Pruning) into a new HF folder, before plan/search",
        description="Every decoder layer loses the same share of MLP channels and query heads "
        "(GQA groups kept consistent); OUT gets safetensors, config, tokenizer and "
        "pruning.json, written atomically. Bad input exits 2 and writes nothing.",
    )
    p.add_argument("--model", default="smollm2", help="`smollm2`, a HF folder or a .gguf file")
    p.add_argument("--out", required=True, help="the new model folder (must not exist)")
    _prune_args(p)
    p.add_argument("--device", default="auto", help="auto, cpu or cuda (importance pass)")
    p.add_argument("--trust-remote-code", action="store_true", help="allow custom model code")
    p.set_defaults(func=_cmd_prune)

    tuning = argparse.ArgumentParser(add_help=False)  # what fixes one evaluation
    _tuning_args(tuning)

    p = sub.add_parser(
        "evaluate",
        parents=[common, tuning],
        help="tune one (bits, rank) config for N steps and score it",
    )
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument(
        "--config",
        metavar="SPEC",
        help="one bits/rank per unit, e.g. `4/8,4/8,8/16,…`, or a JSON file",
    )
    which.add_argument("--uniform", type=int, metavar="BITS", help="uniform GPTQ bit-width")
    which.add_argument("--fp16", action="store_true", help="no quantization (FP16 LoRA baseline)")
    p.add_argument("--rank", type=int, default=8, help="LoRA rank for --uniform / --fp16")
    p.add_argument("--steps", type=int, required=True, help="tuning steps (the fidelity)")
    p.add_argument("--profile", help="check the predicted memory against this profile")
    p.set_defaults(func=_cmd_evaluate)

    p = sub.add_parser(
        "search",
        parents=[common, tuning],
        help="joint per-layer bits/rank search under a profile's memory budget",
    )
    p.add_argument("--profile", help="profile name or .toml path (the hard budget)")
    p.add_argument("--budget-gb", type=float, help="override the profile's usable budget (GiB)")
    p.add_argument(
        "--budget-bits",
        type=float,
        metavar="B",
        help="budget = the predicted memory of a rank-8 config averaging B bits (e.g. 3.5)",
    )
    p.add_argument("--steps", type=int, default=64, help="full-length tuning steps (top fidelity)")
    p.add_argument("--evals", type=int, default=60, help="evaluations at any fidelity")
    p.add_argument("--time-limit", type=float, metavar="S", help="wall-time budget in seconds")
    p.add_argument("--out", help="run directory (default runs/search-DATE-TIME)")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue a killed search from its journal")
    p.add_argument("--eta", type=int, default=4, help="successive-halving ratio between rungs")
    p.add_argument("--rungs", type=int, default=3, help="fidelity rungs (steps / eta^k)")
    p.add_argument("--population", type=int, default=8, help="NSGA-II population")
    p.add_argument("--children", type=int, default=8, help="children per generation")
    p.add_argument("--generations", type=int, default=6, help="at most this many generations")
    p.add_argument("--final-steps", type=int, help="tuning steps of the chosen config")
    p.add_argument(
        "--alpha", type=float, help="pick the front's trade-off point α·score−(1−α)·memory"
    )
    p.add_argument(
        "--fill",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="raise every candidate's bits/ranks to the budget before it is evaluated",
    )
    p.add_argument(
        "--stage3",
        choices=["gp", "lengler"],
        default="gp",
        help="stage 3: the GP with expected improvement in a trust region, or nevergrad's "
        "discrete (1+1) evolution (DiscreteLenglerOnePlusOne) from the best config",
    )
    p.add_argument(
        "--front",
        action="store_true",
        help="rank candidates on score and memory (the whole front), not on score under the "
        "budget (implied by --alpha)",
    )
    p.add_argument("--baseline-rank", type=int, default=8, help="rank of the uniform baselines")
    p.add_argument(
        "--baselines",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="score the uniform baselines that fit, for the summary",
    )
    for stage, what in (
        ("sensitivity", "stage 1 warm start"),
        ("evolution", "stage 2"),
        ("bayes", "stage 3 refinement"),
    ):
        p.add_argument(
            f"--{stage}",
            action=argparse.BooleanOptionalAction,
            default=True,
            help=f"run {what} (turn off for ablations)",
        )
    p.add_argument(
        "--executor",
        choices=["local", "processes", "ray"],
        help="where evaluations run: in process (default), worker processes (one per GPU, "
        "or N on CPU), or Ray (`pip install 'edgeqra[ray]'`); the answers are the same",
    )
    p.add_argument(
        "--workers", type=int, help="parallel workers (default: one per visible GPU, 2 on CPU)"
    )
    p.add_argument(
        "--ray-address",
        metavar="ADDR",
        help="join this Ray cluster (e.g. `auto` or `ray://head:10001`) instead of starting one",
    )
    p.add_argument(
        "--attempts", type=int, help="tries per evaluation before it is journaled failed (3)"
    )
    p.set_defaults(func=_cmd_search)

    p = sub.add_parser(
        "run",
        parents=[common],
        help="run a job file (search, final tuning, export) without a terminal, e.g. in CI",
        description="Exit codes: 0 done, 1 internal error, 2 bad input (job file, model, "
        "data), 3 no config fits the budget. The run directory gets summary.json "
        "(schema: edgeqra/schemas/summary.schema.json).",
    )
    p.add_argument("job", help="the job file (.toml); see examples/")
    p.add_argument("--resume", action="store_true", help="continue the job's run directory")
    p.add_argument("--out", help="run directory instead of the job file's `out`")
    p.set_defaults(func=_cmd_run)

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
    p.add_argument(
        "--merge",
        choices=["grid", "requantize"],
        default="grid",
        help="gptq/onnx: round W+BA onto the bank's own grid with GPTQ error feedback (grid, "
        "default) or run GPTQModel again on the merged weights (requantize, the old way)",
    )
    p.add_argument(
        "--merge-threshold",
        type=float,
        default=0.5,
        help="a layer whose merge loses more than this fraction of its adapter's effect on "
        "its outputs is kept unmerged (see --over-threshold; default 0.5)",
    )
    p.add_argument(
        "--over-threshold",
        choices=["report", "unmerged", "upbits"],
        default="unmerged",
        help="layers over the threshold: keep their adapter unmerged (unmerged, default: the "
        "package loads as base + adapter), merge anyway (report), or merge at the next "
        "bit-width up if the budget allows (upbits)",
    )
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
    return parser


def _tuning_args(p: argparse.ArgumentParser) -> None:
    """Options that fix one evaluation: model, data, space, tuning (evaluate and search)."""
    p.add_argument("--model", default="smollm2", help="`smollm2`, a HF folder or a .gguf file")
    p.add_argument(
        "--task",
        default="arc_easy",
        help="arc_easy, arc_challenge, boolq, piqa, hellaswag, winogrande, openbookqa, "
        "c4, wiki, … or a .txt/.jsonl file",
    )
    p.add_argument("--bits", type=_int_list, default=(2, 3, 4, 8), help="allowed bit-widths Q")
    p.add_argument("--ranks", type=_int_list, default=(0, 4, 8, 16, 32), help="allowed ranks R")
    p.add_argument("--n-train", type=int, default=512, help="train examples")
    p.add_argument("--n-eval", type=int, default=200, help="held-out items / documents")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per training row")
    p.add_argument("--batch-size", type=int, default=4, help="training micro-batch")
    p.add_argument("--lr", type=float, default=2e-4, help="AdamW learning rate")
    p.add_argument("--metric", default="auto", choices=["auto", "acc", "acc_norm", "loss"])
    p.add_argument("--group-size", type=int, default=64, help="GPTQ group size")
    p.add_argument(
        "--calib-samples", type=int, default=32, help="GPTQ calibration rows of 256 tokens"
    )
    p.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=False)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--trust-remote-code", action="store_true", help="allow custom model code")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``edgeqra`` console script."""
    _quiet_libraries()
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING)
    _quiet_libraries()
    out = Console()
    err = Console(stderr=True)
    try:
        return args.func(args, out)
    except BudgetError as exc:
        err.print(f"[red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
        return EXIT_BUDGET
    except EdgeQRAError as exc:
        err.print(f"[red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
        return EXIT_INPUT
    except Exception as exc:  # noqa: BLE001 - a bug, not bad input: exit 1 with the reason
        if args.verbose:
            err.print_exception()
        err.print(
            f"[red]internal error:[/] {type(exc).__name__}: {escape(str(exc))} "
            "(rerun with --verbose for the traceback; please report it)",
            highlight=False,
            soft_wrap=True,
        )
        return EXIT_INTERNAL


if __name__ == "__main__":
    sys.exit(main())
