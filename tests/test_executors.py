"""Executors: parallel runs give the sequential journal, faults are retried or journaled, a
killed driver resumes without re-evaluating.

The search runs on the synthetic objective of tests/test_search.py (a pure function of the
config: any difference between executors is a scheduling bug, not noise). Workers rebuild it
from a picklable :class:`SyntheticJob`, as real workers rebuild the evaluator from the job.
The model-backed end-to-end runs (tiny random Llama, real bank) are at the bottom.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_search import SEED, SETTINGS, Synthetic

from edgeqra.errors import EdgeQRAError
from edgeqra.search.driver import Evaluations, run_search
from edgeqra.search.executors import (
    ExecutorError,
    ExecutorKind,
    ExecutorSettings,
    LocalExecutor,
    ProcessExecutor,
    check_available,
    make_executor,
)
from edgeqra.search.journal import Journal
from edgeqra.space import Config, SearchSpace, repair

TESTS = Path(__file__).parent
N_UNITS = 6
BUDGET = N_UNITS * (400 + 80)  # uniform 4-bit rank 8 fits exactly
ANCHOR = Config.uniform(N_UNITS, 4, 8)


@dataclasses.dataclass(frozen=True)
class SyntheticJob:
    """Workers build the synthetic objective; ``delay`` seconds per evaluation."""

    delay: float = 0.0

    def build(self, slot: int):
        synthetic = Synthetic(SearchSpace(N_UNITS))

        def evaluate(config, fidelity):
            time.sleep(self.delay)
            return synthetic.evaluate(config, fidelity)

        return evaluate, "cpu"


def search(run_dir: Path, executor=None, *, events=None, delay: float = 0.0):
    """The seeded synthetic search of test_search (anchored) on ``executor``; returns
    (outcome, evaluations)."""
    space = SearchSpace(N_UNITS)
    synthetic = Synthetic(space)
    journal = Journal(run_dir / "journal.jsonl")
    if executor is None:
        executor = LocalExecutor(SyntheticJob(delay).build(0)[0])
    evaluations = Evaluations(
        synthetic.evaluate,
        journal,
        lambda c: synthetic.memory(c) <= BUDGET,
        SETTINGS,
        None if events is None else events.append,
        executor=executor,
    )

    def fix(c):
        return repair(c, space, synthetic.memory, BUDGET)

    rng = random.Random(SEED)
    initial = list(dict.fromkeys(fix(space.sample(rng)) for _ in range(6)))
    outcome = run_search(evaluations, space, initial, fix, BUDGET, anchors=[ANCHOR], seed=SEED)
    return outcome, evaluations


def lines(run_dir: Path) -> list[dict]:
    """The journal's JSON lines."""
    return [json.loads(x) for x in (run_dir / "journal.jsonl").read_text().splitlines()]


def as_set(run_dir: Path) -> set[tuple[str, int, float]]:
    """The journal's results as a set of (config, fidelity, score); failures left out."""
    return {(x["config"], x["fidelity"], x["score"]) for x in lines(run_dir) if "status" not in x}


@pytest.fixture(scope="module")
def sequential(tmp_path_factory):
    """The local (today's) run: the reference every executor must reproduce."""
    run_dir = tmp_path_factory.mktemp("sequential")
    outcome, evaluations = search(run_dir)
    return run_dir, outcome, evaluations


@pytest.fixture(scope="module")
def ray_runtime():
    """One local Ray runtime with 2 CPUs for the whole module (test modules importable)."""
    ray = pytest.importorskip("ray")
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        log_to_driver=False,
        runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join([str(TESTS), *sys.path])}},
    )
    yield ray
    ray.shutdown()


# ----------------------------------------------------------------------------- settings


def test_settings_validate_and_name_the_fix():
    assert ExecutorSettings("processes").kind is ExecutorKind.PROCESSES
    with pytest.raises(EdgeQRAError, match="`executor` 'threads'"):
        ExecutorSettings("threads")
    with pytest.raises(EdgeQRAError, match="`workers` must be >= 1"):
        ExecutorSettings("processes", workers=0)
    with pytest.raises(EdgeQRAError, match="needs `executor` ray"):
        ExecutorSettings("processes", ray_address="auto")
    with pytest.raises(EdgeQRAError, match="--executor processes"):
        ExecutorSettings("local", workers=2)


