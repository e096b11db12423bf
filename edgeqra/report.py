"""``edgeqra report RUN_DIR``: a picture of a finished run's measured front, as SVG.

It reads what a search left in its run directory through :class:`edgeqra.rundir.RunFiles`
(the summary is checked against ``edgeqra/schemas/summary.schema.json`` there) and draws:

* score against predicted memory for every evaluation in ``journal.jsonl``: full-fidelity
  ones (``fidelity >= job.search.steps``) as solid markers, lower rungs lighter;
* the measured Pareto front (``summary.search.front``) as a step line;
* the uniform baselines of ``summary.baselines`` as labelled diamonds;
* the budget (``summary.budget_bytes``) as a vertical line;
* the chosen config (its final, full-length score) highlighted and labelled;
* a per-layer strip of the chosen config's bits and ranks.

Offline and read-only: nothing in the run directory changes (the journal is read with
:meth:`RunFiles.read_journal` rather than through ``Journal``, whose constructor repairs a
torn last line in place), and torch is not imported. Bad input raises an
:class:`~edgeqra.errors.EdgeQRAError` naming the file and the fix before anything is written.

Why a hand-written SVG writer: no plotting library is a dependency of edgeqra (matplotlib
would add tens of MB for one picture; Pillow is only present transitively and cannot draw
text legibly without fonts), and an SVG is plain text that any browser opens, that a test
can parse with ``xml.etree`` and that diffs in review. So only SVG is written, no PNG.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from xml.sax.saxutils import escape, quoteattr

from edgeqra.errors import ConfigError, EdgeQRAError
from edgeqra.rundir import RunFiles
from edgeqra.space import Config

__all__ = ["write_report"]

_GIB = float(1 << 30)
_WIDTH, _HEIGHT = 960, 660
_PLOT = (84.0, 700.0, 78.0, 398.0)  # x0, x1, y0 (top), y1 (bottom) of the scatter panel
_STRIP_TOP = 494.0
_BITS_COLOURS = {2: "#cf222e", 3: "#fb8500", 4: "#d4a72c", 8: "#2da44e", 16: "#0969da"}
_FULL, _LOW, _BASE, _CHOSEN, _BUDGET = "#0969da", "#8c959f", "#bc4c00", "#cf222e", "#82071e"


# ----------------------------------------------------------------------------- reading


@dataclass(frozen=True)
class _Point:
    """One journal evaluation placed on the picture."""

    config: str
    fidelity: int
    score: float
    memory: int
    stage: str


@dataclass(frozen=True)
class _Mark:
    """A labelled point from summary.json (a baseline, the chosen config, a front point)."""

    label: str
    score: float
    memory: int


@dataclass(frozen=True)
class _Run:
    """What the picture needs from a finished run directory."""

    path: Path
    task: str
    model: str
    profile: str
    metric: str
    budget: int
    full_steps: int
    points: tuple[_Point, ...]
    failed: int  # journal lines of evaluations that failed on every attempt
    unplaced: int  # results without a predicted memory (cannot be placed)
    baselines: tuple[_Mark, ...]
    front: tuple[_Mark, ...]
    chosen: _Mark
    chosen_config: Config
    average_bits: float


def _number(data: dict, key: str, where: str, fix: str, *, kind=float) -> float:
    """``data[key]`` as a finite number of ``kind``, or a ConfigError naming ``where``."""
    value = data.get(key)
    ok = isinstance(value, int | float) and not isinstance(value, bool)
    if ok and kind is int:
        ok = float(value).is_integer()
    if not ok or not math.isfinite(float(value)):
        raise ConfigError(f"{where} has no valid `{key}` (got {value!r}); {fix}")
    return kind(value)


def _mark(label: str, result: object, path: Path, fix: str, memory: object = None) -> _Mark:
    """A summary result (``{"score": …, "memory_bytes": …}``) as a labelled mark."""
    where = f"`{path}` (`{label}`)"
    if not isinstance(result, dict):
        raise ConfigError(f"{where} is not a result object; {fix}")
    data = dict(result)
    if memory is not None:
        data["memory_bytes"] = memory
    return _Mark(
        label,
        _number(data, "score", where, fix),
        _number(data, "memory_bytes", where, fix, kind=int),
    )


def _points(files: RunFiles) -> tuple[list[_Point], int, int]:
    """(placed points, failed lines, results without memory) of the journal, read-only."""
    entries, failures = files.read_journal()
    fix = "restore the journal from a copy, or rerun the search into a new run directory"
    points, unplaced = [], 0
    for number, entry in enumerate(entries, start=1):
        r = entry.result
        where = f"`{files.journal}` result {number}"
        if not isinstance(r.config, str) or not r.config:
            raise ConfigError(f"{where} is corrupt (no `config`); {fix}")
        fidelity = int(_number(r.__dict__, "fidelity", where, fix, kind=int))
        if not isinstance(r.score, int | float) or isinstance(r.score, bool):
            raise ConfigError(f"{where} is corrupt (`score` is {r.score!r}); {fix}")
        if r.memory_bytes is None or not math.isfinite(float(r.score)):
            unplaced += 1  # no profile (cannot happen in a search) or a NaN score
            continue
        if not isinstance(r.memory_bytes, int) or isinstance(r.memory_bytes, bool):
            raise ConfigError(f"{where} is corrupt (`memory_bytes` is {r.memory_bytes!r}); {fix}")
        points.append(_Point(r.config, fidelity, float(r.score), r.memory_bytes, entry.stage))
    return points, len(failures), unplaced


def _read_run(run_dir: Path) -> _Run:
    """Read and check everything the picture needs (through :class:`RunFiles`, which checks
    the summary against its schema); an EdgeQRAError names anything missing or broken."""
    files = RunFiles(run_dir)
    job = files.read_job_json()
    if not files.finished:
        raise ConfigError(
            f"`{files.summary}` is missing: the run has not finished; finish it with "
            f"`edgeqra search --resume {run_dir}`, then run `edgeqra report {run_dir}` again"
        )
    refix = f"rewrite it by finishing the run again with `edgeqra search --resume {run_dir}`"
    search = job.get("search")
    if not isinstance(search, dict):
        raise ConfigError(f"`{files.job}` has no `search` settings; {refix}")
    full_steps = int(_number(search, "steps", f"`{files.job}` (`search`)", refix, kind=int))

    summary = files.read_summary()
    summary_path = files.summary
    budget = int(summary["budget_bytes"])
    chosen = summary["chosen"]
    try:
        config = Config.parse(chosen["config"])
    except EdgeQRAError as exc:
        raise ConfigError(
            f"`{summary_path}`: chosen config is malformed ({exc}); {refix}"
        ) from None
    short = str(chosen.get("short") or config.short())
    mark = _mark(
        short, chosen.get("final"), summary_path, refix, chosen.get("predicted_memory_bytes")
    )
    baselines = summary["baselines"]
    front = summary["search"]["front"]
    points, failed, unplaced = _points(files)
    return _Run(
        path=run_dir,
        task=str(summary.get("task", "?")),
        model=str(summary.get("model", "?")),
        profile=str(summary.get("profile", "?")),
        metric=str(summary.get("metric", "score")),
        budget=budget,
        full_steps=full_steps,
        points=tuple(points),
        failed=failed,
        unplaced=unplaced,
        baselines=tuple(
            _mark(label, result, summary_path, refix) for label, result in baselines.items()
        ),
        front=tuple(
            _mark(str(r.get("config", "")) if isinstance(r, dict) else "", r, summary_path, refix)
            for r in front
        ),
        chosen=mark,
        chosen_config=config,
        average_bits=float(chosen.get("average_bits") or config.average_bits()),
    )


# ----------------------------------------------------------------------------- drawing


def _nice_ticks(lo: float, hi: float, count: int = 6) -> tuple[list[float], int]:
    """Round tick values covering [lo, hi] (steps of 1, 2 or 5 × 10^k) and their decimals."""
    span = hi - lo
    raw = span / max(1, count - 1)
    power = 10.0 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw)
    first = math.ceil(lo / step - 1e-9) * step
    ticks = []
    value = first
    while value <= hi + step * 1e-9:
        ticks.append(value)
        value += step
    return ticks, max(0, -math.floor(math.log10(step) + 1e-9))


def _domain(values: Iterable[float], pad: float, floor: float) -> tuple[float, float]:
    """(lo, hi) around ``values`` with ``pad`` of the span on each side, at least ``floor`` wide."""
    values = list(values)
    lo, hi = min(values), max(values)
    span = max(hi - lo, floor)
    mid = (lo + hi) / 2
    lo, hi = min(lo, mid - span / 2), max(hi, mid + span / 2)
    return lo - pad * span, hi + pad * span


class _Svg:
    """A list of SVG element strings; attribute values are quoted and text escaped."""

    def __init__(self) -> None:
        self.parts: list[str] = []

    def add(self, tag: str, text: str | None = None, *, title: str | None = None, **attrs) -> None:
        """One element; ``attrs`` keys use ``_`` for ``-`` (``font_size`` -> ``font-size``)."""
        attr = "".join(
            f" {k.rstrip('_').replace('_', '-')}={quoteattr(_fmt(v))}"
            for k, v in attrs.items()
            if v is not None
        )
        inner = (f"<title>{escape(title)}</title>" if title else "") + escape(text or "")
        self.parts.append(f"<{tag}{attr}>{inner}</{tag}>" if inner else f"<{tag}{attr}/>")

    def text(self, x: float, y: float, text: str, **attrs) -> None:
        """A text element in the report's font."""
        attrs.setdefault("font_size", 12)
        attrs.setdefault("fill", "#1f2328")
        self.add("text", text, x=x, y=y, **attrs)


