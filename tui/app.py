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
"""

from __future__ import annotations

import copy
import threading
from pathlib import Path
from typing import Any

from rich.text import Text
from textual import on, work
from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.screen import ModalScreen, Screen
from textual.widgets import (
    Checkbox,
    DataTable,
    Footer,
    Header,
    Input,
    Label,
    ProgressBar,
    RichLog,
    SelectionList,
    Static,
)
from textual_plotext import PlotextPlot

from edgeqra.errors import EdgeQRAError
from edgeqra.job import default_mapping, from_mapping, save_job
from edgeqra.profiles import DeviceProfile, list_profiles, load_profile
from edgeqra.space import Config

# The quick-start's settings (examples/quickstart.toml without its profile): a search that
# finishes in minutes on a CPU, a sensible first run from the TUI.
QUICKSTART: dict[str, Any] = {
    "out": "runs/tui",
    "data": {"n_train": 256, "n_eval": 40, "calib_samples": 16},
    "tuning": {"steps": 8},
    "search": {"evals": 16, "population": 4, "children": 4, "generations": 1},
}


def default_draft() -> dict[str, Any]:
    """Every setting's default (the settings schema's, through :func:`edgeqra.job.default_mapping`)
    with the quick-start's values over them; no profile yet, no ``[prune]``."""
    draft = default_mapping()
    for key, value in QUICKSTART.items():
        if isinstance(value, dict):
            draft.setdefault(key, {}).update(value)
        else:
            draft[key] = value
    return draft


DEFAULT_DRAFT: dict[str, Any] = default_draft()  # as at import; the app builds its own


# One colour per bit-width for the heat strip (FP16 for completeness).
BIT_STYLE = {2: "white on red", 3: "black on dark_orange", 4: "black on yellow",
             8: "black on green", 16: "white on blue"}  # fmt: skip

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

# Rank as a bar height (up to this rank), so 30+ layers fit one row of an 80-column terminal.
RANK_GLYPH = ((0, "·"), (4, "▂"), (8, "▄"), (16, "▆"))


class SearchCancelled(Exception):
    """Raised from the search's progress callback when the user cancels."""


def heat_strip(config: Config) -> Text:
    """Per-layer bits (colour and digit) over per-layer rank (bar height), a column per layer."""
    text = Text()
    for c in config:
        text.append(str(c.bits) if c.bits < 10 else "F", style=BIT_STYLE.get(c.bits, ""))
    text.append("\n")
    for c in config:
        text.append(next((g for top, g in RANK_GLYPH if c.rank <= top), "█"), style="bold")
    return text


class HelpScreen(ModalScreen[None]):
    """Key reference; any of escape, q or ? closes it."""

    BINDINGS = [("escape,q,question_mark", "dismiss", "Close")]

    def compose(self) -> ComposeResult:
        yield Static(HELP, id="help")