def test_ray_missing_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    with pytest.raises(ExecutorError, match=r"pip install 'edgeqra\[ray\]'"):
        check_available(ExecutorSettings("ray"))
    check_available(ExecutorSettings("processes"))  # no Ray needed


# ----------------------------------------------------------------------------- same answers


def test_local_executor_is_todays_search(sequential, tmp_path):
    """The executor seam changed nothing: same calls, in the same order, as test_search."""
    _, outcome, evaluations = sequential
    run_dir = tmp_path / "again"
    again, _ = search(run_dir)
    assert [(x["config"], x["fidelity"]) for x in lines(run_dir)] == [
        (x["config"], x["fidelity"]) for x in lines(sequential[0])
    ]
    assert again.best == outcome.best and evaluations.count <= SETTINGS.evals
    assert {x["worker"]["pid"] for x in lines(run_dir)} == {os.getpid()}


def test_processes_journal_equals_sequential(sequential, tmp_path):
    seq_dir, outcome, evaluations = sequential
    events = []
    with ProcessExecutor(SyntheticJob(delay=0.02), 2) as executor:
        parallel, par = search(tmp_path, executor, events=events)
    assert as_set(tmp_path) == as_set(seq_dir)
    assert len(lines(tmp_path)) == len(lines(seq_dir))  # nothing evaluated twice
    assert parallel.best == outcome.best and parallel.front == outcome.front
    assert par.count == evaluations.count
    # Two worker processes shared the work, and the progress saw both busy at once.
    pids = {x["worker"]["pid"] for x in lines(tmp_path)}
    assert len(pids) == 2 and os.getpid() not in pids
    assert max(len(e.running) for e in events) == 2
    assert all(x["wall"] >= 0.02 for x in lines(tmp_path))


def test_ray_journal_equals_sequential(sequential, ray_runtime, tmp_path):
    seq_dir, outcome, _ = sequential
    events = []
    executor = make_executor(
        ExecutorSettings("ray", workers=2), local=None, job=SyntheticJob(delay=0.02)
    )
    with executor:
        parallel, _ = search(tmp_path, executor, events=events)
    assert ray_runtime.is_initialized()  # joined the runtime it found, left it running
    assert as_set(tmp_path) == as_set(seq_dir)
    assert len(lines(tmp_path)) == len(lines(seq_dir))
    assert parallel.best == outcome.best
    assert len({x["worker"]["pid"] for x in lines(tmp_path)}) == 2
    assert max(len(e.running) for e in events) == 2


# ----------------------------------------------------------------------------- faults


@dataclasses.dataclass(frozen=True)
class FaultyJob:
    """A worker job whose evaluation of one (config, fidelity) fails on its first ``attempts``
    tries: ``exit`` kills the worker (``os._exit(3)``: no exception, no cleanup, as an OOM
    kill), ``raise`` raises. The tries are counted in ``counter`` (a file: each try appends a
    byte), since a failed worker is replaced and remembers nothing."""

    job: SyntheticJob
    mode: str
    config: str
    fidelity: int
    attempts: int
    counter: str

    def build(self, slot: int):
        evaluate, device = self.job.build(slot)

        def faulty(config, fidelity):
            if str(config) == self.config and fidelity == self.fidelity:
                with open(self.counter, "ab") as f:
                    f.write(b".")
                attempt = os.path.getsize(self.counter)
                if attempt <= self.attempts:
                    if self.mode == "exit":
                        os._exit(3)
                    raise RuntimeError(f"injected fault on attempt {attempt}")
            return evaluate(config, fidelity)

        return faulty, device


def _faulty(tmp_path: Path, mode: str, attempts: int) -> FaultyJob:
    """The synthetic job with the anchor's full-length evaluation failing ``attempts`` times."""
    counter = tmp_path.parent / f"{tmp_path.name}-tries"  # outside the run directory
    return FaultyJob(SyntheticJob(), mode, str(ANCHOR), SETTINGS.steps, attempts, str(counter))


