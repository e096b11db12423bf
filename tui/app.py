"""The edgeqra terminal UI: pick a profile → plan → search live → export, save as a job.

A thin face over the library: the app's only state is a draft job file (the mapping that
:mod:`edgeqra.job` reads and writes), so whatever the screens set is exactly what
``edgeqra run`` would run, and "save job" writes it. Planning and searching call
:func:`edgeqra.plan.make_plan` and :func:`edgeqra.pipeline.run_search_job` in thread
workers so the UI never freezes; the search reports through its ``on_event`` callback.
Cancelling raises inside that callback: the journal already holds every finished
evaluation, so "resume" continues without repeating any. The export screen calls
:func:`edgeqra.exporters.export_package` on the finished run directory, one format at a time,
in a worker too, and shows each package's manifest; the formats it picks go into the draft,
so a saved job exports the same way under ``edgeqra run``.

The views are one module each (``profile_screen``, ``plan_screen``, ``search_screen``,
``export_screen``), the draft and its defaults in ``draft``, the heat strip in ``widgets``;
this module holds the app, the help and :func:`run_tui`, and re-exports the rest.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from edgeqra.tui.draft import DEFAULT_DRAFT, QUICKSTART, default_draft
from edgeqra.tui.export_screen import ExportScreen
from edgeqra.tui.plan_screen import PlanScreen
from edgeqra.tui.profile_screen import ProfileScreen
from edgeqra.tui.search_screen import SearchCancelled, SearchScreen
from edgeqra.tui.widgets import heat_strip
from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.screen import ModalScreen
from textual.widgets import Static

from edgeqra.errors import EdgeQRAError
from edgeqra.job import from_mapping, save_job
from edgeqra.profiles import DeviceProfile, list_profiles

__all__ = [
    "DEFAULT_DRAFT",
    "QUICKSTART",
    "EdgeQRAApp",
    "ExportScreen",
    "HelpScreen",
    "PlanScreen",
    "ProfileScreen",
    "SearchCancelled",
    "SearchScreen",
    "default_draft",
    "heat_strip",
    "run_tui",
]

HELP = """\
[b]edgeqra — keys[/b]

[b]profiles[/b]  type: filter · ↑ ↓: move · enter: pick
[b]plan[/b]      tab: model, task, budget, prune ratio (enter applies) · s: search
[b]search[/b]    c: cancel · r: resume from the journal · e: export (when done)
[b]export[/b]    space: toggle a format · tab: archive / replace boxes · x: export
[b]anywhere[/b]  ctrl+s: save the choices as a job file · escape: back
          ? (f1 in a text field): this help · ctrl+q: quit

Heat strip: one column per layer, bits on top (2 red, 3 orange, 4 yellow,
8 green, F = FP16), LoRA rank below (· none, ▂ 4, ▄ 8, ▆ 16, █ 32 or more).
A saved job runs unattended with [b]edgeqra run JOB.toml[/b] (CI).
"""


class HelpScreen(ModalScreen[None]):
    """Key reference; any of escape, q or ? closes it."""

    BINDINGS = [("escape,q,question_mark", "dismiss", "Close")]

    def compose(self) -> ComposeResult:
        yield Static(HELP, id="help")


class EdgeQRAApp(App[None]):
    """Profile → plan → search → export; ctrl+s saves the choices as a job for ``edgeqra run``."""

    TITLE = "edgeqra"
    SUB_TITLE = "joint per-layer bits and LoRA ranks under a device budget"
    CSS = """
    #details { width: 40%; padding: 0 1; border-left: solid $primary; }
    #fields Input { width: 1fr; }
    #verdict { height: auto; padding: 0 1; }
    #status { height: 1; }
    #stage { width: 1fr; }
    #progress { width: 30; }
    #front { width: 55%; }
    #side { width: 45%; }
    #strip { height: 3; overflow-x: auto; }
    #help { width: 78; height: auto; padding: 0 1; border: thick $primary; }
    #run { height: 1; padding: 0 1; }
    #choices { width: 50%; }
    #formats { height: auto; }
    #manifest { width: 50%; }
    HelpScreen { align: center middle; }
    """
    # Priority bindings fire even while a text field has focus, except for printable keys,
    # which a focused Input keeps (Textual's check_consume_key): so f1 opens the help there.
    BINDINGS = [
        Binding("question_mark,f1", "help", "Help", key_display="?", priority=True),
        Binding("ctrl+s", "save_job", "Save job", priority=True),
        Binding("ctrl+q", "quit", "Quit", priority=True),
    ]

    def __init__(
        self, draft: dict[str, Any] | None = None, *, job_path: Path | str = "edgeqra-job.toml"
    ) -> None:
        super().__init__()
        self.draft: dict[str, Any] = default_draft() if draft is None else copy.deepcopy(draft)
        self.job_path = Path(job_path)
        self.profiles: list[DeviceProfile] = list_profiles()

    def on_mount(self) -> None:
        self.push_screen(ProfileScreen())

    def choose_profile(self, name: str) -> None:
        self.draft["profile"] = name
        self.notify(f"profile {name}")
        self.push_screen(PlanScreen())

    def action_help(self) -> None:
        self.push_screen(HelpScreen())

    def action_save_job(self) -> None:
        """Write the draft as a job file (validated first: a bad draft is not written)."""
        if isinstance(self.screen, PlanScreen):
            self.screen._store_fields()
        try:
            path = save_job(from_mapping(self.draft), self.job_path)
        except EdgeQRAError as exc:
            self.notify(str(exc), severity="error")
            return
        self.notify(f"saved {path}; run it with `edgeqra run {path}`")


def run_tui(job: Path | str | None = None, *, save_to: Path | str | None = None) -> None:
    """Start the TUI, optionally from a job file (whose path "save job" then rewrites)."""
    draft = None
    if job is not None:
        from edgeqra.job import load_job, to_mapping

        draft = to_mapping(load_job(job))
    path = save_to or job or "edgeqra-job.toml"
    EdgeQRAApp(draft, job_path=path).run()
