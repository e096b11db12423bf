"""SVG screenshots of each TUI screen at 80×24, driven headless by Textual's pilot.

    python bench/tui_screenshots.py --out docs/screenshots
    python bench/tui_screenshots.py --out docs/screenshots --export-run runs/quickstart

Uses the embedded SmolLM2-135M-Instruct and the quick-start settings (Jetson Orin Nano,
budget 0.86 GiB); the search screen is captured after a few evaluations, then the search is
cancelled. Minutes on a CPU with a warm cache (the bank and sensitivity of the quick-start).
``--export-run`` takes a finished run directory (e.g. of ``edgeqra run
examples/quickstart.toml``) and shoots the export screen after exporting it (``--format``,
replacing that run's earlier package of the format).
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import tempfile
from pathlib import Path

from edgeqra.tui.app import (
    DEFAULT_DRAFT,
    EdgeQRAApp,
    ExportScreen,
    HelpScreen,
    PlanScreen,
    ProfileScreen,
    SearchScreen,
)


async def until(pilot, condition, timeout: float) -> None:
    """Let the app run until ``condition()`` holds."""
    for _ in range(int(timeout / 0.1)):
        if condition():
            return
        await pilot.pause(0.1)
    raise TimeoutError("the TUI did not get there in time")


async def shoot(out: Path, points: int, timeout: float) -> list[Path]:
    draft = copy.deepcopy(DEFAULT_DRAFT)
    draft["budget_gb"] = 0.86
    with tempfile.TemporaryDirectory() as tmp:
        draft["out"] = str(Path(tmp) / "run")
        app = EdgeQRAApp(draft, job_path=Path(tmp) / "job.toml")
        shots: list[Path] = []

        def save(name: str) -> None:
            shots.append(Path(app.save_screenshot(f"{name}.svg", str(out))))

        async with app.run_test(size=(80, 24)) as pilot:
            await until(pilot, lambda: isinstance(app.screen, ProfileScreen), 10)
            await pilot.press(*"orin")
            await pilot.pause(0.3)
            save("1-profiles")
            await pilot.press("f1")
            await until(pilot, lambda: isinstance(app.screen, HelpScreen), 10)
            save("0-help")
            await pilot.press("escape")
            await pilot.press("enter")  # the first match: Jetson Orin Nano 8 GB
            await until(pilot, lambda: isinstance(app.screen, PlanScreen), 10)
            verdict = app.screen.query_one("#verdict")
            await until(pilot, lambda: "largest" in str(verdict.render()), 120)
            await pilot.pause(0.5)
            save("2-plan")
            await pilot.press("s")
            await until(pilot, lambda: isinstance(app.screen, SearchScreen), 10)
            screen = app.screen
            await until(pilot, lambda: len(screen.points) >= points, timeout)
            await pilot.pause(0.5)
            save("3-search")
            await pilot.press("c")
            await until(pilot, lambda: not screen.running, timeout)
    return shots


async def shoot_export(out: Path, run_dir: Path, fmt: str, timeout: float) -> Path:
    """The export screen after exporting ``run_dir`` in ``fmt``."""
    draft = copy.deepcopy(DEFAULT_DRAFT)
    draft.update(out=str(run_dir), export=[fmt])
    with tempfile.TemporaryDirectory() as tmp:
        app = EdgeQRAApp(draft, job_path=Path(tmp) / "job.toml")
        async with app.run_test(size=(80, 24)) as pilot:
            await until(pilot, lambda: isinstance(app.screen, ProfileScreen), 10)
            app.push_screen(ExportScreen(run_dir))
            await until(pilot, lambda: isinstance(app.screen, ExportScreen), 10)
            screen = app.screen
            await until(pilot, lambda: len(screen.query("#force")) == 1, 10)  # composed
            screen.query_one("#force").value = True
            await pilot.press("x")
            await until(pilot, lambda: not screen.running and fmt in screen.packages, timeout)
            await pilot.pause(0.5)
            return Path(app.save_screenshot("4-export.svg", str(out)))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("docs/screenshots"))
    p.add_argument("--points", type=int, default=6, help="evaluations before the search shot")
    p.add_argument("--timeout", type=float, default=900.0)
    p.add_argument("--export-run", type=Path, help="a finished run directory: shoot only export")
    p.add_argument("--format", default="gptq", help="the format the export shot writes")
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.export_run is not None:
        print(asyncio.run(shoot_export(args.out, args.export_run, args.format, args.timeout)))
        return
    for path in asyncio.run(shoot(args.out, args.points, args.timeout)):
        print(path)


if __name__ == "__main__":
    main()
