"""``edgeqra search`` and ``edgeqra run``: the joint search, from flags or from a job file.

Both build the same :class:`~edgeqra.pipeline.SearchJob` from the one settings schema
(:mod:`edgeqra.settings`): ``search`` from its flags, ``run`` from the job file (with the
same flags as overrides). A resumed run keeps the settings in its ``job.json``; asking for
different ones is refused, naming the setting (the executor may change: same answers).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from edgeqra import settings as schema
from edgeqra.commands._common import EXIT_OK, gib, stages
from edgeqra.errors import ConfigError, EdgeQRAError

_EXECUTOR_KEYS = ("search.executor", "search.workers", "search.ray_address", "search.attempts")


def _schema() -> list[schema.Setting]:
    from edgeqra.pipeline import SearchJob

    return schema.settings_of(SearchJob)


def add_parsers(sub, common: argparse.ArgumentParser) -> None:
    """Register ``search`` and ``run``."""
    p = sub.add_parser(
        "search",
        parents=[common],
        help="joint per-layer bits/rank search under a profile's memory budget",
    )
    schema.add_options(p, _schema())
    p.add_argument("--out", help="run directory (default runs/search-DATE-TIME)")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue a killed search from its journal")
    p.set_defaults(func=_cmd_search)

    p = sub.add_parser(
        "run",
        parents=[common],
        help="run a job file (search, final tuning, export) without a terminal, e.g. in CI",
        description="Exit codes: 0 done, 1 internal error, 2 bad input (job file, model, "
        "data), 3 no config fits the budget. The run directory gets summary.json "
        "(schema: edgeqra/schemas/summary.schema.json). The search options override the "
        "job file's values.",
    )
    p.add_argument("job", help="the job file (.toml); see examples/")
    p.add_argument("--resume", action="store_true", help="continue the job's run directory")
    p.add_argument("--out", help="run directory instead of the job file's `out`")
    overrides = p.add_argument_group("overrides of the job file's settings")
    schema.add_options(overrides, _schema(), show_defaults=False)
    p.set_defaults(func=_cmd_run)


def _refuse_changes(recorded, asked, where: str) -> None:
    """A resumed run keeps its settings: refuse one that differs (the executor may)."""
    from edgeqra.pipeline import SearchJob

    for s, was, now in schema.differences(recorded, asked, SearchJob):
        if s.key in _EXECUTOR_KEYS:
            continue
        flag = f" (`{s.flag}`)" if s.flag else ""
        raise ConfigError(
            f"`{where}` was started with `{s.key}`{flag} = {was!r}, now {now!r}; a resumed "
            "search keeps its settings: ask for the recorded value, or start a new run "
            "with another `--out`"
        )


def _cmd_search(args: argparse.Namespace, out: Console) -> int:
    """Joint bit/rank search under the profile's budget; everything lands in a run directory."""
    import dataclasses
    import time
    from pathlib import Path

    from edgeqra import pipeline
    from edgeqra.pipeline import SearchJob
    from edgeqra.profiles import load_profile
    from edgeqra.search.executors import check_available

    given = schema.given(args, _schema())
    if args.resume:
        run_dir = Path(args.resume)
        job = pipeline.open_run_dir(run_dir, None, resume=True)
        asked = {k: v for k, v in given.items() if k not in _EXECUTOR_KEYS}
        if asked:  # the same run, asked again: only the settings it was started with
            flat = {s.key: schema.value_of(job, s) for s in _schema()}
            _refuse_changes(job, SearchJob.from_values({**flat, **asked}), str(run_dir))
        if _executor_given(args):  # resume elsewhere (e.g. on the cluster): same answers
            job = dataclasses.replace(job, executor=executor_settings(args, job.executor))
        check_available(job.executor)
    else:
        if "profile" not in given:
            raise EdgeQRAError("`search` needs `--profile NAME` (or `--resume RUN_DIR`)")
        load_profile(given["profile"])  # fail fast on a bad profile name
        executor = executor_settings(args)
        check_available(executor)  # e.g. Ray missing: say so before any work
        rest = {k: v for k, v in given.items() if k not in _EXECUTOR_KEYS}
        job = dataclasses.replace(SearchJob.from_values(rest), executor=executor)
        run_dir = Path(args.out or Path("runs") / time.strftime("search-%Y%m%d-%H%M%S"))
        pipeline.open_run_dir(run_dir, job, resume=False)

    summary = _run_search(job, run_dir, quiet=args.json)
    _print_summary(summary, run_dir, job, out, as_json=args.json)
    return EXIT_OK


