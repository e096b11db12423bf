"""The search view: the search running live in a thread worker (stage, progress, best score,
front scatter, heat strip, log), cancelled and resumed from its journal."""

from __future__ import annotations

import copy
import threading
from pathlib import Path
from typing import Any

from edgeqra.tui.export_screen import ExportScreen
from edgeqra.tui.widgets import heat_strip
from textual import work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.screen import Screen
from textual.widgets import Footer, Header, Label, ProgressBar, RichLog, Static
from textual_plotext import PlotextPlot

from edgeqra.errors import EdgeQRAError
from edgeqra.job import from_mapping
from edgeqra.rundir import RunFiles
from edgeqra.space import Config

__all__ = ["SearchCancelled", "SearchScreen"]


class SearchCancelled(Exception):
    """Raised from the search's progress callback when the user cancels."""


class SearchScreen(Screen[None]):
    """The search running live: stage, progress, best score, front scatter, heat strip, log."""

    BINDINGS = [
        Binding("c", "cancel", "Cancel"),
        Binding("r", "resume", "Resume"),
        Binding("e", "export", "Export"),
        Binding("escape", "app.pop_screen", "Back"),
    ]

    def __init__(self) -> None:
        super().__init__()
        self.cancel = threading.Event()
        self.points: list[tuple[float, float, int]] = []  # (GiB, score, fidelity)
        self.best: Config | None = None
        self.summary: dict[str, Any] | None = None
        self.running = False

    def compose(self) -> ComposeResult:
        yield Header()
        with Horizontal(id="status"):
            yield Label("starting", id="stage")
            yield ProgressBar(id="progress", show_eta=False)
        with Horizontal():
            yield PlotextPlot(id="front")
            with Vertical(id="side"):
                yield Static(id="strip")
                yield RichLog(id="log", wrap=True, markup=True)
        yield Footer()

    def on_mount(self) -> None:
        self.start(resume=False)

    def start(self, *, resume: bool) -> None:
        """Start (or resume) the search in a thread worker."""
        if self.running:
            self.notify("the search is running; cancel it first", severity="warning")
            return
        self.cancel.clear()
        self.running = True
        self._search(copy.deepcopy(self.app.draft), resume)  # type: ignore[attr-defined]

    @work(thread=True, exclusive=True, group="search")
    def _search(self, draft: dict[str, Any], resume: bool) -> None:
        from edgeqra.pipeline import open_run_dir, run_search_job

        call = self.app.call_from_thread

        def on_event(event: Any) -> None:
            if self.cancel.is_set():
                raise SearchCancelled
            call(self._on_event, event)

        try:
            spec = from_mapping(draft)
            if spec.prune is not None and not resume:
                call(self._log, f"pruning (ratio {spec.prune.ratio}) into {spec.out}/pruned")
            job = open_run_dir(
                spec.out, None if resume else spec.search, resume=resume,
                prune=None if resume else spec.prune,
            )  # fmt: skip
            call(self._log, f"run directory [b]{spec.out}[/b]")
            call(self._total, job.search.evals)
            summary = run_search_job(job, spec.out, on_event=on_event, progress=False)
        except SearchCancelled:
            call(self._finish, "cancelled: press r to resume from the journal", None)
        except EdgeQRAError as exc:
            call(self._finish, f"[red]error:[/red] {exc}", None)
        else:
            call(self._finish, "done", summary)

    def _total(self, total: int) -> None:
        self.query_one("#progress", ProgressBar).update(total=total)

    def _log(self, message: str) -> None:
        self.query_one("#log", RichLog).write(message)

    def _on_event(self, event: Any) -> None:
        best = "—" if event.best_score is None else f"{event.best_score:.4f}"
        self.query_one("#stage", Label).update(
            f"{event.stage} · {event.evaluations}/{event.max_evals} · best {best} · "
            f"front {event.front_size}"
        )
        self.query_one("#progress", ProgressBar).update(
            progress=min(event.evaluations, event.max_evals)
        )
        r = event.result
        if r is None:
            if event.message:
                self._log(f"[b]{event.stage}[/b]: {event.message}")
            return
        self.points.append(((r.memory_bytes or 0) / 2**30, r.score, r.fidelity))
        config = Config.parse(r.config)
        self._log(f"{r.fidelity:>4} steps  {r.score:.4f}  {config.short()}")
        top = max(p[2] for p in self.points)
        if r.fidelity == top and (event.best_score is None or r.score >= event.best_score):
            self.best = config
            self.query_one("#strip", Static).update(heat_strip(config))
        self._plot()

    def _plot(self) -> None:
        widget = self.query_one("#front", PlotextPlot)
        plt = widget.plt
        plt.clear_data()
        plt.clear_figure()
        top = max(p[2] for p in self.points)
        low = [p for p in self.points if p[2] < top]
        high = [p for p in self.points if p[2] == top]
        if low:
            plt.scatter([p[0] for p in low], [p[1] for p in low], marker="dot", color="gray")
        plt.scatter([p[0] for p in high], [p[1] for p in high], marker="x", color="green")
        plt.title("score vs memory (GiB); x: full length")
        widget.refresh()

    def _finish(self, message: str, summary: dict[str, Any] | None) -> None:
        self.running = False
        self.summary = summary
        self._log(message)
        if summary is not None:
            chosen = summary["chosen"]
            self._log(
                f"chosen [b]{chosen['short']}[/b]: {chosen['final']['score']:.4f} "
                f"({chosen['final']['metric']}), {chosen['predicted_memory_bytes'] / 2**30:.3f}"
                f" / {summary['budget_gib']:.3f} GiB"
            )
            self.query_one("#strip", Static).update(heat_strip(Config.parse(chosen["config"])))
        self.query_one("#stage", Label).update(message.split(":")[0])

    def action_cancel(self) -> None:
        if self.running:
            self.cancel.set()
            self._log("cancelling after the evaluation in flight…")

    def action_resume(self) -> None:
        self.start(resume=True)

    def action_export(self) -> None:
        if self.running:
            self.notify("the search is running; wait for it or cancel it", severity="warning")
            return
        out = Path(self.app.draft.get("out", "runs/tui"))  # type: ignore[attr-defined]
        if self.summary is None and not RunFiles(out).finished:
            self.notify(
                "nothing to export yet: the search has not finished (r resumes it)",
                severity="warning",
            )
            return
        self.app.push_screen(ExportScreen(out))