@pytest.mark.parametrize("mode", ["exit", "raise"])
def test_processes_fault_is_retried_on_another_worker(mode, sequential, tmp_path):
    events = []
    with ProcessExecutor(_faulty(tmp_path, mode, attempts=1), 2, attempts=3) as executor:
        outcome, _ = search(tmp_path, executor, events=events)
    retries = [e for e in events if e.failed]
    assert len(retries) == 1 and "attempt 1" in retries[0].message
    assert ("died" in retries[0].message) == (mode == "exit")
    assert as_set(tmp_path) == as_set(sequential[0])  # the search went on, same answers
    assert outcome.best == sequential[1].best
    anchor = [x for x in lines(tmp_path) if x["config"] == str(ANCHOR)]
    # The retry ran on the other slot (the failed one was replaced, but elsewhere first).
    assert anchor[0]["worker"]["slot"] != int(retries[0].worker[1:].split()[0])


@pytest.mark.slow  # ~60 s on the 2-core machine: a replaced Ray actor re-imports everything
def test_ray_fault_is_retried(ray_runtime, sequential, tmp_path):
    events = []
    job = _faulty(tmp_path, "exit", attempts=1)
    executor = make_executor(ExecutorSettings("ray", workers=2), local=None, job=job)
    with executor:
        search(tmp_path, executor, events=events)
    assert sum(e.failed for e in events) == 1
    assert as_set(tmp_path) == as_set(sequential[0])


def test_exhausted_retries_are_journaled_as_failed_and_resume_skips_them(tmp_path):
    with ProcessExecutor(_faulty(tmp_path, "raise", attempts=99), 2, attempts=2) as executor:
        outcome, evaluations = search(tmp_path, executor)
    failed = [x for x in lines(tmp_path) if x.get("status") == "failed"]
    assert len(failed) == 1 and evaluations.failed == 1
    assert failed[0]["config"] == str(ANCHOR) and failed[0]["attempts"] == 2
    assert "injected fault on attempt 2" in failed[0]["error"]
    assert "score" not in failed[0]  # nothing can read it as a result
    assert outcome.best.config != str(ANCHOR)  # the search went on without it
    journal = Journal(tmp_path / "journal.jsonl")
    assert journal.get(str(ANCHOR), SETTINGS.steps) is None
    assert journal.failure(str(ANCHOR), SETTINGS.steps).attempts == 2
    # Resumed (in process now): the failure is known, nothing is evaluated again.
    resumed, again = search(tmp_path)  # the plain job: nothing fails now
    assert again.fresh == 0 and resumed.best == outcome.best
    assert len(lines(tmp_path)) == len(journal) + len(journal.failures)


@dataclasses.dataclass(frozen=True)
class BrokenJob:
    """A worker job whose evaluator cannot be built (a bad model path, say)."""

    def build(self, slot: int):
        from edgeqra.errors import ModelError

        raise ModelError("model `nowhere` not found; pass a HF folder")


def test_worker_that_cannot_start_stops_the_search_with_its_error(tmp_path):
    with ProcessExecutor(BrokenJob(), 2) as executor, pytest.raises(ExecutorError) as info:
        search(tmp_path, executor)
    assert "could not start: model `nowhere` not found" in str(info.value)
    assert not (tmp_path / "journal.jsonl").exists()  # nothing was recorded as a result


# ----------------------------------------------------------------------------- killed driver

_DRIVER = """
import sys
sys.path.insert(0, {tests!r})
from pathlib import Path
from test_executors import SyntheticJob, search
from edgeqra.search.executors import ProcessExecutor
if __name__ == "__main__":
    with ProcessExecutor(SyntheticJob(delay=0.15), 2) as executor:
        search(Path({run_dir!r}), executor)
"""