def _fmt(value: object) -> str:
    """Numbers with at most two decimals (pixel coordinates); anything else as str."""
    if isinstance(value, float):
        return f"{value:.2f}".rstrip("0").rstrip(".")
    return str(value)


def _diamond(x: float, y: float, r: float) -> str:
    return f"M{x:.2f},{y - r:.2f} L{x + r:.2f},{y:.2f} L{x:.2f},{y + r:.2f} L{x - r:.2f},{y:.2f} Z"


def _star(x: float, y: float, r: float) -> str:
    points = []
    for k in range(10):
        radius = r if k % 2 == 0 else r * 0.45
        angle = math.pi / 2 + k * math.pi / 5
        points.append(f"{x + radius * math.cos(angle):.2f},{y - radius * math.sin(angle):.2f}")
    return "M" + " L".join(points) + " Z"


def _clip(text: str, limit: int) -> str:
    """``text`` cut to ``limit`` characters with an ellipsis (labels inside the plot)."""
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _wrap(text: str, width: int) -> list[str]:
    """Lines of at most ``width`` characters, broken after commas or spaces where possible."""
    lines: list[str] = []
    while len(text) > width:
        cut = max(text.rfind(",", 0, width), text.rfind(" ", 0, width))
        cut = width if cut <= 0 else cut + 1
        lines.append(text[:cut])
        text = text[cut:]
    return [*lines, text]


