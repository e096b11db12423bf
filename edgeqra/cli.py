"""The ``edgeqra`` command: thin argument parsing over the library, rich output, ``--json``.

Exit codes: 0 success, 1 internal error, 2 bad input (an :class:`EdgeQRAError`, one red
line), 3 nothing fits the memory budget, 4 ``plan --measure`` without a CUDA GPU (the
prediction is printed, nothing was measured), 5 ``plan --measure --cap``: a phase ran out
of the profile's budget (one line names it).

The subcommands live in :mod:`edgeqra.commands`, one module each; their options for settings
are generated from the settings schema (:mod:`edgeqra.settings`), so a setting's flag, help
and default are said once, on its dataclass field.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

from rich.console import Console
from rich.markup import escape

from edgeqra.commands import evaluate, export, plan, profiles, prune, search
from edgeqra.commands._common import (
    EXIT_BUDGET,
    EXIT_INPUT,
    EXIT_INTERNAL,
    EXIT_NO_GPU,
    EXIT_OK,
    EXIT_OVER_CAP,
)
from edgeqra.errors import BudgetError, EdgeQRAError

__all__ = [
    "EXIT_BUDGET",
    "EXIT_INPUT",
    "EXIT_INTERNAL",
    "EXIT_NO_GPU",
    "EXIT_OK",
    "EXIT_OVER_CAP",
    "main",
]


def _quiet_libraries() -> None:
    """Keep third-party import chatter out of user output (errors still show)."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    for name in ("torchao", "transformers", "gptqmodel", "torch.utils._pytree"):
        logging.getLogger(name).setLevel(logging.ERROR)


def _parser() -> argparse.ArgumentParser:
    """The argument parser: each subcommand module adds its own."""
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
    profiles.add_parser(sub, common)
    plan.add_parser(sub, common)
    prune.add_parser(sub, common)
    evaluate.add_parser(sub, common)
    search.add_parsers(sub, common)
    export.add_parsers(sub, common)
    return parser


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
