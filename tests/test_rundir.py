"""edgeqra.rundir on a real tiny search's run directory: every entry written and read back
through RunFiles, a finished run opened by RunDir, summary.json checked against its schema,
an incomplete directory named in one error, and a resume under other settings refused."""

from __future__ import annotations

import dataclasses
import json
import re
import shutil

import pytest
from conftest import MIXED

from edgeqra.cli import EXIT_INPUT, main
from edgeqra.json_schema import problems
from edgeqra.result import Result
from edgeqra.rundir import (
    ADAPTER,
    CHOSEN,
    FRONT,
    JOB,
    JOURNAL,
    SENSITIVITY,
    SUMMARY,
    RunDir,
    RunDirError,
    RunFiles,
    chosen_schema,
    summary_schema,
)


def _files(folder) -> dict[str, bytes]:
    """Every file under ``folder`` (relative path -> bytes)."""
    return {
        p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()
    }


def test_a_real_run_holds_every_entry_and_opens(tiny_search_run):
    files = RunFiles(tiny_search_run.out)
    for name in (JOB, JOURNAL, SENSITIVITY, FRONT, CHOSEN, SUMMARY):
        assert (files.path / name).is_file(), name
    assert (files.adapter / "adapter_config.json").is_file() and files.finished
    run = RunDir.open(files.path)
    assert str(run.config) == MIXED and run.adapter == files.adapter
    assert run.job == files.read_job() and run.chosen["spec"] == MIXED
    assert run.summary["chosen"]["config"] == MIXED and run.summary["chosen"]["fits"]
    assert run.summary["chosen"]["adapter"] == ADAPTER
    assert problems(run.summary, summary_schema()) == []
    assert problems(run.chosen, chosen_schema()) == []
    jsonschema = pytest.importorskip("jsonschema")
    jsonschema.validate(run.summary, summary_schema())
    jsonschema.validate(run.chosen, chosen_schema())
    entries, failures = files.read_journal()
    assert entries and not failures
    assert {r.config for r in files.read_front()} <= {e.result.config for e in entries}


def test_every_entry_round_trips(tiny_search_run, tmp_path):
    src = RunFiles(tiny_search_run.out)
    job = src.read_job()
    entries, _ = src.read_journal()
    dst = RunFiles.create(tmp_path / "copy", job)
    journal = dst.open_journal()
    for e in entries:
        journal.append(e.result, stage=e.stage, worker=e.worker, wall=e.wall)
    dst.write_sensitivity(src.read_sensitivity())
    dst.write_front(src.read_front())
    dst.write_chosen(src.read_chosen())
    shutil.copytree(src.adapter, dst.adapter_staging())
    assert not dst.finished  # nothing counts as finished before its summary
    assert dst.install_adapter() == dst.adapter
    dst.write_summary(src.read_summary())

    assert dst.read_job() == job
    again, failures = dst.read_journal()
    assert [(e.result, e.stage, e.worker, e.wall) for e in again] == [
        (e.result, e.stage, e.worker, e.wall) for e in entries
    ] and not failures
    assert dst.read_sensitivity() == src.read_sensitivity()
    assert dst.read_front() == src.read_front() and all(
        isinstance(r, Result) for r in dst.read_front()
    )
    assert dst.read_chosen() == src.read_chosen()
    assert dst.read_summary() == src.read_summary()
    assert _files(dst.adapter) == _files(src.adapter)
    opened, original = RunDir.open(dst.path), RunDir.open(src.path)
    assert (opened.job, opened.chosen, opened.summary, opened.config) == (
        original.job, original.chosen, original.summary, original.config
    )  # fmt: skip
    assert sorted(p.name for p in dst.path.iterdir()) == sorted(
        [JOB, JOURNAL, SENSITIVITY, FRONT, CHOSEN, ADAPTER, SUMMARY]
    )  # no temp file or staging folder left
    with pytest.raises(RunDirError, match="already holds a run"):
        RunFiles.create(dst.path, job)
    recorded = dst.record_exports({"gptq": "export-gptq"})
    assert dst.read_summary() == recorded and recorded["exports"] == {"gptq": "export-gptq"}
    with pytest.raises(ValueError, match="exports"):
        dst.record_exports({"safetensors": "export-x"})  # not a format the schema knows


def test_an_incomplete_run_dir_is_one_error_naming_what_is_missing(tiny_search_run, tmp_path):
    partial = tmp_path / "partial"
    partial.mkdir()
    shutil.copy(tiny_search_run.out / JOB, partial / JOB)
    shutil.copy(tiny_search_run.out / JOURNAL, partial / JOURNAL)
    with pytest.raises(RunDirError) as caught:
        RunDir.open(partial)
    message = str(caught.value)
    for name in (CHOSEN, SUMMARY, f"{ADAPTER}/adapter_config.json"):
        assert name in message
    assert JOB not in message.split("missing")[1] and f"--resume {partial}" in message
    files = RunFiles(partial)  # a run in progress still reads as far as it got
    assert not files.finished and files.read_job() == RunFiles(tiny_search_run.out).read_job()
    assert files.read_sensitivity() is None and files.read_journal()[0]
    with pytest.raises(RunDirError, match=f"{SUMMARY}.*--resume"):
        files.read_summary()
    with pytest.raises(RunDirError, match="does not exist"):
        RunDir.open(tmp_path / "nowhere")
    with pytest.raises(RunDirError, match=f"not a run directory \\(no {JOB}\\)"):
        RunFiles(tmp_path).read_job()


