"""``edgeqra prune``: structured pruning (Torch-Pruning) into a new HF folder."""

from __future__ import annotations

import argparse
import contextlib
import json
import sys

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from edgeqra.commands._common import EXIT_OK, pick, with_defaults

_MODEL_KEYS = ("model", "device", "trust_remote_code")


def add_parser(sub, common: argparse.ArgumentParser) -> None:
    """Register ``prune``: PruneSettings' options, plus the model and where it goes."""
    from edgeqra import settings as schema
    from edgeqra.pipeline import EvalJob
    from edgeqra.prune import PruneSettings

    p = sub.add_parser(
        "prune",
        parents=[common],
        help="structured pruning (Torch-Pruning) into a new HF folder, before plan/search",
        description="Every decoder layer loses the same share of MLP channels and query heads "
        "(GQA groups kept consistent); OUT gets safetensors, config, tokenizer and "
        "pruning.json, written atomically. Bad input exits 2 and writes nothing.",
    )
    p.add_argument("--out", required=True, help="the new model folder (must not exist)")
    schema.add_options(p, pick(EvalJob, _MODEL_KEYS) + schema.settings_of(PruneSettings))
    p.set_defaults(func=_cmd_prune)


def _cmd_prune(args: argparse.Namespace, out: Console) -> int:
    """Prune a model (Torch-Pruning) into a new HF folder with pruning.json."""
    from pathlib import Path

    from edgeqra import settings as schema
    from edgeqra.pipeline import EvalJob, resolve_device
    from edgeqra.prune import PruneSettings, prune_folder

    args = with_defaults(args, pick(EvalJob, _MODEL_KEYS))
    settings = schema.build(PruneSettings, schema.given(args, schema.settings_of(PruneSettings)))
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