def _executor_given(args: argparse.Namespace) -> bool:
    """Whether any executor option was on the command line."""
    return any(k in vars(args) for k in _EXECUTOR_KEYS)


def executor_settings(args: argparse.Namespace, base=None):
    """ExecutorSettings from --executor/--workers/--ray-address/--attempts over ``base``;
    an address alone implies Ray."""
    from edgeqra.search.executors import ExecutorSettings

    base = base or ExecutorSettings()
    given = vars(args)
    kind = given.get("search.executor") or ("ray" if given.get("search.ray_address") else base.kind)
    return ExecutorSettings(
        kind=kind,
        workers=given.get("search.workers", base.workers),
        ray_address=given.get("search.ray_address", base.ray_address),
        attempts=given.get("search.attempts", base.attempts),
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
        task = bar.add_task("preparing", total=job.search.evals)
        parallel = job.executor.kind != "local"
        # The second line of the live display: one "worker: config@steps" per busy worker.
        flight = bar.add_task("", total=None, visible=False)

        def on_event(event) -> None:
            best = "—" if event.best_score is None else f"{event.best_score:.4f}"
            busy = f" · {len(event.running)} running" if parallel else ""
            bar.update(
                task,
                completed=min(event.evaluations, job.search.evals),
                description=f"{event.stage} · best {best} · front {event.front_size}{busy}",
            )
            bar.update(flight, description=_running(event) if parallel else "", visible=parallel)
            r = event.result
            if r is not None and not quiet:
                mem = "" if r.memory_bytes is None else f"{gib(r.memory_bytes)} GiB"
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
        f"{gib(chosen['predicted_memory_bytes'])} / {summary['budget_gib']:.2f} GiB",
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

    from edgeqra import pipeline
    from edgeqra.job import load_job, with_out
    from edgeqra.pipeline import PRUNED_DIR, SearchJob
    from edgeqra.profiles import load_profile
    from edgeqra.rundir import RunFiles

    spec = load_job(args.job)
    if args.out:
        spec = with_out(spec, Path(args.out))
    given = {k: v for k, v in schema.given(args, _schema()).items() if k not in _EXECUTOR_KEYS}
    if given:  # flags over the job file's values, built and validated as one job
        flat = {s.key: schema.value_of(spec.search, s) for s in _schema()}
        spec = dataclasses.replace(spec, search=SearchJob.from_values({**flat, **given}))
    if _executor_given(args):
        executor = executor_settings(args, spec.search.executor)
        spec = dataclasses.replace(spec, search=dataclasses.replace(spec.search, executor=executor))
    if args.resume:
        job = pipeline.open_run_dir(spec.out, None, resume=True)
        expected = spec.search
        if spec.prune is not None:  # the run's model is its pruned folder (pipeline.prune_stage)
            pruned = str((spec.out / PRUNED_DIR).resolve())
            expected = dataclasses.replace(
                expected, eval=dataclasses.replace(expected.eval, model=pruned)
            )
        _refuse_changes(job, expected, str(spec.out))
        job = dataclasses.replace(job, executor=expected.executor)  # may move: same answers
    else:
        load_profile(spec.search.eval.profile or "")  # fail fast on a bad profile name
        if spec.prune is not None and not args.json:
            Console(stderr=True).print(
                f"prune: ratio {spec.prune.ratio} ({spec.prune.importance.value}) into "
                f"{escape(str(spec.out / PRUNED_DIR))}",
                highlight=False,
            )
        with contextlib.redirect_stdout(sys.stderr):
            job = pipeline.open_run_dir(spec.out, spec.search, resume=False, prune=spec.prune)
    summary = _run_search(job, spec.out, quiet=args.json)
    if spec.export:  # the job's `export = [...]`, recorded in summary.json
        from edgeqra.exporters import export_run

        with stages(quiet=args.json) as on_stage, contextlib.redirect_stdout(sys.stderr):
            summary["exports"] = export_run(
                spec.out, spec.export, merge=spec.merge, on_stage=on_stage
            )
    _print_summary(summary, spec.out, job, out, as_json=args.json)
    if not args.json:
        for fmt, path in summary.get("exports", {}).items():
            out.print(f"{fmt} package: {spec.out / path}", highlight=False, soft_wrap=True)
        summary_path = RunFiles(spec.out).summary
        out.print(f"summary: {summary_path}", highlight=False, soft_wrap=True)
    return EXIT_OK