class ProfileScreen(Screen[None]):
    """The profiles as a table, filtered by typing, with a details pane."""

    BINDINGS = [Binding("down", "focus_table", "Table", show=False)]

    def compose(self) -> ComposeResult:
        yield Header()
        yield Input(placeholder="type to filter profiles…", id="filter")
        with Horizontal():
            yield DataTable(id="profiles", cursor_type="row", zebra_stripes=True)
            yield Static(id="details")
        yield Footer()

    def on_mount(self) -> None:
        table = self.query_one("#profiles", DataTable)
        table.add_columns("profile", "memory", "budget", "bits")
        self._fill("")
        self.query_one("#filter", Input).focus()

    def _fill(self, text: str) -> None:
        table = self.query_one("#profiles", DataTable)
        table.clear()
        for p in self.app.profiles:  # type: ignore[attr-defined]
            if text.lower() in f"{p.name} {p.display_name}".lower():
                table.add_row(
                    p.name,
                    f"{p.memory_gib:g} GiB",
                    f"{p.budget_bytes / 2**30:.1f} GiB",
                    "/".join(map(str, p.bits)),
                    key=p.name,
                )
        self._show(self._highlighted())

    def _highlighted(self) -> str | None:
        table = self.query_one("#profiles", DataTable)
        if not table.row_count:
            return None
        return table.coordinate_to_cell_key(table.cursor_coordinate).row_key.value

    def _show(self, name: str | None) -> None:
        details = self.query_one("#details", Static)
        if name is None:
            details.update("no profile matches the filter")
            return
        p = load_profile(name)
        details.update(
            f"[b]{p.display_name}[/b]\n{p.memory_gib:g} GiB"
            f"{' unified' if p.unified_memory else ''}, usable budget "
            f"{p.budget_bytes / 2**30:.2f} GiB ({p.mode.value})\n"
            f"compute capability {p.compute_capability}\nkernels: {', '.join(p.kernels)}\n"
            f"bits: {', '.join(map(str, p.bits))}\n\n{p.notes}"
        )

    @on(Input.Changed, "#filter")
    def _filter(self, event: Input.Changed) -> None:
        self._fill(event.value)

    @on(Input.Submitted, "#filter")
    def _pick_highlighted(self) -> None:
        if (name := self._highlighted()) is not None:
            self.app.choose_profile(name)  # type: ignore[attr-defined]

    @on(DataTable.RowHighlighted, "#profiles")
    def _highlight(self, event: DataTable.RowHighlighted) -> None:
        self._show(event.row_key.value)

    @on(DataTable.RowSelected, "#profiles")
    def _select(self, event: DataTable.RowSelected) -> None:
        self.app.choose_profile(event.row_key.value)  # type: ignore[attr-defined]

    def action_focus_table(self) -> None:
        self.query_one("#profiles", DataTable).focus()


# The plan screen's fields: setting key -> widget id (the schema gives each its type and tooltip).
PLAN_FIELDS = {"model": "model", "task": "task", "budget_gb": "budget", "prune.ratio": "prune"}


def _plan_fields() -> list[Any]:
    from edgeqra.job import JobSpec
    from edgeqra.settings import settings_of

    by_key = {s.key: s for s in settings_of(JobSpec)}
    return [by_key[key] for key in PLAN_FIELDS]


def _get(draft: dict[str, Any], key: str) -> Any:
    table, _, name = key.rpartition(".")
    return (draft.get(table) or {} if table else draft).get(name)


def _put(draft: dict[str, Any], key: str, value: Any) -> None:
    """Set ``key`` in the draft; ``None`` removes it, and with it an optional table such as
    ``[prune]`` (not in the defaults: its first field is its switch)."""
    table, _, name = key.rpartition(".")
    if value is not None:
        (draft.setdefault(table, {}) if table else draft)[name] = value
    elif table and table not in default_mapping():
        draft.pop(table, None)
    else:
        (draft.get(table, {}) if table else draft).pop(name, None)


