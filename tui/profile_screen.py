"""The first view: the device profiles as a table, filtered by typing, with details."""

from __future__ import annotations

from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal
from textual.screen import Screen
from textual.widgets import DataTable, Footer, Header, Input, Static

from edgeqra.profiles import load_profile

__all__ = ["ProfileScreen"]


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