def _gib(n: int, decimals: int = 3) -> str:
    return f"{n / _GIB:.{decimals}f} GiB"


def _render(run: _Run) -> str:
    """The whole picture as an SVG document."""
    x0, x1, y0, y1 = _PLOT
    memories = [p.memory for p in run.points] + [m.memory for m in run.baselines]
    memories += [run.chosen.memory, run.budget] + [m.memory for m in run.front]
    scores = [p.score for p in run.points] + [m.score for m in run.baselines]
    scores += [run.chosen.score] + [m.score for m in run.front]
    mlo, mhi = _domain((m / _GIB for m in memories), 0.06, 1e-4)
    slo, shi = _domain(scores, 0.08, 0.05)

    def px(memory: float) -> float:
        return x0 + (memory / _GIB - mlo) / (mhi - mlo) * (x1 - x0)

    def py(score: float) -> float:
        return y1 - (score - slo) / (shi - slo) * (y1 - y0)

    svg = _Svg()
    svg.add("rect", x=0, y=0, width=_WIDTH, height=_HEIGHT, fill="#ffffff")
    full = [p for p in run.points if p.fidelity >= run.full_steps]
    low = [p for p in run.points if p.fidelity < run.full_steps]
    model = Path(run.model).name or run.model
    svg.text(x0, 28, f"edgeqra report · {run.path.name}: {run.task}, {model}, {run.profile}",
             font_size=16, font_weight="bold")  # fmt: skip
    notes = [f"{len(full)} evaluations at {run.full_steps} tuning steps",
             f"{len(low)} at fewer steps (lighter)"]  # fmt: skip
    if run.failed:
        notes.append(f"{run.failed} failed (not drawn)")
    if run.unplaced:
        notes.append(f"{run.unplaced} without predicted memory (not drawn)")
    svg.text(x0, 48, f"{run.metric} against predicted memory: " + ", ".join(notes), fill="#57606a")

    # Axes, grid and tick labels.
    svg.add("rect", x=x0, y=y0, width=x1 - x0, height=y1 - y0, fill="#f6f8fa", stroke="#d0d7de")
    xticks, xdec = _nice_ticks(mlo, mhi)
    for t in xticks:
        x = x0 + (t - mlo) / (mhi - mlo) * (x1 - x0)
        svg.add("line", x1=x, y1=y0, x2=x, y2=y1, stroke="#d8dee4", stroke_width=0.6)
        svg.text(x, y1 + 16, f"{t:.{xdec}f}", text_anchor="middle", font_size=11)
    yticks, ydec = _nice_ticks(slo, shi)
    for t in yticks:
        y = py(t)
        svg.add("line", x1=x0, y1=y, x2=x1, y2=y, stroke="#d8dee4", stroke_width=0.6)
        svg.text(x0 - 6, y + 4, f"{t:.{ydec}f}", text_anchor="end", font_size=11)
    svg.text((x0 + x1) / 2, y1 + 34, "predicted memory (GiB, the profile's workload)",
             text_anchor="middle")  # fmt: skip
    ylabel = "score (−loss)" if run.metric == "loss" else f"score ({run.metric})"
    svg.text(22, (y0 + y1) / 2, ylabel, text_anchor="middle",
             transform=f"rotate(-90 22 {(y0 + y1) / 2:.2f})")  # fmt: skip

    # The measured front: best score so far, walking up in memory (a step line).
    front = sorted(run.front, key=lambda m: (m.memory, -m.score))
    if front:
        coords = []
        for k, m in enumerate(front):
            if k:
                coords.append(f"{px(m.memory):.2f},{py(front[k - 1].score):.2f}")
            coords.append(f"{px(m.memory):.2f},{py(m.score):.2f}")
        svg.add("polyline", id="front", class_="front", points=" ".join(coords), fill="none",
                stroke=_FULL, stroke_width=1.2, stroke_opacity=0.6)  # fmt: skip

    # Budget line.
    bx = px(run.budget)
    svg.add("line", id="budget", class_="budget", x1=bx, y1=y0 - 6, x2=bx, y2=y1,
            stroke=_BUDGET, stroke_width=1.6, stroke_dasharray="6 4",
            title=f"budget {run.budget} bytes")  # fmt: skip
    svg.text(bx - 4, y0 - 10, f"budget {_gib(run.budget)}", text_anchor="end", fill=_BUDGET,
             font_size=11)  # fmt: skip

    # Evaluations: lower fidelities first (underneath), then full fidelity.
    for p in low:
        svg.add("circle", class_="eval low", cx=px(p.memory), cy=py(p.score), r=3.0, fill=_LOW,
                fill_opacity=0.45, data_config=p.config, data_fidelity=p.fidelity,
                title=f"{p.config} at {p.fidelity} steps ({p.stage}): {p.score:.4f}, "
                f"{_gib(p.memory, 4)}")  # fmt: skip
    for p in full:
        svg.add("circle", class_="eval full", cx=px(p.memory), cy=py(p.score), r=4.5,
                fill=_FULL, fill_opacity=0.8, stroke="#ffffff", stroke_width=0.8,
                data_config=p.config, data_fidelity=p.fidelity,
                title=f"{p.config} at {p.fidelity} steps ({p.stage}): {p.score:.4f}, "
                f"{_gib(p.memory, 4)}")  # fmt: skip

    # Uniform baselines; their labels are moved apart (they often sit close together).
    cx, cy = px(run.chosen.memory), py(run.chosen.score)
    chosen_label = f"chosen {_clip(run.chosen.label, 40)}: {run.chosen.score:.3f}"
    placed: list[tuple[float, float, float, float]] = []  # label boxes; the chosen one first
    chosen_at = _place_label(placed, cx + 4, cy - 6, chosen_label, x1, char=7.4)
    for m in sorted(run.baselines, key=lambda m: (m.memory, m.score)):
        x, y = px(m.memory), py(m.score)
        svg.add("path", class_="baseline", d=_diamond(x, y, 7), fill="none", stroke=_BASE,
                stroke_width=2, data_label=m.label,
                title=f"{m.label}: {m.score:.4f}, {_gib(m.memory, 4)}")  # fmt: skip
        label = f"{m.label} {m.score:.3f}"
        lx, ly, anchor = _place_label(placed, x, y, label, x1)
        svg.text(lx, ly, label, fill=_BASE, font_size=11, text_anchor=anchor,
                 class_="baseline-label")  # fmt: skip

    # The chosen config, on top.
    svg.add("path", id="chosen", class_="chosen", d=_star(cx, cy, 11), fill=_CHOSEN,
            stroke="#ffffff", stroke_width=1, data_config=str(run.chosen_config),
            title=f"chosen {run.chosen.label}: {run.chosen.score:.4f}, "
            f"{_gib(run.chosen.memory, 4)}")  # fmt: skip
    svg.text(chosen_at[0], chosen_at[1], chosen_label, text_anchor=chosen_at[2], fill=_CHOSEN,
             font_weight="bold", class_="chosen-label")  # fmt: skip

    _legend(svg, x1 + 22, y0)
    _strip(svg, run, x0, x1)
    body = "\n".join(svg.parts)
    return (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{_WIDTH}" height="{_HEIGHT}" '
        f'viewBox="0 0 {_WIDTH} {_HEIGHT}" font-family="DejaVu Sans, Helvetica, Arial, '
        f'sans-serif">\n{body}\n</svg>\n'
    )


