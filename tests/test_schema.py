"""The settings schema (edgeqra.settings): one field declares a setting, and the CLI, the job
file, job.json and the TUI draft follow with no other edit; old run directories still resume."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
from edgeqra.tui.app import EdgeQRAApp
from test_cli_search import budget_gb, tiny_folder  # noqa: F401 - fixtures

import edgeqra.jobs
from edgeqra import settings as schema
from edgeqra.cli import EXIT_INPUT, EXIT_OK, _parser, main
from edgeqra.errors import ConfigError
from edgeqra.job import JobSpec, from_mapping, load_job, save_job, to_mapping
from edgeqra.pipeline import EvalJob, SearchJob
from edgeqra.search.driver import SearchSettings
from edgeqra.settings import setting

OLD_JOB = Path(__file__).parent / "data" / "job-v1.json"  # written by the code before issue 19


@dataclass(frozen=True)
class DummySearchSettings(SearchSettings):
    """SearchSettings plus one setting declared the way every setting is."""

    dummy_knob: int = setting(7, help="a knob only this test knows", key="search.dummy_knob")


@pytest.fixture
def dummy(monkeypatch):
    """The schema finds nested settings through the fields' annotations: point SearchJob's
    `search` annotation at the subclass (undone after the test)."""
    monkeypatch.setattr(edgeqra.jobs, "SearchSettings", DummySearchSettings)


def test_a_new_setting_reaches_cli_job_file_job_json_and_tui(dummy, capsys, tmp_path):
    with pytest.raises(SystemExit):
        main(["search", "--help"])
    help_text = capsys.readouterr().out
    assert "--dummy-knob" in help_text and "a knob only this test knows (default 7)" in help_text

    spec = from_mapping({"profile": "t4-16gb", "search": {"dummy_knob": 9}})
    assert spec.search.search.dummy_knob == 9
    assert to_mapping(spec)["search"]["dummy_knob"] == 9
    assert load_job(save_job(spec, tmp_path / "job.toml")) == spec
    with pytest.raises(ConfigError, match="`search.dummy_knob` must be an integer"):
        from_mapping({"profile": "t4-16gb", "search": {"dummy_knob": "nine"}})
    with pytest.raises(ConfigError, match="did you mean `search.dummy_knob`"):
        from_mapping({"profile": "t4-16gb", "search": {"dummy_nob": 9}})

    job = SearchJob.from_json(json.loads(json.dumps(spec.search.to_json())))
    assert job == spec.search and job.search.dummy_knob == 9

    assert EdgeQRAApp().draft["search"]["dummy_knob"] == 7


def test_every_setting_has_one_key_one_flag_and_help():
    stored = [s.key for s in schema.settings_of(SearchJob)]  # what job.json holds
    assert len(set(stored)) == len(stored)  # `seed` and `steps` live once
    assert {"seed", "tuning.steps", "search.evals", "search.rungs", "search.sensitivity"} <= set(
        stored
    )
    found = schema.settings_of(JobSpec)
    # One key is one setting: the job's `seed` also seeds [prune]'s calibration rows.
    shared = {s.key for s in found if [t.key for t in found].count(s.key) > 1}
    assert shared == {"seed"}
    assert all(s.help for s in found)
    flags = [s.flag for s in schema.settings_of(SearchJob) if s.flag is not None]  # `search`'s
    assert len(set(flags)) == len(flags)


def test_cli_and_job_file_build_the_same_job():
    argv = ["--profile", "t4-16gb", "--evals", "9", "--rungs", "2", "--seed", "5", "--alpha", "0.4"]
    argv += ["--no-sensitivity", "--bits", "3,4", "--lr", "1e-3", "--executor", "processes"]
    args = _parser().parse_args(["search", *argv])
    from_cli = SearchJob.from_values(schema.given(args, schema.settings_of(SearchJob)))
    from_file = from_mapping(
        {
            "profile": "t4-16gb",
            "seed": 5,
            "space": {"bits": [3, 4]},
            "tuning": {"lr": 1e-3},
            "search": {
                "evals": 9,
                "rungs": 2,
                "alpha": 0.4,
                "sensitivity": False,
                "executor": "processes",
            },
        }  # fmt: skip
    ).search
    assert from_cli == from_file
    assert from_cli.search.evolution.front  # a trade-off point implies ranking on the front


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"data.group_size": 0}, "`group_size` must be a positive integer"),
        ({"tuning.steps": -1}, "`steps` must be an integer >= 0"),
        ({"search.evals": 0}, "`evals` must be an integer >= 1"),
        ({"search.eta": 1}, "`eta` must be an integer >= 2"),
        ({"space.bits": (5,)}, "may only hold GPTQ widths"),
    ],
)
def test_bad_values_fail_while_the_settings_are_built(values, message):
    with pytest.raises(ConfigError, match=message):
        SearchJob.from_values({"profile": "t4-16gb", **values})


def test_bad_group_size_exits_2_before_any_model_loads(capsys):
    argv = ["search", "--profile", "t4-16gb", "--model", "/no/such/model", "--group-size", "0"]
    assert main(argv) == EXIT_INPUT
    err = capsys.readouterr().err
    assert "`group_size` must be a positive integer" in err and "/no/such/model" not in err


def test_an_old_job_json_reads_with_the_new_names():
    job = SearchJob.from_json(json.loads(OLD_JOB.read_text()))
    assert (job.search.evals, job.search.rungs, job.search.eta) == (12, 2, 2)
    assert not job.search.sensitivity and not job.search.use_bayes
    assert job.eval.tune.seed == 3 and job.search.steps == 4 and job.eval.tune.steps == 0
    assert job.search.bayes.method == "lengler" and job.executor.attempts == 2
    assert job.eval.bits == (2, 4, 8) and isinstance(job.eval, EvalJob)
    assert SearchJob.from_json(job.to_json()) == job


def test_an_old_run_directory_resumes_and_refuses_changed_settings(
    tiny_folder,  # noqa: F811
    budget_gb,  # noqa: F811
    tmp_path,
    capsys,
    monkeypatch,
):
    monkeypatch.setenv("EDGEQRA_CACHE", str(tmp_path / "cache"))
    run = tmp_path / "old-run"
    run.mkdir()
    data = json.loads(OLD_JOB.read_text())
    data["eval"]["model"] = str(tiny_folder)  # the machine-specific parts of the old run
    data["budget_gb"] = budget_gb
    (run / "job.json").write_text(json.dumps(data))
    # Asking the run for other settings names the setting; the executor may change.
    assert main(["search", "--resume", str(run), "--evals", "30"]) == EXIT_INPUT
    err = capsys.readouterr().err
    assert "`search.evals` (`--evals`) = 12, now 30" in err
    assert main(["search", "--resume", str(run), "--evals", "12", "--json"]) == EXIT_OK
    summary = json.loads(capsys.readouterr().out)
    assert summary["search"]["evaluations"] <= 12
    assert main(["search", "--resume", str(run), "--json"]) == EXIT_OK
    assert json.loads(capsys.readouterr().out)["search"]["fresh_evaluations"] == 0
    shutil.rmtree(tmp_path / "cache", ignore_errors=True)