def test_killed_driver_resumes_without_reevaluating(sequential, tmp_path):
    script = tmp_path / "driver.py"
    script.write_text(_DRIVER.format(tests=str(TESTS), run_dir=str(tmp_path)))
    driver = subprocess.Popen([sys.executable, str(script)])  # noqa: S603 - our own script
    journal = tmp_path / "journal.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and driver.poll() is None:
        if journal.exists() and len(journal.read_text().splitlines()) >= 10:
            break
        time.sleep(0.05)
    assert driver.poll() is None, "the driver finished before it could be killed"
    driver.send_signal(signal.SIGKILL)  # no cleanup, no finally: as an OOM kill
    driver.wait()
    before = lines(tmp_path)
    assert 10 <= len(before) < len(lines(sequential[0]))
    # Orphaned workers notice the driver is gone and exit on their own.
    pids = {x["worker"]["pid"] for x in before}
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and any(_alive(p) for p in pids):
        time.sleep(0.1)
    assert not any(_alive(p) for p in pids)

    with ProcessExecutor(SyntheticJob(), 2) as executor:
        outcome, evaluations = search(tmp_path, executor)
    after = lines(tmp_path)
    keys = [(x["config"], x["fidelity"]) for x in after]
    assert len(keys) == len(set(keys))  # nothing journaled before was evaluated again
    assert evaluations.fresh == len(after) - len(before)
    assert as_set(tmp_path) == as_set(sequential[0]) and outcome.best == sequential[1].best


