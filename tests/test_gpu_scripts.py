"""bench/gpu/run_issue15.sh `queue` on CPU, with the GPU programs replaced by stand-ins.

What is tested is the queue's bookkeeping, which a GPU session cannot afford to debug: a task
runs only when its time fits, a finished one is skipped on the next call, a cut truth grid is
resumed, and every call leaves a state tarball that the next one restores.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "bench" / "gpu" / "run_issue15.sh"

# A python3 that plays the GPU programs: memory_truth.py writes a grid cut at its first call
# and complete when resumed; peak_census.py and pytest succeed; `plan --cap` exits 5 then 0.
# Anything else (the queue's own completeness check) runs the real interpreter.
FAKE = """#!/usr/bin/env bash
log="$FAKE_LOG"
case "$1" in
  *memory_truth.py)
    echo "memory_truth $*" >> "$log"
    out=$(echo "$@" | sed -E 's/.*--out ([^ ]+).*/\\1/')
    if [[ " $* " == *" --resume "* ]] && [ -f "$out" ]; then skipped='[]'; else skipped='["a/m5"]'; fi
    echo '{"results": {"a": [{"label": "u4", "phases": [{"measured": {}}]}]}, "skipped": '"$skipped"'}' > "$out"
    ;;
  *memory_replay.py) echo "replay" ;;
  *throughput.py) echo "throughput $*" >> "$log" ;;
  *peak_census.py)
    echo "census $*" >> "$log"
    out=$(echo "$@" | sed -E 's/.*--out ([^ ]+).*/\\1/'); echo '{}' > "$out" ;;
  -m)
    echo "$2 ${*:3}" >> "$log"
    if [ "$2" = edgeqra.cli ] && [[ "$*" == *16/8* ]]; then exit 5; fi ;;
  *) exec "$REAL_PYTHON" "$@" ;;
esac
"""


def _queue(tmp: Path, budget: int) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "PATH": f"{tmp / 'bin'}:{os.environ['PATH']}",
        "REAL_PYTHON": sys.executable,
        "FAKE_LOG": str(tmp / "calls.log"),
        "EDGEQRA_SITE": str(tmp / "site"),
        "I15_DIR": str(tmp / "i15"),
        "OUT": str(tmp / "out"),
        "BUDGET": str(budget),
    }
    script = tmp / "repo" / "bench" / "gpu" / SCRIPT.name
    bash = shutil.which("bash")
    return subprocess.run(  # noqa: S603 - our own script, fixed arguments
        [bash, str(script), "queue"], env=env, capture_output=True, text=True, check=False
    )


@pytest.fixture
def machine(tmp_path: Path) -> Path:
    (tmp_path / "bin").mkdir()
    fake = tmp_path / "bin" / "python3"
    fake.write_text(FAKE)
    fake.chmod(0o755)
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / ".kit-installed").touch()
    # A copy of the script in a repo of its own: the state it restores is that repo's.
    gpu = tmp_path / "repo" / "bench" / "gpu"
    gpu.mkdir(parents=True)
    shutil.copy(SCRIPT, gpu / SCRIPT.name)
    shutil.copy(REPO / "bench" / "memory_truth.py", gpu.parent)  # its grid_complete check
    return tmp_path


def _calls(tmp: Path) -> list[str]:
    path = tmp / "calls.log"
    return path.read_text().splitlines() if path.exists() else []


def test_queue_starts_nothing_it_cannot_finish(machine):
    done = _queue(machine, budget=100)
    assert done.returncode == 0, done.stderr
    assert _calls(machine) == []
    assert done.stdout.count("left for the next call") == 9
    assert "call queue again" in done.stdout
    assert (machine / "out" / "i15-state.tar.gz").exists()


def test_queue_resumes_what_a_call_left_and_skips_what_it_finished(machine):
    first = _queue(machine, budget=570)
    assert first.returncode == 0, first.stderr
    calls = _calls(machine)
    assert sum(c.startswith("census") for c in calls) == 7
    assert sum("--snapshot" in c for c in calls) == 3  # the allocator-history runs
    assert sum(c.startswith("edgeqra.cli") for c in calls) == 2  # the overrun and the fit
    assert sum(c.startswith("memory_truth") for c in calls) == 4
    assert sum(c.startswith("throughput") for c in calls) == 1
    assert all("--resume" in c for c in calls if c.startswith("memory_truth"))
    assert "call queue again" in first.stdout  # every grid came back cut
    state = machine / "out" / "i15-state.tar.gz"
    with tarfile.open(state) as tar:
        names = set(tar.getnames())
    assert {
        "./census.done",
        "./snapshot.done",
        "./cap.done",
        "./gputests.done",
        "./throughput.done",
    } <= names
    assert not any(n.startswith("./truth_") for n in names)

    # The next call on a fresh machine: its state comes back from the carried tarball.
    (machine / "i15").rename(machine / "i15-old")
    (machine / "repo" / ".kit").mkdir()
    shutil.copy(state, machine / "repo" / ".kit" / "i15-state.tar.gz")
    (machine / "calls.log").unlink()
    second = _queue(machine, budget=570)
    assert second.returncode == 0, second.stderr
    assert "state restored from" in second.stdout
    calls = _calls(machine)
    assert [c.split()[0] for c in calls] == ["memory_truth"] * 4  # only the cut grids
    assert "all done" in second.stdout
    assert all((machine / "out" / f"memory_truth_{t}.json").exists() for t in (
        "rtx-4090-24gb_llama-3.1-8b", "rtx-4090-24gb_qwen2.5-7b",
        "jetson-orin-nano-8gb_small", "jetson-orin-nano-8gb_large"))  # fmt: skip
