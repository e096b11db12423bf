"""The TUI driven headless with Textual's pilot: profile → plan → search → cancel → resume →
export, save the job, and run the saved job (with its export) with `edgeqra run`."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from edgeqra.tui.app import (
    EdgeQRAApp,
    ExportScreen,
    HelpScreen,
    PlanScreen,
    ProfileScreen,
    SearchScreen,
    heat_strip,
)
from test_cli_search import GROUP, PROFILE, budget_gb, tiny_folder  # noqa: F401 - fixtures

from edgeqra.cli import EXIT_OK, main
from edgeqra.job import load_job
from edgeqra.space import Config


def tiny_draft(folder: Path, out: Path, budget: float, evals: int = 60) -> dict:
    """A job mapping for the tiny model: a search of seconds on a CPU."""
    return {
        "model": str(folder),
        "task": "arc_easy",
        "out": str(out),
        "device": "cpu",
        "budget_gb": budget,
        "data": {"n_train": 16, "n_eval": 6, "seq_len": 96, "calib_samples": 8,
                 "group_size": GROUP},
        "tuning": {"steps": 4},
        "search": {"evals": evals, "population": 4, "children": 4, "generations": 10,
                   "baselines": False},
    }  # fmt: skip


async def until(pilot, condition, timeout: float = 120.0) -> None:
    """Let the app run until ``condition()`` holds."""
    for _ in range(int(timeout / 0.05)):
        if condition():
            return
        await pilot.pause(0.05)
    raise AssertionError("the TUI did not get there in time")


def test_tui_profile_plan_search_cancel_resume_save(
    tiny_folder,  # noqa: F811
    budget_gb,  # noqa: F811
    tmp_path,
    monkeypatch,
    capsys,
):
    monkeypatch.setenv("EDGEQRA_CACHE", str(tmp_path / "cache"))
    out, job_path = tmp_path / "run", tmp_path / "saved.toml"

    async def drive() -> None:
        app = EdgeQRAApp(tiny_draft(tiny_folder, out, budget_gb), job_path=job_path)
        async with app.run_test(size=(80, 24)) as pilot:
            # Profiles: type to filter, enter picks the highlighted row.
            assert isinstance(app.screen, ProfileScreen)
            table = app.screen.query_one("#profiles")
            everything = table.row_count
            await pilot.press(*PROFILE)
            assert 1 <= table.row_count < everything
            await pilot.press("f1")  # help; `?` would go into the filter
            await until(pilot, lambda: isinstance(app.screen, HelpScreen))
            await pilot.press("escape")
            await until(pilot, lambda: isinstance(app.screen, ProfileScreen))
            await pilot.press("down", "question_mark")  # in the table, `?` is help too
            await until(pilot, lambda: isinstance(app.screen, HelpScreen))
            await pilot.press("escape")
            await until(pilot, lambda: isinstance(app.screen, ProfileScreen))
            await pilot.press("enter")
            await until(pilot, lambda: isinstance(app.screen, PlanScreen))
            assert app.draft["profile"] == PROFILE
            # Plan: the baselines against the budget, computed in a worker.
            verdict = app.screen.query_one("#verdict")
            await until(pilot, lambda: "budget" in str(verdict.render()))
            assert "largest uniform bit-width that fits" in str(verdict.render())
            # Search: starts in a worker, the front grows, cancel stops it.
            await pilot.press("s")
            await until(pilot, lambda: isinstance(app.screen, SearchScreen))
            screen = app.screen
            await until(pilot, lambda: len(screen.points) >= 3)
            await pilot.press("c")
            await until(pilot, lambda: not screen.running)
            assert screen.summary is None and not (out / "summary.json").exists()
            done = len((out / "journal.jsonl").read_text().splitlines())
            assert done >= 3
            assert screen.best is not None and str(screen.query_one("#strip").render())
            await pilot.press("e")  # export before the search finished: says so, stays
            assert isinstance(app.screen, SearchScreen)
            await pilot.press("ctrl+s")
            await until(pilot, job_path.is_file)
            # Resume from the journal, to the end.
            await pilot.press("r")
            await until(pilot, lambda: screen.summary is not None, timeout=300)
            assert (out / "summary.json").is_file()
            assert (
                screen.summary["search"]["fresh_evaluations"]
                < screen.summary["search"]["evaluations"]
            )  # the cancelled part came from the journal
            # Export: the gptq format is ticked by default; x runs it in a worker.
            await pilot.press("e")
            await until(pilot, lambda: isinstance(app.screen, ExportScreen))
            export = app.screen
            assert export.selected() == ["gptq"]
            await pilot.press("x")
            await until(pilot, lambda: not export.running and "gptq" in export.packages, 300)
            manifest = json.loads((export.packages["gptq"] / "manifest.json").read_text())
            assert manifest["config"]["spec"] == screen.summary["chosen"]["config"]
            assert app.draft["export"] == ["gptq"]
            await pilot.press("x")  # again: the package exists, refused without the box
            await until(pilot, lambda: not export.running)
            assert "exists" in " ".join(line.text for line in export.query_one("#manifest").lines)
            await pilot.press("ctrl+s")  # the saved job now exports too

    asyncio.run(drive())
    # The saved job is what the screens chose, and `edgeqra run` accepts it.
    saved = load_job(job_path)
    assert saved.search.eval.profile == PROFILE and saved.search.eval.model == str(tiny_folder)
    assert saved.export == ("gptq",)
    assert main(["run", str(job_path), "--out", str(tmp_path / "again"), "--json"]) == EXIT_OK
    summary = json.loads(capsys.readouterr().out)
    assert summary["chosen"]["fits"]
    assert (tmp_path / "again" / summary["exports"]["gptq"] / "manifest.json").is_file()


def test_heat_strip_is_one_column_per_layer():
    strip = heat_strip(Config.parse("2/0,3/4,4/8,8/16,16/32,4/2")).plain.splitlines()
    assert strip == ["2348F4", "·▂▄▆█▂"]
