"""Job files and `edgeqra run`: validation, round trip, exit codes, summary.json's schema."""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

import jsonschema
import pytest
from test_cli_search import GROUP, PROFILE, budget_gb, tiny_folder  # noqa: F401 - fixtures

from edgeqra.cli import EXIT_BUDGET, EXIT_INPUT, EXIT_OK, main
from edgeqra.errors import ConfigError
from edgeqra.job import from_mapping, load_job, save_job, to_mapping

EXAMPLES = Path(__file__).parent.parent / "examples"


def _schema() -> dict:
    return json.loads(
        resources.files("edgeqra").joinpath("schemas/summary.schema.json").read_text()
    )


@pytest.mark.parametrize("path", sorted(EXAMPLES.glob("*.toml")), ids=lambda p: p.name)
def test_shipped_examples_validate_and_round_trip(path, tmp_path):
    spec = load_job(path)
    again = load_job(save_job(spec, tmp_path / "job.toml"))
    assert again == spec


def test_examples_cover_the_default_and_two_profiles():
    profiles = {load_job(p).search.eval.profile for p in EXAMPLES.glob("*.toml")}
    assert (EXAMPLES / "quickstart.toml").is_file()
    assert len(profiles) >= 2


def test_keys_map_onto_the_search_job():
    spec = from_mapping(
        {
            "profile": "t4-16gb",
            "out": "runs/x",
            "seed": 7,
            "space": {"bits": [3, 4], "ranks": [0, 8]},
            "tuning": {"steps": 12, "lr": 1},  # an int where a float goes is fine
            "search": {"evals": 9, "bayes": False, "alpha": 0.5},
        }
    )
    job = spec.search
    assert (job.eval.bits, job.eval.ranks) == ((3, 4), (0, 8))
    assert job.search.steps == 12 and job.eval.tune.lr == 1.0
    assert job.eval.tune.steps == 0  # the fidelity is set per evaluation: `steps` lives once
    assert job.search.evals == 9 and not job.search.use_bayes and job.alpha == 0.5
    assert job.search.evolution.front  # a trade-off point needs the front
    assert job.eval.tune.seed == 7 and spec.out == Path("runs/x")  # `seed` lives once
    assert to_mapping(spec)["search"]["evals"] == 9


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"model": "smollm2"}, "no `profile`"),
        (
            {"profile": "t4-16gb", "serach": {"evals": 3}},
            r"unknown table `\[serach\]`.*`\[search\]`",
        ),
        ({"profile": "t4-16gb", "search": {"eval": 3}}, "did you mean `search.evals`"),
        ({"profile": "t4-16gb", "search": {"evals": "ten"}}, "`search.evals` must be an integer"),
        ({"profile": "t4-16gb", "space": {"bits": [4, "8"]}}, "`space.bits` must be a list"),
        ({"profile": "t4-16gb", "search": 3}, "`search` must be a table"),
        ({"profile": "t4-16gb", "export": ["tflite"]}, "format 'tflite' is unknown"),
        ({"profile": "t4-16gb", "export": ["gptq", "gptq"]}, "lists a format twice"),
        ({"profile": "t4-16gb", "search": {"alpha": 2.0}}, "`alpha` must be in"),
    ],
)
def test_bad_job_files_name_the_key_and_the_fix(data, message):
    with pytest.raises(ConfigError, match=message):
        from_mapping(data)


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "job.toml"
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    "text",
    [
        "profile = 't4-16gb'\n[search\nevals = 3\n",  # not TOML
        "profile = 'no-such-device'\n",  # unknown profile
        "profile = 't4-16gb'\nmodel = '/no/such/model'\n",  # missing model
    ],
    ids=["syntax", "profile", "model"],
)
def test_run_exits_2_on_bad_input_and_writes_nothing(text, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["run", str(_write(tmp_path, text))]) == EXIT_INPUT
    err = capsys.readouterr().err
    assert "error:" in err and err.count("\n") <= 3  # one message, not a traceback
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").rglob("summary.json"))


def test_run_missing_job_file_exits_2(tmp_path, capsys):
    assert main(["run", str(tmp_path / "nope.toml")]) == EXIT_INPUT
    assert "does not exist" in capsys.readouterr().err


def _tiny_job(folder: Path, out: Path, budget: float) -> str:
    return f"""
profile = "{PROFILE}"
budget_gb = {budget!r}
model = "{folder}"
device = "cpu"
out = "{out}"

[data]
n_train = 16
n_eval = 6
seq_len = 96
calib_samples = 8
group_size = {GROUP}

[tuning]
steps = 4

[search]
evals = 12
population = 4
children = 4
generations = 1
"""


def test_run_exits_3_when_nothing_fits(tiny_folder, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "run"
    job = _write(tmp_path, _tiny_job(tiny_folder, out, 1e-4))
    assert main(["run", str(job)]) == EXIT_BUDGET
    assert "nothing fits" in capsys.readouterr().err
    assert not (out / "summary.json").exists()


def test_run_finishes_writes_a_valid_summary_and_resumes(
    tiny_folder,  # noqa: F811
    budget_gb,  # noqa: F811
    tmp_path,
    capsys,
    monkeypatch,
):
    monkeypatch.setenv("EDGEQRA_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "run"
    job = _write(tmp_path, _tiny_job(tiny_folder, out, budget_gb))
    assert main(["run", str(job), "--json"]) == EXIT_OK
    printed = json.loads(capsys.readouterr().out)
    summary = json.loads((out / "summary.json").read_text())
    jsonschema.validate(summary, _schema())
    assert printed["run_dir"] == str(out) and printed["chosen"] == summary["chosen"]
    assert summary["chosen"]["predicted_memory_bytes"] <= summary["budget_bytes"]
    assert summary["search"]["evaluations"] <= 12
    # The same job again refuses to clobber the run; --resume continues it from the journal.
    assert main(["run", str(job)]) == EXIT_INPUT
    assert "--resume" in capsys.readouterr().err
    assert main(["run", str(job), "--resume", "--json"]) == EXIT_OK
    resumed = json.loads(capsys.readouterr().out)
    assert resumed["search"]["fresh_evaluations"] == 0
    assert resumed["chosen"]["config"] == summary["chosen"]["config"]


def test_schema_rejects_a_broken_summary():
    summary = {"schema_version": 1, "profile": "t4-16gb"}
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(summary, _schema())