def _place_label(
    placed: list[tuple[float, float, float, float]],
    x: float,
    y: float,
    text: str,
    right: float,
    *,
    char: float = 6.4,  # about the advance of an 11 px sans-serif glyph
) -> tuple[float, float, str]:
    """(x, y, text-anchor) for a label near (x, y) that overlaps no label in ``placed``.

    Tries rows above and below the point in turn; the box it takes is added to ``placed``.
    """
    width = char * len(text)
    anchor = "start" if x + 9 + width <= right else "end"
    left = x + 9 if anchor == "start" else x - 9 - width
    for k in range(40):
        dy = (-8 - 13 * (k // 2)) if k % 2 == 0 else (15 + 13 * (k // 2))
        box = (left, y + dy - 10, left + width, y + dy + 2)
        if all(box[2] < b[0] or box[0] > b[2] or box[3] < b[1] or box[1] > b[3] for b in placed):
            break
    placed.append(box)
    return (left if anchor == "start" else left + width), y + dy, anchor


def _legend(svg: _Svg, x: float, y: float) -> None:
    """The marker key, right of the scatter panel."""
    rows = [
        ("circle", dict(r=4.5, fill=_FULL, fill_opacity=0.8), "full-fidelity evaluation"),
        ("circle", dict(r=3.0, fill=_LOW, fill_opacity=0.45), "lower-fidelity rung"),
        ("front", {}, "measured front"),
        ("diamond", {}, "uniform baseline (rank 8)"),
        ("star", {}, "chosen config (final score)"),
        ("budget", {}, "memory budget"),
    ]
    svg.text(x, y + 4, "key", font_weight="bold")
    for k, (kind, attrs, label) in enumerate(rows):
        cy = y + 24 + 22 * k
        if kind == "circle":
            svg.add("circle", cx=x + 8, cy=cy, **attrs)
        elif kind == "front":
            svg.add("line", x1=x, y1=cy, x2=x + 16, y2=cy, stroke=_FULL, stroke_width=1.2)
        elif kind == "diamond":
            svg.add("path", d=_diamond(x + 8, cy, 6), fill="none", stroke=_BASE, stroke_width=2)
        elif kind == "star":
            svg.add("path", d=_star(x + 8, cy, 8), fill=_CHOSEN)
        else:
            svg.add("line", x1=x + 8, y1=cy - 8, x2=x + 8, y2=cy + 8, stroke=_BUDGET,
                    stroke_width=1.6, stroke_dasharray="4 3")  # fmt: skip
        svg.text(x + 24, cy + 4, label, font_size=11)


def _strip(svg: _Svg, run: _Run, x0: float, x1: float) -> None:
    """Per-layer cells of the chosen config: bits (colour) and rank (bar height)."""
    config = run.chosen_config
    n = len(config)
    top = _STRIP_TOP
    heading = f"chosen config per layer ({run.average_bits:.2f} average bits): "
    lines = _wrap(heading + run.chosen.label, 118)  # a 30-layer config can be long
    for k, line in enumerate(lines):
        svg.text(x0, top - 12 - 15 * (len(lines) - 1 - k), line, font_weight="bold")
    width = (x1 - x0) / n
    cell_h, bar_h = 26.0, 40.0
    max_rank = max(max(config.ranks), 1)
    svg.text(x0 - 8, top + cell_h / 2 + 4, "bits", text_anchor="end", font_size=11)
    svg.text(x0 - 8, top + cell_h + 8 + bar_h / 2 + 4, "rank", text_anchor="end", font_size=11)
    for i, choice in enumerate(config):
        x = x0 + i * width
        colour = _BITS_COLOURS.get(choice.bits, "#6e7781")
        svg.add("rect", class_="layer-bits", x=x + 0.5, y=top, width=max(width - 1, 0.5),
                height=cell_h, fill=colour, data_layer=i, data_bits=choice.bits,
                title=f"layer {i}: {choice.bits} bits")  # fmt: skip
        h = bar_h * choice.rank / max_rank
        base = top + cell_h + 8 + bar_h
        svg.add("rect", class_="layer-rank", x=x + 0.5, y=base - h, width=max(width - 1, 0.5),
                height=h, fill="#8250df", fill_opacity=0.35, data_layer=i, data_rank=choice.rank,
                title=f"layer {i}: rank {choice.rank}")  # fmt: skip
        if width >= 13:
            svg.text(x + width / 2, top + cell_h / 2 + 4, str(choice.bits), text_anchor="middle",
                     font_size=10, fill="#ffffff")  # fmt: skip
            svg.text(x + width / 2, base - bar_h / 2 + 4, str(choice.rank), text_anchor="middle",
                     font_size=10, fill="#3e1f79")  # fmt: skip
    base = top + cell_h + 8 + bar_h
    svg.add("line", x1=x0, y1=base, x2=x1, y2=base, stroke="#d0d7de")
    every = max(1, math.ceil(n / 15))
    for i in range(0, n, every):
        svg.text(x0 + (i + 0.5) * width, base + 14, str(i), text_anchor="middle", font_size=9,
                 fill="#57606a")  # fmt: skip
    svg.text((x0 + x1) / 2, base + 32, f"decoder layer (rank bars scale to rank {max_rank})",
             text_anchor="middle", font_size=11)  # fmt: skip
    _bits_key(svg, x1 + 22, top, sorted(set(config.bits) | {2, 3, 4, 8}))


def _bits_key(svg: _Svg, x: float, y: float, bits: Sequence[int]) -> None:
    """Colour key of the bits row."""
    svg.text(x, y + 4, "bits", font_weight="bold")
    for k, b in enumerate(bits):
        svg.add("rect", x=x + 36 * k, y=y + 12, width=30, height=14,
                fill=_BITS_COLOURS.get(b, "#6e7781"))  # fmt: skip
        svg.text(x + 36 * k + 15, y + 23, "fp16" if b == 16 else str(b), text_anchor="middle",
                 font_size=10, fill="#ffffff")  # fmt: skip


# ----------------------------------------------------------------------------- writing


def write_report(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Draw a finished run directory's front as SVG; nothing is written on bad input.

    Args:
        run_dir: the folder ``edgeqra search --out`` (or ``edgeqra run``) wrote, holding
            ``job.json``, ``journal.jsonl`` and ``summary.json``.
        out: the SVG file to write (default ``RUN_DIR/report.svg``); written atomically
            (a temp file beside it, then a rename).

    Returns:
        The path written.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ConfigError(
            f"`{run_dir}` is not a run directory (no such folder); pass the folder that "
            "`edgeqra search --out` or `edgeqra run` wrote"
        )
    target = run_dir / "report.svg" if out is None else Path(out)
    if target.suffix.lower() != ".svg":
        raise ConfigError(f"`--out` {str(target)!r} must end in .svg (the report is an SVG)")
    if target.is_dir():
        raise ConfigError(f"`--out` {str(target)!r} is a folder; name a .svg file")
    if not target.parent.is_dir():
        raise ConfigError(f"`--out` folder `{target.parent}` does not exist; create it first")
    document = _render(_read_run(run_dir))
    tmp = target.with_name(f".{target.name}.tmp")
    try:
        tmp.write_text(document, encoding="utf-8")
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return target
