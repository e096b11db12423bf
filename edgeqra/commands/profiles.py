"""``edgeqra profiles``: list the device profiles, or show one."""

from __future__ import annotations

import argparse
import json

from rich.console import Console
from rich.table import Table

from edgeqra.commands._common import EXIT_OK, gib
from edgeqra.errors import EdgeQRAError


def add_parser(sub, common: argparse.ArgumentParser) -> None:
    """Register ``profiles``."""
    p = sub.add_parser("profiles", parents=[common], help="list device profiles, or show one")
    p.add_argument(
        "name",
        nargs="*",
        metavar="[show] NAME",
        help="profile name or .toml path to show (`edgeqra profiles show NAME`)",
    )
    p.set_defaults(func=_cmd_profiles)


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
            gib(p.budget_bytes),
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
