"""`edgeqra export` / `verify` on a tiny random Llama run: each format reloads and matches.

The run directory is a real tiny search's (``tiny_search_run`` in conftest.py, shared with
tests/test_rundir.py): every file in it is the pipeline's. Its chosen config mixes a 4-bit,
a 3-bit and a 16-bit unit and two LoRA ranks; its budget is that config's predicted memory
plus one byte.

Tolerances, stated once:
* adapter form vs the in-memory model the search scored (bank W_hat + adapter): both are
  float32 with the same dequantized values (GPTQModel's torch kernel dequantizes the fp16
  scales exactly), so only matmul order differs: max |Δlogit| ≤ 1e-4; scores equal to 1e-6.
* merged GPTQ vs the in-memory models: re-quantizing W + (α/r)BA costs accuracy; the
  difference is printed and only bounded loosely (finite, < 2.0 on logits of scale ~0.5).
* verify's probe: same loader again, ≤ 1e-3 + 1e-3·|ref| (``package.PARITY_*``).
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import tarfile

import edgeqra.exporters.gptq
import pytest
import torch
from conftest import MIXED, MIXED_STEPS
from edgeqra.exporters import package
from edgeqra.exporters.gptq import (
    WEIGHTS,
    load_adapter_form,
    load_checkpoint,
    merge_adapter,
    module_bits,
)
from edgeqra.exporters.merge import MergeSettings

from edgeqra.cli import EXIT_INPUT, EXIT_INTERNAL, EXIT_OK, main
from edgeqra.pipeline import prepare
from edgeqra.result import Result
from edgeqra.rundir import RunDir, summary_schema

CONFIG = MIXED
STEPS = MIXED_STEPS
ADAPTER_ATOL = 1e-4
MERGED_BOUND = 2.0


@pytest.fixture(scope="module")
def env(tiny_search_run):
    """The run's bank cache for the module (every export rebuilds the run's bank from it)."""
    mp = pytest.MonkeyPatch()
    mp.setenv("EDGEQRA_CACHE", str(tiny_search_run.cache))
    mp.setenv("GPTQMODEL_CPU_WORKERS", "2")
    yield
    mp.undo()


@pytest.fixture(scope="module")
def run(env, tiny_search_run):
    """The finished tiny search's run directory (chosen: CONFIG), the prepared pipeline it
    came from (model, data and bank: the bank is a cache hit) and its final result."""
    out = tiny_search_run.out
    opened = RunDir.open(out)
    assert str(opened.config) == CONFIG and opened.job.search.steps == STEPS
    prepared = prepare(opened.job.eval, needed_bits=(3, 4), progress=False)
    final = Result(**opened.summary["chosen"]["final"])
    return out, prepared, opened.config, final


def _in_memory(prepared, config, adapter, ids, *, merged: bool = False) -> torch.Tensor:
    """Logits (seq, vocab) of the bank-assembled model + adapter, as the search scored it."""
    from peft import PeftModel

    model = prepared.loaded.model
    prepared.bank.assemble(model, config)
    peft_model = PeftModel.from_pretrained(model, str(adapter))
    with torch.no_grad():
        if merged:
            logits = peft_model.merge_and_unload()(ids).logits[0]
        else:
            logits = peft_model(ids).logits[0]
            peft_model.unload()
    return logits


def _report(capsys, message: str) -> None:
    """Print a measured difference even while capsys captures the CLI's output."""
    with capsys.disabled():
        print(message)


def _units_bits(prepared, config) -> dict[str, int]:
    return {
        lin.name: c.bits
        for unit, c in zip(prepared.loaded.units, config, strict=True)
        for lin in unit.linears
    }


def test_merge_adds_scaled_low_rank_product(run):
    """merge_adapter on the dense assembled model gives W_hat + (alpha/r)·B·A per module."""
    from safetensors.torch import load_file

    out, prepared, config, _ = run
    model = prepared.loaded.model
    prepared.bank.assemble(model, config)
    name = "model.layers.1.self_attn.q_proj"  # unit 1: 3-bit, rank 4 (a rank_pattern entry)
    w_hat = model.get_submodule(name).weight.detach().clone()
    lora = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    a = lora[f"base_model.model.{name}.lora_A.weight"]  # (r, d_in)
    b = lora[f"base_model.model.{name}.lora_B.weight"]  # (d_out, r)
    assert a.shape[0] == 4
    merged = merge_adapter(model, out / "adapter")
    expected = w_hat + (2.0 * 4 / 4) * b @ a  # lora_alpha = alpha_ratio * r = 2r
    torch.testing.assert_close(merged.get_submodule(name).weight, expected, atol=1e-6, rtol=1e-5)
    assert float((b @ a).abs().max()) > 1e-4  # the adapter trained: the merge changes W