def _copy_with(tiny_search_run, tmp_path, change, name: str = SUMMARY) -> RunFiles:
    """A copy of the run whose ``name`` (summary.json by default) ``change`` edited in place."""
    copy = tmp_path / "run"
    shutil.copytree(tiny_search_run.out, copy, ignore=shutil.ignore_patterns("export*", "*pkg*"))
    data = json.loads((copy / name).read_text())
    change(data)
    (copy / name).write_text(json.dumps(data))
    return RunFiles(copy)


@pytest.mark.parametrize(
    ("change", "named"),
    [
        (lambda s: s["chosen"].update(fits="yes"), "`chosen.fits` must be boolean"),
        (lambda s: s.pop("budget_bytes"), "`budget_bytes` is missing"),
        (lambda s: s["search"]["front"][0].update(score=None), "`search.front[0].score`"),
        (lambda s: s.update(metric="bleu"), "`metric` must be one of"),
        (lambda s: s["chosen"].update(config="5/8"), "`chosen.config` does not match"),
    ],
)
def test_a_broken_summary_is_a_rundir_error_naming_the_field(
    tiny_search_run, tmp_path, change, named
):
    files = _copy_with(tiny_search_run, tmp_path, change)
    broken = json.loads(files.summary.read_text())
    with pytest.raises(RunDirError, match=named.replace("[", r"\[").replace("]", r"\]")):
        RunDir.open(files.path)
    with pytest.raises(ValueError, match="breaks its schema"):
        files.write_summary(broken)  # the pipeline never writes one
    jsonschema = pytest.importorskip("jsonschema")  # the checker agrees with the real thing
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, summary_schema())


@pytest.mark.parametrize(
    ("change", "named"),
    [
        (lambda c: c.update(spec="5/8,4/8"), "`spec` does not match"),
        (lambda c: c.pop("budget_bytes"), "`budget_bytes` is missing"),
        (lambda c: c["predicted_memory"].update(total="1 GiB"), "`predicted_memory.total`"),
        (lambda c: c.update(config=[]), "`config`"),
        (lambda c: c.update(extra=1), "extra"),
    ],
)
def test_a_broken_chosen_json_is_a_rundir_error_naming_the_field(
    tiny_search_run, tmp_path, change, named
):
    files = _copy_with(tiny_search_run, tmp_path, change, CHOSEN)
    chosen = json.loads(files.chosen.read_text())
    with pytest.raises(RunDirError, match=re.escape(named)):
        RunDir.open(files.path)
    with pytest.raises(ValueError, match="chosen.json breaks its schema"):
        files.write_chosen(chosen)  # the pipeline never writes one
    jsonschema = pytest.importorskip("jsonschema")  # the checker agrees with the real thing
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(chosen, chosen_schema())


def test_a_summary_from_before_the_schema_still_reads(tiny_search_run, tmp_path):
    files = _copy_with(tiny_search_run, tmp_path, lambda s: s.pop("schema_version"))
    assert files.read_summary()["schema_version"] == 1
    assert RunDir.open(files.path).summary["chosen"]["config"] == MIXED


def test_the_schema_describes_the_types_the_pipeline_writes(tiny_search_run):
    """The schema's result is :class:`Result` field for field, and its `chosen` is what the
    pipeline writes: a field added to one and not the other fails here."""
    schema = summary_schema()
    result = schema["$defs"]["result"]
    names = {f.name for f in dataclasses.fields(Result)}
    assert set(result["properties"]) == names and set(result["required"]) <= names
    summary = RunFiles(tiny_search_run.out).read_summary()
    chosen = schema["properties"]["chosen"]
    assert set(summary["chosen"]) == set(chosen["properties"]) == set(chosen["required"])
    assert set(schema["required"]) <= set(summary) <= set(schema["properties"])
    chosen = RunFiles(tiny_search_run.out).read_chosen()
    assert set(chosen) == set(chosen_schema()["properties"]) == set(chosen_schema()["required"])


def test_resuming_under_changed_settings_is_refused_naming_the_setting(
    tiny_search_run, tmp_path, capsys
):
    """`edgeqra run JOB --resume` with a job file that asks for other settings than the run
    was started with: refused before any work, naming the setting, its flag and both values."""
    from edgeqra.job import JobSpec, save_job

    copy = tmp_path / "run"
    shutil.copytree(tiny_search_run.out, copy, ignore=shutil.ignore_patterns("export*", "*pkg*"))
    before = _files(copy)
    job = RunFiles(copy).read_job()
    other = dataclasses.replace(job, search=dataclasses.replace(job.search, evals=7))
    path = save_job(JobSpec(search=other, out=copy), tmp_path / "job.toml")
    assert main(["run", str(path), "--resume"]) == EXIT_INPUT
    err = capsys.readouterr().err
    assert f"`search.evals` (`--evals`) = {job.search.evals!r}, now 7" in err
    assert err.count("\n") == 1 and _files(copy) == before  # nothing ran, nothing written
