"""`plan --measure --cap`: the planned config run under the profile's budget as a GPU cap.

CPU: argument handling, the no-GPU exit, and the cap logic (fraction set and lifted, one line
naming the overrun, exit 5) with the CUDA calls stubbed. GPU (marked ``gpu``): a config that
fits passes, one predicted not to fit fails cleanly.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from edgeqra import measure
from edgeqra.cli import EXIT_INPUT, EXIT_NO_GPU, EXIT_OK, EXIT_OVER_CAP, main
from edgeqra.errors import ModelError
from edgeqra.profiles import load_profile
from edgeqra.space import Config

ARCH = Path(__file__).resolve().parents[1] / "examples" / "architectures"
SMOL = str(ARCH / "smollm2-135m")
NO_CUDA = not torch.cuda.is_available()
GIB = 1 << 30


def _plan(*extra: str) -> list[str]:
    return ["plan", "--profile", "rtx-4090-24gb", "--model", SMOL, *extra]


def _uniform(n: int, choice: str = "4/8") -> str:
    """A config spec of ``n`` equal units (``Config.parse`` takes one item per unit)."""
    return ",".join([choice] * n)


@pytest.mark.parametrize("flag", [["--cap"], ["--config", _uniform(30)]])
def test_cap_or_config_without_measure_is_an_input_error(capsys, flag):
    assert main(_plan(*flag)) == EXIT_INPUT
    err = capsys.readouterr().err
    assert f"`{flag[0]}`" in err and "--measure" in err


@pytest.mark.parametrize(
    "config, needle",
    [(_uniform(29), "29 units"), ("4/8,banana", "banana"), (_uniform(31), "31 units")],
)
def test_config_must_be_one_choice_per_layer(capsys, config, needle):
    assert main(_plan("--measure", "--cap", "--config", config)) == EXIT_INPUT
    assert needle in capsys.readouterr().err


@pytest.mark.skipif(not NO_CUDA, reason="checks the no-GPU path")
def test_cap_without_gpu_exits_4_and_runs_nothing(capsys):
    assert main(_plan("--measure", "--cap")) == EXIT_NO_GPU
    captured = capsys.readouterr()
    assert "needs a CUDA GPU" in captured.err and "nothing was run" in captured.err
    with pytest.raises(ModelError, match="CUDA GPU"):
        measure.capped_run(
            None, Config.uniform(30, 4, 8), load_profile("rtx-4090-24gb"), work_dir=Path(".")
        )


class _FakeCuda:
    """Enough of torch.cuda for capped_run on a CPU machine; records the fractions set."""

    def __init__(self, monkeypatch, total: int):
        self.fractions: list[float] = []
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(
            torch.cuda, "get_device_properties", lambda dev: SimpleNamespace(total_memory=total)
        )
        monkeypatch.setattr(torch.cuda, "memory_reserved", lambda dev=None: 0)
        monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
        monkeypatch.setattr(torch.cuda, "set_per_process_memory_fraction", self._set_fraction)
        monkeypatch.setattr(measure, "cuda_context_bytes", lambda dev=None: 512 << 20)
        monkeypatch.setattr(measure, "_release", lambda: None)

    def _set_fraction(self, fraction: float, dev=None) -> None:
        # torch refuses a bare "cuda" here (it needs an index): the H200 run of 2026-12-02 hit it
        if not isinstance(dev, int) and (dev is None or torch.device(dev).index is None):
            raise ValueError(f"Expected a torch.device with a specified index, got {dev}")
        self.fractions.append(fraction)


def _record(oom_phase: bool, *, oom: bool = True) -> dict:
    phases = [{"mode": "inference", "measured": {}, "predicted_total": 3 * GIB}]
    if oom_phase:
        phases.append(
            {
                "mode": "finetune",
                "workload": {"gradient_checkpointing": True},
                "predicted_total": 30 * GIB,
                "error": "OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB\nmore",
                "oom": oom,
            }
        )
    return {"config": "4/8x30", "kernels": {}, "phases": phases}


@pytest.mark.parametrize("overrun", [False, True])
def test_capped_run_sets_and_lifts_the_cap_and_names_the_overrun(monkeypatch, overrun):
    profile = load_profile("rtx-4090-24gb")
    fake = _FakeCuda(monkeypatch, total=140 * GIB)
    seen = {}

    def fake_measure(hf, config, prof, **kw):
        seen.update(kw, fractions=list(fake.fractions))
        return _record(overrun)

    monkeypatch.setattr(measure, "measure_config", fake_measure)
    env: dict[str, str] = {}
    monkeypatch.setattr(measure.os, "environ", env)  # restored after the test
    result = measure.capped_run(None, Config.uniform(30, 4, 8), profile, work_dir=Path("."))
    # cuBLAS gets the 4090's (sm_89) default workspace, not the H200's 32 MiB.
    assert env == {"CUBLAS_WORKSPACE_CONFIG": ":4096:2:16:8"}
    cap = profile.budget_bytes - (512 << 20)
    assert result.cap_bytes == cap and result.outside_bytes == 512 << 20
    assert seen["fractions"] == [pytest.approx(cap / (140 * GIB))]  # capped while it ran
    assert fake.fractions[-1] == 1.0  # lifted after
    assert seen["kernels"] == profile.kernels and seen["checkpointing"] == (True,)
    assert seen["modes"] == ["inference", "finetune"]  # the profile's mode is "both"
    assert result.fits is not overrun
    if overrun:
        line = result.overrun
        assert "\n" not in line
        assert "finetune (gradient checkpointing) of 4/8x30" in line
        assert "rtx-4090-24gb" in line and "23.50 GiB" in line and "predicted 30.00 GiB" in line
        assert line.endswith(": out of memory in the run (tried to allocate 2.00 GiB)")


def test_an_oom_while_building_is_named_so_and_cut_to_its_size():
    # the H200 cap run's error (2026-12-04), as measure_config records a build failure
    error = (
        "build: OutOfMemoryError: CUDA out of memory. Tried to allocate 112.00 MiB. GPU 0 has "
        "a total capacity of 139.80 GiB of which 128.29 GiB is free. Including non-P"
    )
    summary = measure._oom_summary(error)
    assert summary == "out of memory while building the model (tried to allocate 112.00 MiB)"
    assert measure._oom_summary("OutOfMemoryError") == "out of memory in the run"


def test_capped_run_raises_on_a_failure_that_is_not_memory(monkeypatch):
    _FakeCuda(monkeypatch, total=140 * GIB)
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # the user's choice is kept
    monkeypatch.setattr(measure, "measure_config", lambda *a, **k: _record(True, oom=False))
    with pytest.raises(RuntimeError, match="not for memory"):
        measure.capped_run(
            None, Config.uniform(30, 4, 8), load_profile("rtx-4090-24gb"), work_dir=Path(".")
        )


def test_capped_run_refuses_a_gpu_smaller_than_the_budget(monkeypatch):
    _FakeCuda(monkeypatch, total=16 * GIB)
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    with pytest.raises(ModelError, match="less than profile `rtx-4090-24gb`"):
        measure.capped_run(
            None, Config.uniform(30, 4, 8), load_profile("rtx-4090-24gb"), work_dir=Path(".")
        )


@pytest.mark.parametrize("as_json", [False, True])
def test_cli_exit_5_with_one_line_on_overrun(monkeypatch, capsys, as_json):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    line = "finetune of 4/8x30 needs more than profile `rtx-4090-24gb`'s budget of 23.50 GiB"

    def fake(hf, config, profile, **kw):
        return measure.CapResult(config.short(), 1, 0, 1, _record(True), line)

    monkeypatch.setattr(measure, "capped_run", fake)
    argv = _plan("--measure", "--cap", "--config", _uniform(30))
    assert main([*argv, "--json"] if as_json else argv) == EXIT_OVER_CAP
    captured = capsys.readouterr()
    assert captured.err.strip().splitlines() == [f"over budget: {line}"]
    if as_json:
        data = json.loads(captured.out)
        assert data["fits"] is False and data["overrun"] == line and data["config"] == "4/8x30"


@pytest.mark.gpu
@pytest.mark.skipif(NO_CUDA, reason="needs a CUDA GPU")
def test_cap_on_gpu_passes_a_fitting_config_and_fails_an_oversized_one(capsys):
    assert main(_plan("--measure", "--cap", "--json")) == EXIT_OK
    data = json.loads(capsys.readouterr().out)
    assert data["fits"] and data["overrun"] is None
    big = str(ARCH / "llama-3.1-8b")
    argv = ["plan", "--profile", "jetson-orin-nano-8gb", "--model", big, "--measure", "--cap"]
    assert main([*argv, "--config", _uniform(32, "16/8")]) == EXIT_OVER_CAP
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("over budget:") and "16/8x32" in err[0]
