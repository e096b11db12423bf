"""The export view: pick formats, export the finished run in a thread worker, show each
package's manifest."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from textual import work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.screen import Screen
from textual.widgets import Checkbox, Footer, Header, Label, RichLog, SelectionList

from edgeqra.errors import EdgeQRAError

__all__ = ["FORMAT_HELP", "ExportScreen"]

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
