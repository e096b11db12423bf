"""The plan view: model, task, budget and pruning, the uniform baselines' predicted memory
against the budget (planned in a thread worker), and the way on to the search."""

from __future__ import annotations

import copy
from typing import Any

from edgeqra.tui.draft import get_setting, put_setting
from edgeqra.tui.search_screen import SearchScreen
from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal
from textual.screen import Screen
from textual.widgets import Footer, Header, Input, Static
from textual_plotext import PlotextPlot

from edgeqra.errors import EdgeQRAError
from edgeqra.job import from_mapping
from edgeqra.profiles import load_profile

__all__ = ["PLAN_FIELDS", "PlanScreen"]

# The plan screen's fields: setting key -> widget id (the schema gives each its type and tooltip).
PLAN_FIELDS = {"model": "model", "task": "task", "budget_gb": "budget", "prune.ratio": "prune"}


def _plan_fields() -> list[Any]:
    from edgeqra.job import JobSpec
    from edgeqra.settings import settings_of

    by_key = {s.key: s for s in settings_of(JobSpec)}
    return [by_key[key] for key in PLAN_FIELDS]


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
                value = get_setting(draft, setting.key)
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
            put_setting(draft, setting.key, value)

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
