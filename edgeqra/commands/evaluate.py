"""``edgeqra evaluate``: tune one (bits, rank) config for N steps and score it."""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from typing import TYPE_CHECKING

from rich.console import Console
from rich.table import Table

from edgeqra.commands._common import EXIT_OK, gib

if TYPE_CHECKING:
    from edgeqra.space import Config


def add_parser(sub, common: argparse.ArgumentParser) -> None:
    """Register ``evaluate``: the EvalJob's settings, the config, and the steps."""
    from edgeqra import settings as schema
    from edgeqra.pipeline import EvalJob

    p = sub.add_parser(
        "evaluate", parents=[common], help="tune one (bits, rank) config for N steps and score it"
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
    schema.add_options(p, schema.settings_of(EvalJob))
    p.set_defaults(func=_cmd_evaluate)


def _requested_config(args: argparse.Namespace, n_units: int) -> Config:
    """The uniform config named by --uniform / --fp16."""
    from edgeqra.space import FP16_BITS, Config

    if args.fp16:
        return Config.uniform(n_units, FP16_BITS, args.rank)
    return Config.uniform(n_units, args.uniform, args.rank)


def _cmd_evaluate(args: argparse.Namespace, out: Console) -> int:
    """Tune one config for --steps and score it on the task's held-out split."""
    from transformers import AutoConfig

    from edgeqra import settings as schema
    from edgeqra.errors import EdgeQRAError
    from edgeqra.memory import ModelSpec
    from edgeqra.models import resolve_model
    from edgeqra.pipeline import EvalJob, prepare
    from edgeqra.profiles import load_profile
    from edgeqra.space import FP16_BITS, SearchSpace

    if args.steps < 0:
        raise EdgeQRAError(f"`--steps` must be >= 0 (0 = no training), got {args.steps}")
    job = schema.build(EvalJob, schema.given(args, schema.settings_of(EvalJob)))  # validated
    if job.profile:
        load_profile(job.profile)  # fail fast on a bad profile name
    requested = None
    if args.config is not None:  # length and values checked from the header: nothing loads yet
        requested = SearchSpace.from_model(
            job.model, job.bits, job.ranks, trust_remote_code=job.trust_remote_code
        ).parse(args.config)
    # Check the config against the model's shape before any loading or GPTQ.
    with out.status(f"reading model `{job.model}`…"):
        path = resolve_model(job.model)
        shape = ModelSpec.from_config(
            AutoConfig.from_pretrained(
                path, local_files_only=True, trust_remote_code=job.trust_remote_code
            )
        )
    config = requested
    if config is None:  # --uniform / --fp16: their bits and rank checked against the space
        config = _requested_config(args, shape.n_units)
        SearchSpace(shape.n_units, job.bits, job.ranks).validate(config)
    needed = tuple(sorted({c.bits for c in config if c.bits < FP16_BITS}))
    # Third-party banners (GPTQModel prints one on import) go to stderr: stdout stays clean JSON.
    with contextlib.redirect_stdout(sys.stderr):
        prepared = prepare(job, needed_bits=needed, progress=not args.json)
        result = prepared.evaluator.evaluate(config, args.steps)
    data = {
        "model": job.model,
        "task": job.task,
        "device": prepared.device,
        "profile": job.profile,
        "average_bits": config.average_bits(prepared.spec.unit_params),
        **result.to_json(),
    }
    if args.json:
        print(json.dumps(data, indent=2))
        return EXIT_OK
    table = Table(title=f"{job.task}: {config.short()} after {args.steps} steps", show_header=False)
    table.add_row("score", f"{result.score:.4f} ({result.metric})")
    if result.accuracy is not None:
        table.add_row("accuracy", f"{result.accuracy:.4f}")
        table.add_row("accuracy (length-normalised)", f"{result.accuracy_norm:.4f}")
    table.add_row("held-out loss / perplexity", f"{result.loss:.4f} / {result.perplexity:.2f}")
    table.add_row("average bits", f"{data['average_bits']:.2f}")
    memory = f"{gib(result.memory_bytes)} GiB"
    if result.fits is not None:
        memory += f" on {job.profile}: " + (
            "[green]fits[/]" if result.fits else "[red]does not fit[/]"
        )
    table.add_row("predicted memory", memory)
    table.add_row("time", f"{result.seconds:.1f} s on {prepared.device}")
    out.print(table)
    return EXIT_OK
