"""bench/peak_census.py on CPU: the census of live tensors at a LoRA step's peak sees the
loss's fp32 buffers and agrees with the memory model's step terms (activations, grads, AdamW
states) on a 2-layer SmolLM2-shaped model; the GPU run (issue 15) adds the allocator's side."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
peak_census = pytest.importorskip("peak_census")
ARCH = Path(__file__).resolve().parents[1] / "examples" / "architectures" / "smollm2-135m"


def test_census_peak_is_the_loss_backward_and_matches_the_model(tmp_path, capsys):
    out = tmp_path / "census.json"
    peak_census.main(["--arch", str(ARCH), "--layers", "2", "--seq-len", "64", "--out", str(out)])
    report = json.loads(out.read_text())
    assert report["census_peak_op"][1] == "_log_softmax_backward_data"
    vocab = 49152
    fp32_logits = [g for g in report["census_peak_set"] if g["shape"] == [2 * 63, vocab]]
    assert len(fp32_logits) == 3 and all(g["dtype"] == "float32" for g in fp32_logits)
    predicted, census = report["predicted_step_mib"], report["census_peak_mib"]
    assert 0.9 * predicted <= census <= predicted  # the model covers the step, tightly


def test_quantized_config_on_cpu_is_refused_with_one_line(capsys):
    with pytest.raises(SystemExit) as why:
        peak_census.main(["--arch", str(ARCH), "--layers", "2", "--config", "4/8x2"])
    assert "--device cuda" in str(why.value)


def test_inference_census_peak_is_the_mlp_moment_within_the_model(tmp_path):
    out = tmp_path / "census.json"
    argv = ["--arch", str(ARCH), "--layers", "2", "--phase", "inference", "--context", "128"]
    peak_census.main([*argv, "--out", str(out)])
    report = json.loads(out.read_text())
    # The prefill layer's MLP: gate, up, act(gate) and their product alive together.
    mlp = {g["op"] for g in report["census_peak_set"] if g["shape"][-1:] == [1536]}
    assert {"silu", "mul"} <= mlp
    predicted, census = report["predicted_step_mib"], report["census_peak_mib"]
    assert 0.7 * predicted <= census <= predicted


def test_static_census_counts_parameters_buffers_and_attribute_caches_once():
    import torch
    from conftest import tiny_model

    model = tiny_model("llama")
    params = sum(p.numel() * p.element_size() for p in model.parameters())  # tied: once
    layer = model.model.layers[0].mlp
    layer.down_proj.cache = torch.zeros(1024, dtype=torch.int16)  # a kernel's plain attribute
    layer.down_proj.pair = (torch.zeros(256), layer.down_proj.weight)  # the weight: not twice
    held = peak_census.static_census(model)
    assert held["attribute Linear.cache int16"] == 2048 / peak_census.MiB
    assert held["attribute Linear.pair float32"] == 1024 / peak_census.MiB
    weights = sum(v for k, v in held.items() if k.startswith("parameter "))
    assert weights == pytest.approx(params / peak_census.MiB)


def _frame(path: str, line: int, name: str) -> dict:
    return {"filename": path, "line": line, "name": name}


PEFT = _frame("/x/site-packages/peft/tuners/lora/layer.py", 700, "forward")
TORCH = _frame("/x/site-packages/torch/nn/modules/linear.py", 125, "forward")


def test_trace_peak_names_the_blocks_no_census_tensor_holds_at_the_highest_point():
    # The step starts with one block (a weight); 'a' is a census tensor, 'b' is allocated below
    # the dispatcher by a PEFT forward; 'c' comes after the peak and must not count.
    start = {0x100: 1000}
    entries = [
        {"action": "alloc", "addr": 0xA, "size": 300, "frames": [TORCH]},
        {"action": "alloc", "addr": 0xB, "size": 200, "frames": [TORCH, PEFT]},
        {"action": "free_requested", "addr": 0xA, "size": 300},  # not yet reusable
        {"action": "free_completed", "addr": 0xA, "size": 300},
        {"action": "alloc", "addr": 0xC, "size": 250, "frames": [TORCH]},
    ]
    out = peak_census.trace_peak(start, entries, owned={0xA}, top=5)
    assert out["peak_mib"] * peak_census.MiB == 1500  # 1000 + 300 + 200, before the free
    assert out["above_start_mib"] * peak_census.MiB == 500
    assert out["unowned_mib"] * peak_census.MiB == 200  # only 'b'
    (group,) = out["unowned_by_caller"]
    assert group["where"] == "peft/tuners/lora/layer.py:700 forward" and group["count"] == 1


def test_unowned_blocks_leave_out_module_storages_and_free_blocks():
    segments = [
        {
            "blocks": [
                {"address": 1, "size": 4096, "state": "active_allocated", "frames": [PEFT]},
                {"address": 2, "size": 1024, "state": "active_allocated", "frames": [TORCH]},
                {"address": 3, "size": 9999, "state": "inactive", "frames": []},
            ]
        }
    ]
    out = peak_census.unowned_blocks(segments, owned={1}, top=5)
    assert out["mib"] * peak_census.MiB == 1024
    # every frame is torch's: the innermost one names it
    assert out["by_caller"][0]["where"] == "torch/nn/modules/linear.py:125 forward"


def test_snapshot_needs_cuda(capsys):
    with pytest.raises(SystemExit) as why:
        peak_census.main(["--arch", str(ARCH), "--layers", "2", "--snapshot"])
    assert "--device cuda" in str(why.value)


def test_module_tensors_sees_attributes_a_kernel_keeps():
    model = torch.nn.Linear(4, 4)
    model.cache = torch.zeros(8)  # a plain attribute, as GPTQModel's decoded zeros are
    kinds = {kind for kind, _ in peak_census.module_tensors(model)}
    assert {"parameter weight", "parameter bias", "attribute Linear.cache"} <= kinds
