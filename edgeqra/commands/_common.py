"""What the subcommands share: exit codes, GiB formatting, settings given on the command line."""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Iterable

from rich.console import Console
from rich.markup import escape

from edgeqra import settings as schema

GiB = 1 << 30
EXIT_OK, EXIT_INTERNAL, EXIT_INPUT, EXIT_BUDGET = 0, 1, 2, 3
EXIT_NO_GPU = 4  # `plan --measure` asked for a measurement this machine cannot make
EXIT_OVER_CAP = 5  # `plan --measure --cap`: the config overran the profile's budget on the GPU


def gib(n: int) -> str:
    """Bytes as GiB with two decimals."""
    return f"{n / GiB:.2f}"


def pick(root: type, keys: Iterable[str]) -> list[schema.Setting]:
    """The settings of ``root`` with these keys, in the order given."""
    by_key = {s.key: s for s in schema.settings_of(root)}
    return [by_key[k] for k in keys]


def with_defaults(args: argparse.Namespace, chosen: list[schema.Setting]) -> argparse.Namespace:
    """``args`` with each chosen setting as a plain attribute (``args.group_size``): the value
    given on the command line, else the setting's default."""
    values = schema.given(args, chosen)
    for s in chosen:
        setattr(args, s.name, values.get(s.key, s.default))
    return args


@contextlib.contextmanager
def stages(*, quiet: bool):
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