def _alive(pid: int) -> bool:
    """Whether a process exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split()[2] != "Z"
    except FileNotFoundError:
        return False


# ----------------------------------------------------------------------------- real evaluator


def test_cli_ray_missing_exits_2_before_any_work(monkeypatch, capsys, tmp_path):
    from edgeqra.cli import EXIT_INPUT, main

    monkeypatch.setitem(sys.modules, "ray", None)
    out = tmp_path / "run"
    argv = ["search", "--profile", "t4-16gb", "--executor", "ray", "--out", str(out)]
    assert main(argv) == EXIT_INPUT
    assert "pip install 'edgeqra[ray]'" in capsys.readouterr().err
    assert not out.exists()


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, tokenizer):
    """A tiny Llama folder, a shared cache, and the search's CLI arguments."""
    from conftest import tiny_model
    from test_cli_search import GROUP, PROFILE
    from transformers import AutoConfig

    from edgeqra.memory import ModelSpec, estimate_for_profile
    from edgeqra.profiles import load_profile

    folder = tmp_path_factory.mktemp("tinyexec")
    tiny_model("llama", vocab_size=len(tokenizer)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    spec = ModelSpec.from_config(AutoConfig.from_pretrained(folder))
    config = Config.uniform(spec.n_units, 4, 8)
    budget = estimate_for_profile(spec, config, load_profile(PROFILE), group_size=GROUP).total
    argv = ["search", "--model", str(folder), "--profile", PROFILE]
    argv += ["--budget-gb", f"{budget / 2**30 + 1e-6:.9f}", "--task", "arc_easy", "--steps", "2"]
    argv += ["--evals", "10", "--population", "4", "--children", "4", "--generations", "1"]
    argv += ["--n-train", "8", "--n-eval", "4", "--seq-len", "64", "--calib-samples", "4"]
    argv += ["--group-size", str(GROUP), "--device", "cpu", "--json"]
    return folder, tmp_path_factory.mktemp("cache"), argv


def _cli_search(tiny_run, monkeypatch, out: Path, *extra: str) -> dict:
    from edgeqra.cli import EXIT_OK, main

    _, cache, argv = tiny_run
    monkeypatch.setenv("EDGEQRA_CACHE", str(cache))
    assert main([*argv, "--out", str(out), *extra]) == EXIT_OK
    return json.loads(out.joinpath("summary.json").read_text())


@pytest.fixture(scope="module")
def tiny_sequential(tiny_run, tmp_path_factory):
    """The local run on the tiny model (builds the bank in the shared cache)."""
    import torch

    monkeypatch = pytest.MonkeyPatch()
    out = tmp_path_factory.mktemp("tinyseq") / "run"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each of the 2 CPU workers (2 cores): bit-identical floats
    try:
        summary = _cli_search(tiny_run, monkeypatch, out)
    finally:
        torch.set_num_threads(threads)
        monkeypatch.undo()
    return out, summary


@pytest.mark.parametrize(
    "executor",
    ["processes", pytest.param("ray", marks=pytest.mark.slow)],  # ray: actor imports, ~2 min
)
def test_model_search_parallel_equals_sequential(
    executor, tiny_run, tiny_sequential, monkeypatch, tmp_path, request
):
    if executor == "ray":
        request.getfixturevalue("ray_runtime")
    seq_dir, seq = tiny_sequential
    out = tmp_path / "run"
    summary = _cli_search(tiny_run, monkeypatch, out, "--executor", executor, "--workers", "2")
    assert as_set(out) == as_set(seq_dir)  # scores equal exactly, not within a tolerance
    assert summary["chosen"]["config"] == seq["chosen"]["config"]
    assert summary["baselines"] == seq["baselines"] or {
        k: v["score"] for k, v in summary["baselines"].items()
    } == {k: v["score"] for k, v in seq["baselines"].items()}
    workers = {(x["worker"]["host"], x["worker"]["pid"]) for x in lines(out)}
    assert len(workers) == 2 and all(x["worker"]["device"] == "cpu" for x in lines(out))
    # One bank in the cache: the driver built it, both workers used it (a worker that finds
    # no complete bank with its own key refuses to start, see the next test).
    assert len(list((tiny_run[1] / "banks").iterdir())) == 1


def test_worker_refuses_a_missing_bank(tiny_run, tiny_sequential, monkeypatch, tmp_path):
    from edgeqra.errors import ConfigError
    from edgeqra.pipeline import SearchJob, prepare

    monkeypatch.setenv("EDGEQRA_CACHE", str(tiny_run[1]))
    job = SearchJob.from_json(json.loads((tiny_sequential[0] / "job.json").read_text()))
    bank = next((tiny_run[1] / "banks").iterdir())
    with pytest.raises(ConfigError, match="EDGEQRA_CACHE"):
        prepare(job.eval, budget_gb=job.budget_gb, progress=False, cached_bank=tmp_path / "x")
    prepared = prepare(job.eval, budget_gb=job.budget_gb, progress=False, cached_bank=bank)
    assert prepared.bank.root == bank and prepared.bank.complete


def test_worker_job_reads_the_drivers_paths_not_the_environment(
    tiny_run, tiny_sequential, monkeypatch, tmp_path
):
    """A worker is handed the driver's model folder and bank by path: it neither reads nor
    sets ``$EDGEQRA_CACHE`` (here pointing nowhere) and leaves the environment as it was."""
    from edgeqra.pipeline import EvalWorkerJob, SearchJob

    job = SearchJob.from_json(json.loads((tiny_sequential[0] / "job.json").read_text()))
    bank = next((tiny_run[1] / "banks").iterdir())
    monkeypatch.setenv("EDGEQRA_CACHE", str(tmp_path / "nowhere"))
    before = dict(os.environ)
    worker = EvalWorkerJob(job.eval, job.budget_gb, str(bank), str(tiny_run[0]))
    evaluate, device = worker.build(0)  # prepare() against the driver's bank: key checked
    assert callable(evaluate) and device == "cpu"
    assert dict(os.environ) == before
    assert not (tmp_path / "nowhere").exists()


# ----------------------------------------------------------------------------- job files, CLI


def test_job_file_executor_keys_round_trip(tmp_path):
    from edgeqra.job import from_mapping, to_mapping

    data = {"profile": "t4-16gb", "search": {"executor": "ray", "workers": 4, "attempts": 2}}
    data["search"]["ray_address"] = "auto"
    spec = from_mapping(data)
    assert spec.search.executor == ExecutorSettings("ray", 4, "auto", 2)
    assert from_mapping(to_mapping(spec)).search.executor == spec.search.executor
    assert from_mapping({"profile": "t4-16gb"}).search.executor == ExecutorSettings()
    with pytest.raises(EdgeQRAError, match="`executor` 'threads'"):
        from_mapping({"profile": "t4-16gb", "search": {"executor": "threads"}})


def test_resume_flags_override_only_what_is_given():
    from edgeqra.cli import _parser
    from edgeqra.commands.search import executor_settings

    args = _parser().parse_args(["search", "--resume", "runs/x", "--workers", "4"])
    assert executor_settings(args, ExecutorSettings("ray", 2, "auto", 5)) == ExecutorSettings(
        "ray", 4, "auto", 5
    )
    args = _parser().parse_args(["search", "--profile", "t4-16gb", "--ray-address", "auto"])
    assert executor_settings(args).kind is ExecutorKind.RAY  # an address implies Ray