class PlanScreen(Screen[None]):
    """Model and task, the uniform baselines' memory against the budget, the most bits that fit."""

    BINDINGS = [
        Binding("s", "search", "Search"),
        Binding("escape", "app.pop_screen", "Back"),
    ]
    AUTO_FOCUS = None  # keys go to the screen's bindings; tab reaches the fields

    def compose(self) -> ComposeResult:
        draft = self.app.draft  # type: ignore[attr-defined]
        yield Header()
        with Horizontal(id="fields"):
            for setting in _plan_fields():
                value = _get(draft, setting.key)
                yield Input(
                    "" if value is None else str(value),
                    placeholder=setting.key,
                    tooltip=setting.help,
                    id=PLAN_FIELDS[setting.key],
                )
        yield Static(id="verdict")
        yield PlotextPlot(id="bars")
        yield Footer()

    def on_mount(self) -> None:
        self.plan()

    def on_screen_resume(self) -> None:
        self.call_after_refresh(self.set_focus, None)  # keys to the bindings; tab for fields

    @on(Input.Submitted)
    def _changed(self) -> None:
        self.set_focus(None)  # back to the screen's keys (s: search)
        self.plan()

    def _store_fields(self) -> None:
        """Copy the fields into the draft (empty = the default; for `prune.ratio`: no pruning)."""
        draft = self.app.draft  # type: ignore[attr-defined]
        for setting in _plan_fields():
            text = self.query_one(f"#{PLAN_FIELDS[setting.key]}", Input).value.strip()
            try:
                value = None if not text else (text if setting.kind is str else setting.kind(text))
            except ValueError:
                self.notify(
                    f"`{setting.key}` {text!r} is not {setting.describe()}", severity="error"
                )
                continue
            _put(draft, setting.key, value)

    def plan(self) -> None:
        self._store_fields()
        self.query_one("#verdict", Static).update("planning…")
        self._plan(copy.deepcopy(self.app.draft))  # type: ignore[attr-defined]

    @work(thread=True, exclusive=True, group="plan")
    def _plan(self, draft: dict[str, Any]) -> None:
        from transformers import AutoConfig

        from edgeqra.memory import ModelSpec, estimate_for_profile
        from edgeqra.models import resolve_model
        from edgeqra.plan import make_plan
        from edgeqra.prune import pruned_config

        try:
            job = from_mapping(draft)
            spec = job.search
            path = resolve_model(spec.eval.model)
            hf_config = AutoConfig.from_pretrained(
                path, local_files_only=True, trust_remote_code=spec.eval.trust_remote_code
            )
            original = ModelSpec.from_config(hf_config)
            model = original
            if job.prune is not None:  # plan the pruned shapes (no weights needed)
                model = ModelSpec.from_config(pruned_config(hf_config, job.prune))
            profile = load_profile(spec.eval.profile or "")
            plan = make_plan(
                model, profile, rank=spec.baseline_rank, bits=spec.eval.bits,
                group_size=spec.eval.group_size,
            )  # fmt: skip
        except EdgeQRAError as exc:
            self.app.call_from_thread(self._show_error, str(exc))
            return
        unpruned = None
        if job.prune is not None:  # each baseline's bytes on the unpruned model
            unpruned = {
                r.label: estimate_for_profile(
                    original, r.config, profile, mode=plan.mode, group_size=spec.eval.group_size
                ).total
                for r in plan.rows
            }
        budget = profile.budget_bytes if spec.budget_gb is None else int(spec.budget_gb * 2**30)
        self.app.call_from_thread(self._show_plan, plan, budget, unpruned)

    def _show_error(self, message: str) -> None:
        self.query_one("#verdict", Static).update(Text(f"error: {message}", style="red"))

    def _show_plan(self, plan: Any, budget: int, unpruned: dict[str, int] | None = None) -> None:
        fits = [r for r in plan.rows if r.breakdown.total <= budget]
        best = max(fits, key=lambda r: r.average_bits, default=None)
        pruned = ""
        if unpruned is not None and best is not None:
            pruned = f" (pruned; unpruned {unpruned[best.label] / 2**30:.3f} GiB)"
        self.query_one("#verdict", Static).update(
            f"budget [b]{budget / 2**30:.3f} GiB[/b] on {plan.profile.name}; "
            + (
                f"largest uniform bit-width that fits: [b]{best.label}[/b] "
                f"({best.breakdown.total / 2**30:.3f} GiB){pruned}"
                if best
                else "[red]no uniform baseline fits[/red]"
            )
        )
        # The breakdown, stacked per baseline, against the budget line (METHOD.md components).
        groups = {
            "weights": ("quantized_weights", "unquantized_weights"),
            "adapters": ("lora_weights", "lora_grads", "optimizer_states"),
            "activations": ("activations", "kv_cache"),
            "reserve": ("reserve",),
        }
        heights = [
            [sum(r.breakdown.components.get(k, 0) for k in keys) / 2**30 for r in plan.rows]
            for keys in groups.values()
        ]
        widget = self.query_one("#bars", PlotextPlot)
        plt = widget.plt
        plt.clear_data()
        plt.clear_figure()
        plt.stacked_bar(
            [r.label.replace("GPTQ ", "") for r in plan.rows], heights, labels=list(groups)
        )
        plt.hline(budget / 2**30, "red")
        plt.title("predicted GiB by component; red: budget")
        widget.refresh()

    def action_search(self) -> None:
        self._store_fields()
        self.app.push_screen(SearchScreen())


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
        if self.summary is None and not (out / "summary.json").is_file():
            self.notify(
                "nothing to export yet: the search has not finished (r resumes it)",
                severity="warning",
            )
            return
        self.app.push_screen(ExportScreen(out))