def test_adapter_export_is_the_exact_search_model(run, capsys):
    out, prepared, config, final = run
    paths = package.export_run(out, ("adapter",))
    pkg = out / paths["adapter"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["exports"] == {"adapter": "export-adapter"}
    jsonschema = pytest.importorskip("jsonschema")
    jsonschema.validate(summary, summary_schema())

    manifest = json.loads((pkg / "manifest.json").read_text())
    # Per-module bits in the written quantize config are the run's config (16 = left dense).
    qcfg = json.loads((pkg / "base" / "quantize_config.json").read_text())
    assert module_bits(qcfg, list(_units_bits(prepared, config))) == _units_bits(prepared, config)
    assert manifest["quantization"]["module_bits"] == _units_bits(prepared, config)
    # The base holds the bank's very packed tensors (what the search's W_hat came from).
    from safetensors.torch import load_file

    written = load_file(str(pkg / "base" / WEIGHTS))
    for unit, choice in zip(prepared.loaded.units, config, strict=True):
        if choice.bits < 16:
            for key, tensor in prepared.bank.packed(unit.index, choice.bits).items():
                assert torch.equal(written[key], tensor), key
        else:
            assert f"{unit.linears[0].name}.weight" in written
    adapter_cfg = json.loads((pkg / "adapter" / "adapter_config.json").read_text())
    assert adapter_cfg["rank_pattern"] and adapter_cfg["r"] == 8

    # Reloaded with GPTQModel + PEFT it is the model the search scored.
    ids = torch.tensor(manifest["parity"]["input_ids"])
    reloaded = load_adapter_form(pkg / "base", pkg / "adapter")
    with torch.no_grad():
        got = reloaded(ids).logits[0]
    want = _in_memory(prepared, config, out / "adapter", ids)
    diff = float((got - want).abs().max())
    print(f"adapter form vs in-memory search model: max |Δlogit| {diff:.2e}")
    assert diff <= ADAPTER_ATOL
    scores = manifest["scores"]
    assert scores["run_final"] == final.score
    assert abs(scores["before_merge"]["score"] - final.score) <= 1e-6
    assert abs(scores["package"]["score"] - final.score) <= 1e-6
    assert abs(scores["package"]["loss"] - final.loss) <= 1e-4
    assert manifest["parity"]["vs_unmerged_in_memory_max_abs"] <= ADAPTER_ATOL

    # Every file is hashed, the probe passes, the model card carries the per-layer table.
    assert set(manifest["files"]) == {
        p.relative_to(pkg).as_posix() for p in pkg.rglob("*") if p.is_file()
    } - {"manifest.json"}
    report = package.verify_package(pkg)
    assert report.ok, report.failures()
    card = (pkg / "README.md").read_text()
    assert "| 1 | `model.layers.1` | 3 | 4 |" in card and "16 (dense)" in card
    assert "transformers" in card and "PeftModel.from_pretrained" in card


def test_unmerged_score_is_the_runs_final_and_scored_again_on_another_device(run):
    """The export takes the run's final score as the unmerged one only where it is the same
    computation: the saved adapter on the bank base scores exactly what the final tuning did."""
    import dataclasses

    from peft import PeftModel

    out, prepared, config, final = run
    run_dir = package.RunDir.open(out)
    reused = package._run_final_score(run_dir, prepared)
    assert reused is not None and reused["from_run"]
    model = prepared.loaded.model
    prepared.bank.assemble(model, config)
    unmerged = PeftModel.from_pretrained(model, str(out / "adapter"), is_trainable=False).eval()
    try:
        again = package._score(prepared, unmerged)
    finally:
        unmerged.unload()
    assert again["score"] == reused["score"] == final.score
    assert abs(again["loss"] - reused["loss"]) <= 1e-6 and again["n"] == reused["n"]
    elsewhere = dataclasses.replace(run_dir, summary={**run_dir.summary, "device": "cuda"})
    assert package._run_final_score(elsewhere, prepared) is None  # bf16 there: score again


def test_gptq_export_old_merge_requantizes_and_verifies(run, capsys):
    out, prepared, config, final = run
    pkg = out / "gptq-pkg"
    assert main(["export", str(out), "--format", "gptq", "--out", str(pkg), "--archive",
                 "--json", "--merge", "requantize"]) == EXIT_OK  # fmt: skip
    printed = json.loads(capsys.readouterr().out)
    manifest = json.loads((pkg / "manifest.json").read_text())
    scores = manifest["scores"]
    assert printed["scores"] == scores
    assert abs(scores["before_merge"]["score"] - final.score) <= 1e-6
    assert scores["after_merge"] is not None and scores["package"] == scores["after_merge"]
    _report(
        capsys,
        f"score before merge {scores['before_merge']['score']:.4f} "
        f"(loss {scores['before_merge']['loss']:.4f}), after merge + GPTQ "
        f"{scores['after_merge']['score']:.4f} (loss {scores['after_merge']['loss']:.4f})",
    )

    # Mixed bits as the run chose them; the 16-bit unit is skipped (`-:`) and stays dense.
    qcfg = json.loads((pkg / "config.json").read_text())["quantization_config"]
    assert module_bits(qcfg, list(_units_bits(prepared, config))) == _units_bits(prepared, config)
    assert any(k.startswith("-:") and "layers\\.2" in k for k in qcfg["dynamic"])
    for name in ("tokenizer.json", "generation_config.json", "README.md", WEIGHTS):
        assert (pkg / name).is_file(), name
    # Same tensor names as the adapter form's base (both are GPTQModel checkpoints of CONFIG).
    base = out / "export-adapter" / "base" / WEIGHTS
    if base.is_file():
        from safetensors import safe_open

        with safe_open(str(pkg / WEIGHTS), "pt") as a, safe_open(str(base), "pt") as b:
            assert set(a.keys()) == set(b.keys())

    # Reload with GPTQModel: logits vs the in-memory models, reported, loosely bounded.
    model = load_checkpoint(pkg)
    assert type(model.model.layers[2].mlp.up_proj).__name__ == "Linear"
    assert type(model.model.layers[1].mlp.up_proj).__name__ != "Linear"
    ids = torch.tensor(manifest["parity"]["input_ids"])
    with torch.no_grad():
        got = model(ids).logits[0]
    vs_merged = float((got - _in_memory(prepared, config, out / "adapter", ids, merged=True))
                      .abs().max())  # fmt: skip
    vs_unmerged = float((got - _in_memory(prepared, config, out / "adapter", ids)).abs().max())
    _report(
        capsys,
        f"merged GPTQ vs merged dense {vs_merged:.3e}, vs unmerged search model {vs_unmerged:.3e}",
    )
    assert 0 < vs_merged < MERGED_BOUND and 0 < vs_unmerged < MERGED_BOUND
    assert manifest["parity"]["merged_gptq_vs_unmerged_max_abs"] == pytest.approx(
        vs_unmerged, abs=1e-4
    )

    # The archive holds exactly the package.
    with tarfile.open(out / "gptq-pkg.tar.gz") as tar:
        members = {m.name for m in tar.getmembers() if m.isfile()}
    assert members == {f"gptq-pkg/{p}" for p in manifest["files"]} | {"gptq-pkg/manifest.json"}

    # verify: passes, then a flipped byte is caught and named (exit 2).
    assert main(["verify", str(pkg)]) == EXIT_OK
    capsys.readouterr()
    target = pkg / WEIGHTS
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0x01
    target.write_bytes(bytes(data))
    assert main(["verify", str(pkg)]) == EXIT_INPUT
    err = capsys.readouterr().err
    assert WEIGHTS in err and "failed verification" in err

    # Refuses to overwrite without --force, before any work.
    assert main(["export", str(out), "--format", "gptq", "--out", str(pkg)]) == EXIT_INPUT
    assert "--force" in capsys.readouterr().err


def _grid_of(prepared, unit, bits, module):
    """(d_out, d_in) scales, zeros and maxq of a module on the bank's stored grid."""
    from edgeqra.exporters.merge import GridLayout

    layout = GridLayout.from_packed(prepared.bank.packed(unit.index, bits), module, bits, v1=True)
    s = layout.scales[layout.g_idx].t()  # (d_out, d_in)
    z = layout.zeros[layout.g_idx].t()
    return s, z, layout.maxq


def test_grid_merge_lies_on_the_bank_grid_and_beats_requantize(run, capsys):
    """Merged-on-grid values lie on the bank's grid exactly; per-layer merge error reported."""
    from safetensors.torch import load_file

    from edgeqra.gptq import dequantized_weights

    out, prepared, config, final = run
    result = package.export_package(out, "gptq")  # RUN_DIR/export-gptq: the ONNX test reuses it
    pkg, manifest = result.path, result.manifest
    written = load_file(str(pkg / WEIGHTS))
    w_new = dequantized_weights(pkg)  # GPTQModel's unpacking of what was written
    changed = 0
    for unit, choice in zip(prepared.loaded.units, config, strict=True):
        if choice.bits >= 16:
            continue
        bank = prepared.bank.packed(unit.index, choice.bits)
        for key, tensor in bank.items():  # the grid itself is the bank's, bit for bit
            if not key.endswith(".qweight"):
                assert torch.equal(written[key], tensor), key
        for lin in unit.linears:
            s, z, maxq = _grid_of(prepared, unit, choice.bits, lin.name)
            w = w_new[lin.name]
            q = torch.round(w / s + z)
            assert torch.equal(s * (q - z), w), lin.name  # exactly on the stored grid
            assert int(q.min()) >= 0 and int(q.max()) <= maxq
            changed += int((written[f"{lin.name}.qweight"] != bank[f"{lin.name}.qweight"]).sum())
    assert changed > 0  # the adapter moved codes

    layers = manifest["merge"]["layers"]
    assert [layer["action"] for layer in layers] == ["merged", "merged", "dense"]
    for layer in layers[:2]:
        _report(capsys, f"unit {layer['unit']} ({layer['bits']}-bit): lost {layer['lost']:.3f} "
                        f"(round-to-nearest {layer['lost_rtn']:.3f}), output error "
                        f"{layer['output_error']:.2e}, codes changed {layer['codes_changed']:.2%}")  # fmt: skip
        assert 0 <= layer["lost"] < 1 and layer["lost"] <= layer["lost_rtn"]
        assert 0 < layer["adapter_effect"] and 0 < layer["codes_changed"] < 1
    card = (pkg / "README.md").read_text()
    assert "## Merge, per layer" in card and "| 1 | 3 → 3 | 4 | merged |" in card

    # Loads with GPTQModel (its torch kernel) and equals the dense twin holding W'.
    from edgeqra.exporters.onnx import float_model

    model = load_checkpoint(pkg)
    kernels = [m for m in model.modules() if hasattr(m, "qweight")]
    assert kernels and not any(  # eager: no torch.compile per module (the recompile storm)
        hasattr(m.dequantize_weight, "_torchdynamo_orig_callable") for m in kernels
    )
    ids = torch.tensor(manifest["parity"]["input_ids"])
    with torch.no_grad():
        got = model(ids).logits[0]
        twin = float_model(pkg)(ids).logits[0]
    assert float((got - twin).abs().max()) <= ADAPTER_ATOL
    # Closer to the tuned model than the old merge (GPTQ again on a fresh grid): mean squared
    # logit error over the probe's 16 tokens x vocab (the max of one probe is noisy here).
    old = package.export_package(
        out, "gptq", out / "old-pkg", merge=MergeSettings(method="requantize")
    )
    tuned = _in_memory(prepared, config, out / "adapter", ids)
    with torch.no_grad():
        old_logits = load_checkpoint(old.path)(ids).logits[0]
    new_mse = float(((got - tuned) ** 2).mean())
    old_mse = float(((old_logits - tuned) ** 2).mean())
    s, o = manifest["scores"], old.manifest["scores"]
    _report(capsys, f"mean squared Δlogit vs the tuned model: grid {new_mse:.3e}, requantize "
                    f"{old_mse:.3e}; loss before {s['before_merge']['loss']:.4f}, grid "
                    f"{s['after_merge']['loss']:.4f}, requantize {o['after_merge']['loss']:.4f}")  # fmt: skip
    assert new_mse < old_mse
    assert package.verify_package(pkg).ok


def test_unmerged_layers_load_as_base_plus_adapter(run, capsys):
    """Layers over the threshold keep the bank's codes + their adapter: the adapter form."""
    out, prepared, config, _ = run
    settings = MergeSettings(threshold=0.0, over_threshold="unmerged")
    result = package.export_package(out, "gptq", out / "unmerged-pkg", merge=settings)
    pkg, manifest = result.path, result.manifest
    assert [layer["action"] for layer in manifest["merge"]["layers"]] == [
        "unmerged", "unmerged", "dense"]  # fmt: skip
    kept = manifest["merge"]["unmerged_modules"]
    assert kept and all(n.startswith(("model.layers.0.", "model.layers.1.")) for n in kept)
    from safetensors.torch import load_file

    written = load_file(str(pkg / WEIGHTS))
    for unit, choice in list(zip(prepared.loaded.units, config, strict=True))[:2]:
        for key, tensor in prepared.bank.packed(unit.index, choice.bits).items():
            assert torch.equal(written[key], tensor), key  # the bank's own codes
    lora = load_file(str(pkg / "adapter" / "adapter_model.safetensors"))
    assert lora and not any(".layers.2." in k for k in lora)  # the dense unit is merged
    model = load_checkpoint(pkg)  # GPTQModel base + PEFT adapter of units 0 and 1
    ids = torch.tensor(manifest["parity"]["input_ids"])
    with torch.no_grad():
        got = model(ids).logits[0]
    want = _in_memory(prepared, config, out / "adapter", ids)
    diff = float((got - want).abs().max())
    _report(capsys, f"package with unmerged layers vs the adapter form: max |Δlogit| {diff:.2e}")
    assert diff <= ADAPTER_ATOL
    assert (
        abs(manifest["scores"]["package"]["score"] - manifest["scores"]["before_merge"]["score"])
        <= 1e-6
    )
    assert package.verify_package(pkg).ok


def test_upbits_merges_at_the_next_width_when_the_budget_allows(run, tmp_path):
    out, prepared, config, _ = run
    settings = MergeSettings(threshold=0.0, over_threshold="upbits")
    # The run's budget (CONFIG's memory + 1 byte) fits nothing bigger: refused, merged at its
    # own width.
    refused = package.export_package(out, "gptq", tmp_path / "refused", merge=settings).manifest
    assert [la["bits_written"] for la in refused["merge"]["layers"]] == [4, 3, 16]
    assert refused["merge"]["flagged"] == ["model.layers.0", "model.layers.1"]
    roomy = tmp_path / "run"
    shutil.copytree(out, roomy, ignore=shutil.ignore_patterns("*pkg*", "export-*"))
    chosen = json.loads((roomy / "chosen.json").read_text())
    chosen["budget_bytes"] = 2**40
    (roomy / "chosen.json").write_text(json.dumps(chosen))
    m = package.export_package(roomy, "gptq", tmp_path / "up", merge=settings).manifest
    layers = m["merge"]["layers"]
    assert [la["action"] for la in layers] == ["merged", "merged_upbits", "dense"]
    assert [la["bits_written"] for la in layers] == [4, 4, 16]  # the bank has no 8: 4 stays
    assert m["merge"]["written_config"].startswith("4/8,4/4,16/8")
    assert set(m["quantization"]["module_bits"][n] for n in m["quantization"]["module_bits"]
               if n.startswith("model.layers.1.")) == {4}  # fmt: skip
    assert layers[1]["lost"] <= refused["merge"]["layers"][1]["lost"]


def test_interrupted_export_leaves_nothing(run, monkeypatch, capsys):
    out, *_ = run
    target = out / "interrupted"

    def boom(*args, **kwargs):
        raise RuntimeError("injected failure after the weights were written")

    # Fails right after the base checkpoint's safetensors are on disk (mid-write).
    monkeypatch.setattr(edgeqra.exporters.gptq, "_copy_side_files", boom)
    code = main(["export", str(out), "--format", "adapter", "--out", str(target)])
    assert code == EXIT_INTERNAL
    assert "injected failure" in capsys.readouterr().err
    assert not target.exists()
    assert not [p.name for p in out.iterdir() if p.name.startswith(".interrupted")]


def test_job_files_take_export_formats():
    from edgeqra.job import from_mapping

    spec = from_mapping({"profile": "t4-16gb", "export": ["gptq", "adapter"]})
    assert spec.export == ("gptq", "adapter")


def test_incomplete_run_dir_names_what_is_missing(run, tmp_path, capsys):
    out, *_ = run
    broken = tmp_path / "broken"
    shutil.copytree(out, broken, ignore=shutil.ignore_patterns("adapter", "chosen.json", "export*"))
    assert main(["export", str(broken), "--format", "gptq"]) == EXIT_INPUT
    err = capsys.readouterr().err
    assert "incomplete" in err and "chosen.json" in err and "adapter" in err
    assert err.count("error") == 1
    assert not (broken / "export-gptq").exists()
    assert main(["export", str(tmp_path / "nope"), "--format", "gptq"]) == EXIT_INPUT
    assert "does not exist" in capsys.readouterr().err
    assert main(["verify", str(tmp_path)]) == EXIT_INPUT
    assert "manifest.json" in capsys.readouterr().err


@pytest.mark.skipif(
    importlib.util.find_spec("edgeqra.exporters.onnx") is None,
    reason="the ONNX writer (exporters/onnx/) is not in this tree",
)
def test_onnx_export_reuses_the_gptq_package_and_matches_it(run, monkeypatch):
    from edgeqra.exporters.onnx import onnx_logits

    out, *_ = run
    gptq = package.default_out(out, "gptq")
    if not (gptq / "manifest.json").is_file():
        package.export_package(out, "gptq")
    gptq_manifest = json.loads((gptq / "manifest.json").read_text())

    def no_merge(*args, **kwargs):
        raise AssertionError("the ONNX export merged again instead of reusing export-gptq")

    with monkeypatch.context() as mp:
        mp.setattr("edgeqra.exporters.merge.merge_units", no_merge)
        result = package.export_package(out, "onnx", out / "onnx-pkg")
    manifest = result.manifest
    assert manifest["reused_gptq"]["path"] == str(gptq.resolve())
    assert manifest["scores"]["after_merge"] == gptq_manifest["scores"]["after_merge"]
    assert manifest["merge"] == gptq_manifest["merge"]
    assert (result.path / "model.onnx").is_file()
    # onnxruntime vs the merged GPTQ checkpoint reloaded by GPTQModel (same merged values;
    # the fp16 embedding table is the only rounding the ONNX graph adds).
    print(f"onnx vs merged GPTQ: max |Δlogit| {manifest['parity']['vs_merged_gptq_max_abs']:.2e}")
    assert manifest["parity"]["vs_merged_gptq_max_abs"] < 1e-2
    info = manifest["onnx"]
    assert info["storage"]["3"]["storage"] == "nbits4" and info["embedding"]["dtype"] == "float16"
    assert (
        info["budget"]["stored_bytes"]
        == sum(r["bytes"] for r in info["storage"].values()) + (info["embedding"]["bytes"])
    )
    ids = torch.tensor(manifest["parity"]["input_ids"])
    assert onnx_logits(result.path, ids.numpy()).shape[:2] == tuple(ids.shape)
    assert package.verify_package(result.path).ok

    # Other merge settings: not reused; merged on the grid inside the ONNX export.
    other = package.export_package(
        out, "onnx", out / "onnx-other", merge=MergeSettings(threshold=0.3),
        onnx={"eight_bit": "float32", "embedding_dtype": "float32"},
    ).manifest  # fmt: skip
    assert "reused_gptq" not in other and len(other["merge"]["layers"]) == len(run[2])
    assert other["onnx"]["embedding"]["dtype"] == "float32"
    assert other["parity"]["vs_merged_gptq_max_abs"] < 1e-3


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gptq_package_loads_with_cuda_kernels_and_generates(run):
    """On a GPU, GPTQModel picks its CUDA kernels (fp16) for the package and generates."""
    from edgeqra.gptq import load_quantized

    out, *_ = run
    result = package.export_package(out, "gptq", out / "gpu-pkg")
    probe = result.manifest["parity"]
    model = load_quantized(result.path, device="cuda", dtype=torch.float16)
    kernels = {type(m).__name__ for m in model.modules() if hasattr(m, "qweight")}
    print(f"GPTQModel kernels on CUDA: {sorted(kernels)}")
    assert kernels
    ids = torch.tensor(probe["input_ids"], device="cuda")
    with torch.no_grad():
        logits = model(ids).logits[0].float().cpu()[:, probe["vocab_ids"]]
        generated = model.generate(ids, max_new_tokens=8, min_new_tokens=8, do_sample=False)
    assert generated.shape[1] == ids.shape[1] + 8
    # fp16 kernels vs the float32 CPU reference: rounding only (logits of scale ~0.5 here).
    assert float((logits - torch.tensor(probe["reference"])).abs().max()) < 5e-2