# What each format is, one line (the model card says the rest).
FORMAT_HELP = {
    "gptq": "merged on the GPTQ grid",
    "adapter": "exact: base + adapter",
    "onnx": "merged, MatMulNBits",
}


class ExportScreen(Screen[None]):
    """Pick formats, export the finished run in a worker, show each package's manifest."""

    BINDINGS = [
        Binding("x", "export", "Export"),
        Binding("escape", "app.pop_screen", "Back"),
    ]

    def __init__(self, run_dir: Path) -> None:
        super().__init__()
        self.run_dir = run_dir
        self.running = False
        self.packages: dict[str, Path] = {}  # format -> package folder written

    def compose(self) -> ComposeResult:
        from edgeqra.exporters import available_formats

        chosen = set(self.app.draft.get("export") or ["gptq"])  # type: ignore[attr-defined]
        yield Header()
        yield Label(f"run directory [b]{self.run_dir}[/b]", id="run")
        with Horizontal():
            with Vertical(id="choices"):
                yield SelectionList[str](
                    *[
                        (f"{fmt:<8}{FORMAT_HELP[fmt]}", fmt, fmt in chosen)
                        for fmt in available_formats()
                    ],
                    id="formats",
                )
                yield Checkbox("also write a .tar.gz", id="archive")
                yield Checkbox("replace existing packages", id="force")
            # min_width: RichLog renders at least 78 columns wide by default, which clips in
            # half of an 80-column terminal instead of wrapping.
            yield RichLog(id="manifest", wrap=True, markup=True, min_width=20)
        yield Footer()

    def on_mount(self) -> None:
        self.query_one("#formats", SelectionList).focus()
        self._log("space toggles a format, [b]x[/b] exports (minutes on a CPU for SmolLM2)")

    def _log(self, message: str) -> None:
        self.query_one("#manifest", RichLog).write(message)

    def selected(self) -> list[str]:
        """The ticked formats, in the list's order."""
        return list(self.query_one("#formats", SelectionList).selected)

    def action_export(self) -> None:
        if self.running:
            self.notify("an export is running", severity="warning")
            return
        formats = self.selected()
        if not formats:
            self.notify("tick at least one format (space)", severity="warning")
            return
        self.app.draft["export"] = formats  # type: ignore[attr-defined]
        self.running = True
        archive = self.query_one("#archive", Checkbox).value
        force = self.query_one("#force", Checkbox).value
        self._export(formats, archive, force)

    @work(thread=True, exclusive=True, group="export")
    def _export(self, formats: list[str], archive: bool, force: bool) -> None:
        from edgeqra.exporters import export_package

        call = self.app.call_from_thread
        for fmt in formats:
            try:
                result = export_package(
                    self.run_dir,
                    fmt,
                    archive=archive,
                    force=force,
                    on_stage=lambda msg, fmt=fmt: call(self._log, f"[b]{fmt}[/b]: {msg}"),
                )
            except EdgeQRAError as exc:
                call(self._log, f"[red]{fmt}: {exc}[/red]")
                continue
            call(self._show, fmt, result)
        call(self._done)

    def _show(self, fmt: str, result: Any) -> None:
        self.packages[fmt] = result.path
        m = result.manifest
        files = m.get("files", {})
        size = sum(int(f.get("bytes", 0)) for f in files.values()) / 2**20
        self._log(f"[green]{fmt}[/green] written to [b]{result.path}[/b]")
        if result.archive is not None:
            self._log(f"  archive {result.archive}")
        self._log(f"  {len(files)} files, {size:.1f} MiB; config {m['config']['short']}")
        for label, entry in (m.get("scores") or {}).items():
            if isinstance(entry, dict) and "score" in entry:
                self._log(f"  score {label}: {entry['score']:.4f}")

    def _done(self) -> None:
        self.running = False
        self._log(f"done: {len(self.packages)} package(s); `edgeqra verify DIR` checks one")


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
