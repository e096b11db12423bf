"""`edgeqra prune` (issue 17) on tiny random Llama / Qwen2 / Gemma3: shapes, exactness, reloads.

The tiny models here have 12 query heads in 4 GQA groups (hidden 96, head_dim 8; Gemma3 16),
so a ratio of 0.3 removes one query head per group (3 -> 2, a 33 % cut: heads come in whole
units) and 32 of 128 MLP channels (round_to 32).

Tolerances, stated once:
* pruned vs the original with the removed heads'/channels' o_proj/down_proj columns zeroed:
  removing a head or channel is exactly that ablation, so only float32 summation order can
  differ: max |Δlogit| ≤ 1e-5 (measured 0.0).
* the folder reloaded by transformers vs the in-memory pruned model: the same float32 tensors,
  ≤ 1e-6 (measured 0.0).
* GPTQModel after quantizing the pruned folder vs the pruned dense model holding the
  dequantized weights: same arithmetic as tests/test_gptq.py, ≤ 1e-5.
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_model

from edgeqra.cli import EXIT_INPUT, EXIT_OK, main
from edgeqra.prune import (
    PRUNING_FILE,
    Importance,
    PruneError,
    PruneSettings,
    PruneTarget,
    prune_folder,
    prune_model,
    pruned_config,
    read_record,
    unpruned_config,
)

HEADS = dict(hidden_size=96, num_attention_heads=12, num_key_value_heads=4)
RATIO = 0.3
EXACT = 1e-5


def _model(arch: str, seed: int = 0, **overrides):
    """A tiny model with 12 heads in 4 GQA groups (Gemma3 keeps its head_dim 16)."""
    kwargs = {**HEADS, **({} if arch == "gemma3" else {"head_dim": 8}), **overrides}
    return tiny_model(arch, seed=seed, **kwargs)


def _ids(vocab: int, n: int = 2, seq: int = 12, seed: int = 1) -> torch.Tensor:
    """(n, seq) seeded token ids."""
    return torch.randint(0, vocab, (n, seq), generator=torch.Generator().manual_seed(seed))


def _ablated(model, outcome) -> torch.nn.Module:
    """``model`` with the pruned heads' o_proj columns and channels' down_proj columns zeroed."""
    target = outcome.target
    d = target.head_dim
    heads, inter = target.before[1], target.before[0]
    with torch.no_grad():
        for i, layer in enumerate(model.model.layers):
            name = f"model.layers.{i}"
            for h in sorted(set(range(heads)) - set(outcome.kept_heads[name])):
                layer.self_attn.o_proj.weight[:, h * d : (h + 1) * d] = 0
            gone = sorted(set(range(inter)) - set(outcome.kept_channels[name]))
            layer.mlp.down_proj.weight[:, gone] = 0
    return model


# ----------------------------------------------------------------------------- widths


@pytest.mark.parametrize("ratio", [0.0, 0.2, 0.3, 0.5, 0.7])
def test_target_widths_follow_the_ratio_on_smollm2_shapes(ratio):
    from transformers import LlamaConfig

    # SmolLM2-135M's shapes: hidden 576, 9 heads in 3 GQA groups, intermediate 1536.
    config = LlamaConfig(
        hidden_size=576, intermediate_size=1536, num_attention_heads=9, num_key_value_heads=3
    )
    target = PruneTarget.from_config(config, PruneSettings(ratio=ratio))
    kept = target.intermediate_size / 1536
    assert target.intermediate_size % 32 == 0
    assert abs(kept - (1 - ratio)) <= 16 / 1536  # nearest multiple of 32
    # GQA: every key-value head stays, each keeps round(3 * (1 - ratio)) query heads.
    assert target.num_key_value_heads == 3
    assert target.num_attention_heads == 3 * max(1, round(3 * (1 - ratio) + 1e-9))
    assert target.num_attention_heads % 3 == 0 and target.head_dim == 64
    cfg = pruned_config(config, PruneSettings(ratio=ratio))
    assert (cfg.intermediate_size, cfg.num_attention_heads) == (
        target.intermediate_size,
        target.num_attention_heads,
    )


def test_head_counts_the_config_cannot_hold_are_refused_or_rounded():
    from transformers import LlamaConfig

    # Llama-3-8B: 4096 hidden, 32 heads / 8 KV. LlamaConfig needs hidden % heads == 0, so a
    # ratio's 24 heads become the nearest count it accepts; an explicit 24 is an error.
    config = LlamaConfig(hidden_size=4096, num_attention_heads=32, num_key_value_heads=8)
    target = PruneTarget.from_config(config, PruneSettings(ratio=0.2))
    assert 4096 % target.num_attention_heads == 0 and target.num_attention_heads % 8 == 0
    with pytest.raises(PruneError, match=r"`heads` 24 is rejected by LlamaConfig.*8, 16, 32"):
        PruneTarget.from_config(config, PruneSettings(heads=24))
    with pytest.raises(PruneError, match=r"`heads` 20 is not a multiple of the model's 8"):
        PruneTarget.from_config(config, PruneSettings(heads=20))
    with pytest.raises(PruneError, match=r"`heads` 40 is more than"):
        PruneTarget.from_config(config, PruneSettings(heads=40))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"ratio": 0.71}, r"`ratio` 0.71 is outside \[0, 0.7\]"),
        ({"ratio": -0.1}, r"`ratio` -0.1 is outside"),
        ({"importance": "random"}, r"`importance` 'random' is unknown"),
        ({"layout": "layerwise"}, r"'layerwise' is refused: per-layer widths"),
        ({"calib_samples": 0}, r"`calib_samples` must be a positive integer"),
        ({"heads": 0}, r"`heads` must be a positive integer"),
    ],
)
def test_settings_are_validated(kwargs, match):
    with pytest.raises(PruneError, match=match):
        PruneSettings(**kwargs)


def test_settings_round_trip_json():
    settings = PruneSettings(ratio=0.25, importance="magnitude", heads=6, seed=3)
    assert settings.importance is Importance.MAGNITUDE
    assert PruneSettings.from_json(json.loads(json.dumps(settings.to_json()))) == settings


# ----------------------------------------------------------------------------- in memory


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3"])
def test_pruned_model_is_exactly_the_ablated_original(arch):
    model, reference = _model(arch), _model(arch)
    calibration = _ids(model.config.vocab_size, n=4, seq=16, seed=2)
    outcome = prune_model(model, PruneSettings(ratio=RATIO), calibration)
    t = outcome.target
    assert (t.intermediate_size, t.num_attention_heads, t.num_key_value_heads) == (96, 8, 4)
    d = t.head_dim
    for i, layer in enumerate(model.model.layers):
        attn, mlp = layer.self_attn, layer.mlp
        assert attn.q_proj.weight.shape == (8 * d, 96) and attn.o_proj.weight.shape == (96, 8 * d)
        assert attn.k_proj.weight.shape == (4 * d, 96) == attn.v_proj.weight.shape
        assert mlp.gate_proj.weight.shape == (96, 96) == mlp.up_proj.weight.shape
        assert mlp.down_proj.weight.shape == (96, 96)
        assert attn.num_key_value_groups == 2
        # GQA groups stay consistent: each key-value head keeps two of its three query heads.
        kept = outcome.kept_heads[f"model.layers.{i}"]
        assert [sum(1 for h in kept if h // 3 == g) for g in range(4)] == [2, 2, 2, 2]
    if arch == "qwen2":  # q/k/v biases follow their rows
        assert model.model.layers[0].self_attn.q_proj.bias.shape == (8 * d,)
    assert model.config.num_attention_heads == 8 and model.config.intermediate_size == 96
    assert outcome.params_after < outcome.params_before
    assert outcome.params_after == sum(p.numel() for p in model.parameters())
    ids = _ids(model.config.vocab_size)
    with torch.no_grad():
        got, want = model(ids).logits, _ablated(reference, outcome)(ids).logits
    assert (got - want).abs().max().item() <= EXACT


def test_without_gqa_whole_qkv_heads_go():
    model = _model("llama", num_attention_heads=6, num_key_value_heads=6, head_dim=16)
    reference = _model("llama", num_attention_heads=6, num_key_value_heads=6, head_dim=16)
    outcome = prune_model(model, PruneSettings(ratio=RATIO, importance="magnitude"))
    assert outcome.target.num_attention_heads == outcome.target.num_key_value_heads == 4
    attn = model.model.layers[1].self_attn
    assert attn.k_proj.weight.shape == (64, 96) == attn.v_proj.weight.shape
    ids = _ids(model.config.vocab_size)
    with torch.no_grad():
        got, want = model(ids).logits, _ablated(reference, outcome)(ids).logits
    assert (got - want).abs().max().item() <= EXACT


def test_heads_alone_and_ratio_zero():
    model = _model("qwen2")
    outcome = prune_model(model, PruneSettings(ratio=0.0, heads=4, importance="magnitude"))
    t = outcome.target
    assert (t.num_attention_heads, t.num_key_value_heads, t.intermediate_size) == (4, 4, 128)
    assert all(
        len(h) == 4 and {x // 3 for x in h} == {0, 1, 2, 3} for h in outcome.kept_heads.values()
    )
    unchanged, reference = _model("qwen2"), _model("qwen2")
    outcome = prune_model(unchanged, PruneSettings(ratio=0.0, importance="magnitude"))
    assert outcome.params_after == outcome.params_before and not outcome.target.changes
    ids = _ids(unchanged.config.vocab_size)
    with torch.no_grad():
        assert torch.equal(unchanged(ids).logits, reference(ids).logits)


def test_magnitude_removes_the_weakest_head_and_channels():
    model = _model("llama")
    attn, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
    with torch.no_grad():  # head 4 (group 1) and channels 0..31 carry almost nothing
        attn.q_proj.weight[32:40] *= 1e-3
        attn.o_proj.weight[:, 32:40] *= 1e-3
        mlp.gate_proj.weight[:32] *= 1e-3
        mlp.up_proj.weight[:32] *= 1e-3
        mlp.down_proj.weight[:, :32] *= 1e-3
    outcome = prune_model(model, PruneSettings(ratio=RATIO, importance="magnitude"))
    assert 4 not in outcome.kept_heads["model.layers.0"]
    assert outcome.kept_channels["model.layers.0"] == tuple(range(32, 128))


def test_taylor_importance_is_deterministic_and_uses_the_data():
    runs = []
    for seed in (2, 2, 9):
        model = _model("llama")
        calibration = _ids(model.config.vocab_size, n=4, seq=16, seed=seed)
        runs.append(prune_model(model, PruneSettings(ratio=RATIO), calibration))
    assert runs[0].kept_channels == runs[1].kept_channels
    assert runs[0].kept_heads == runs[1].kept_heads
    assert runs[0].kept_channels != runs[2].kept_channels  # other rows, other gradients
    with pytest.raises(PruneError, match="needs calibration rows"):
        prune_model(_model("llama"), PruneSettings(ratio=RATIO))


def test_a_trace_that_does_not_close_is_an_error(monkeypatch):
    import contextlib

    from edgeqra import depgraph

    # Without the RoPE workaround, Torch-Pruning 1.6.1's DepGraph loops (its issue #527).
    monkeypatch.setattr(depgraph, "traceable", lambda *a, **k: contextlib.nullcontext())
    with pytest.raises(PruneError, match=r"cannot trace `model.layers.0.self_attn`.*#527"):
        prune_model(_model("llama"), PruneSettings(ratio=RATIO, importance="magnitude"))


# ----------------------------------------------------------------------------- folders


@pytest.fixture(scope="module")
def folders(tmp_path_factory, tokenizer):
    """Each architecture saved as a HF folder with the tiny tokenizer."""
    root = tmp_path_factory.mktemp("prune")
    out = {}
    for arch in ("llama", "qwen2", "gemma3"):
        folder = root / arch
        _model(arch, vocab_size=len(tokenizer)).save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        out[arch] = folder
    return out


SMALL = ["--calib-samples", "4", "--calib-seq-len", "32", "--device", "cpu"]


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3"])
def test_cli_folder_reloads_with_transformers_and_equals_the_in_memory_model(
    arch, folders, tmp_path, capsys
):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from edgeqra.data import calibration_batches
    from edgeqra.models import load_model

    out = tmp_path / "pruned"
    argv = ["prune", "--model", str(folders[arch]), "--ratio", str(RATIO), "--out", str(out)]
    assert main([*argv, *SMALL, "--json"]) == EXIT_OK
    printed = json.loads(capsys.readouterr().out)
    for name in ("model.safetensors", "config.json", "tokenizer.json", PRUNING_FILE):
        assert (out / name).is_file(), name
    assert not list(tmp_path.glob(".pruned.tmp-*"))  # the temp folder was renamed away
    record = read_record(out)
    assert printed["parameters"] == record["parameters"]
    assert record["ratio"] == RATIO and record["importance"] == "taylor"
    assert record["calibration"] == {"source": "c4", "rows": 4, "seq_len": 32, "seed": 0}
    assert record["shapes"]["after"]["num_attention_heads"] == 8
    assert record["parameters"]["after"] < record["parameters"]["before"]
    assert unpruned_config(out).num_attention_heads == 12

    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert reloaded.config.intermediate_size == 96
    assert (
        reloaded.model.layers[2].self_attn.q_proj.out_features
        == 8 * record["shapes"]["after"]["head_dim"]
    )
    assert sum(p.numel() for p in reloaded.parameters()) == record["parameters"]["after"]

    # The same pruning in memory (same calibration rows) gives the same weights and logits.
    loaded = load_model(folders[arch])
    rows = calibration_batches(loaded.tokenizer, "c4", n_samples=4, seq_len=32, seed=0)
    prune_model(loaded.model, PruneSettings(ratio=RATIO, calib_samples=4, calib_seq_len=32), rows)
    ids = _ids(reloaded.config.vocab_size)
    with torch.no_grad():
        diff = (reloaded(ids).logits - loaded.model(ids).logits).abs().max().item()
    assert diff <= 1e-6

    # PEFT attaches LoRA to the pruned shapes.
    peft = get_peft_model(reloaded, LoraConfig(r=4, target_modules=["q_proj", "down_proj"]))
    lora_a = peft.base_model.model.model.layers[0].mlp.down_proj.lora_A["default"].weight
    assert lora_a.shape == (4, 96)


def test_gptq_quantizes_and_reloads_the_pruned_folder(folders, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    from edgeqra.gptq import dequantized_weights, load_quantized, quantize_to_checkpoint

    monkeypatch.setenv("GPTQMODEL_CPU_WORKERS", "2")
    pruned = tmp_path / "pruned"
    prune_folder(folders["llama"], pruned, PruneSettings(ratio=RATIO, importance="magnitude"))
    vocab = json.loads((pruned / "config.json").read_text())["vocab_size"]
    calibration = _ids(vocab, n=8, seq=32, seed=4)
    checkpoint = quantize_to_checkpoint(pruned, tmp_path / "q", calibration, bits=4, group_size=32)
    reference = AutoModelForCausalLM.from_pretrained(pruned, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, w_hat in dequantized_weights(checkpoint).items():
            reference.get_submodule(name).weight.copy_(w_hat)
    quantized = load_quantized(checkpoint)
    assert quantized.config.num_attention_heads == 8 and quantized.config.intermediate_size == 96
    ids = calibration[:2]
    with torch.no_grad():
        got, want = quantized(ids).logits, reference(ids).logits
    assert torch.isfinite(got).all()
    assert (got - want).abs().max().item() <= EXACT


def test_cli_bad_input_exits_2_naming_the_value_and_writes_nothing(folders, tmp_path, capsys):
    from transformers import GPT2Config, GPT2LMHeadModel

    out = tmp_path / "never"
    base = ["prune", "--model", str(folders["llama"]), "--out", str(out), *SMALL]
    for extra, needle in (
        (["--ratio", "0.8"], "`ratio` 0.8 is outside [0, 0.7]"),
        (["--heads", "7"], "`heads` 7 is not a multiple of the model's 4 key-value heads"),
        (["--layout", "layerwise"], "'layerwise' is refused"),
    ):
        assert main([*base, *extra]) == EXIT_INPUT
        err = capsys.readouterr().err
        assert needle in " ".join(err.split()), err
    gpt2 = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=300)).save_pretrained(
        gpt2
    )
    assert main(["prune", "--model", str(gpt2), "--out", str(out), *SMALL]) == EXIT_INPUT
    err = " ".join(capsys.readouterr().err.split())
    assert "cannot prune model type `gpt2`" in err and "`intermediate_size`" in err
    assert not out.exists() and not list(tmp_path.glob(".never*"))
    out.mkdir()
    assert main([*base, "--ratio", "0.2"]) == EXIT_INPUT
    assert "already exists" in capsys.readouterr().err


def test_plan_of_a_pruned_folder_shows_the_unpruned_bytes(folders, tmp_path, capsys):
    pruned = tmp_path / "pruned"
    prune_folder(folders["qwen2"], pruned, PruneSettings(ratio=0.5, importance="magnitude"))
    assert main(["plan", "--profile", "t4-16gb", "--model", str(pruned), "--json"]) == EXIT_OK
    plan = json.loads(capsys.readouterr().out)
    unpruned = plan["unpruned"]["totals"]
    for row in plan["rows"]:
        assert row["total"] < unpruned[row["label"]], row["label"]
    assert main(["plan", "--profile", "t4-16gb", "--model", str(folders["qwen2"]), "--json"]) == 0
    original = json.loads(capsys.readouterr().out)
    assert "unpruned" not in original
    assert {r["label"]: r["total"] for r in original["rows"]} == {
        label: unpruned[label] for label in (r["label"] for r in original["rows"])
    }


# ----------------------------------------------------------------------------- end to end


def test_job_file_prune_then_search_export_verify(folders, tmp_path, monkeypatch, capsys):
    """prune → plan → bank → search → final tuning → gptq export → verify, from one job file."""
    from safetensors import safe_open

    monkeypatch.setenv("EDGEQRA_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("GPTQMODEL_CPU_WORKERS", "2")
    run = tmp_path / "run"
    job = tmp_path / "job.toml"
    job.write_text(
        f'profile = "t4-16gb"\nmodel = "{folders["llama"]}"\ntask = "arc_easy"\n'
        f'out = "{run}"\ndevice = "cpu"\nexport = ["gptq"]\n'
        "[space]\nbits = [4, 8]\nranks = [0, 4]\n"
        "[data]\nn_train = 8\nn_eval = 4\nseq_len = 64\ncalib_samples = 4\ngroup_size = 32\n"
        "[tuning]\nsteps = 2\n"
        "[search]\nevals = 4\npopulation = 2\nchildren = 2\ngenerations = 1\nrungs = 1\n"
        "sensitivity = false\nbayes = false\nbaselines = false\nbaseline_rank = 4\n"
        '[prune]\nratio = 0.3\nimportance = "magnitude"\n'
        "[merge]\nhessian_rows = 6\n"  # the run's 4 calibration rows + 2 fresh windows
    )
    assert main(["run", str(job), "--json"]) == EXIT_OK
    summary = json.loads(capsys.readouterr().out)
    pruned = run / "pruned"
    record = read_record(pruned)
    assert record["ratio"] == 0.3 and record["source"] == str(folders["llama"])
    # Every later stage saw the pruned folder as the model.
    recorded = json.loads((run / "job.json").read_text())
    assert recorded["eval"]["model"] == str(pruned.resolve())
    assert summary["chosen"]["fits"] and summary["exports"] == {"gptq": "export-gptq"}
    package = run / "export-gptq"
    config = json.loads((package / "config.json").read_text())
    assert (config["intermediate_size"], config["num_attention_heads"]) == (96, 8)
    with safe_open(str(next(package.glob("*.safetensors"))), "pt") as f:
        scales = f.get_slice("model.layers.0.mlp.down_proj.scales").get_shape()
    assert scales[0] == 96 // 32  # groups over the pruned 96 input channels
    manifest = json.loads((package / "manifest.json").read_text())
    assert manifest["merge"]["settings"]["hessian_rows"] == 6  # the job's [merge] table
    assert manifest["merge"]["hessian_rows"][0] == 6
    assert main(["verify", str(package)]) == EXIT_OK
    capsys.readouterr()
    # Resuming the job reuses the pruned folder and the journal: nothing new to evaluate.
    assert main(["run", str(job), "--resume", "--json"]) == EXIT_OK
    captured = capsys.readouterr()
    assert json.loads(captured.out)["search"]["fresh_evaluations"] == 0
    assert "different job" not in captured.err


def test_layerwise_is_refused_because_transformers_cannot_build_per_layer_widths():
    """The README's reason, checked: a per-layer intermediate_size does not build a Llama."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=64, per_layer_config={1: {"intermediate_size": 64}},
    )  # fmt: skip
    with pytest.raises(RuntimeError, match="per-layer attribute"):
        LlamaForCausalLM(config)
    with pytest.raises(PruneError, match="per_layer_config"):
        PruneSettings(layout="layerwise")


def test_tui_prune_ratio_field_plans_the_pruned_model_and_saves_the_table(folders, tmp_path):
    import asyncio

    from edgeqra.tui.app import EdgeQRAApp, PlanScreen

    from edgeqra.job import load_job

    saved = tmp_path / "job.toml"
    draft = {"model": str(folders["llama"]), "out": str(tmp_path / "run"), "device": "cpu"}

    async def wait(pilot, condition) -> None:
        for _ in range(1200):
            if condition():
                return
            await pilot.pause(0.05)
        raise AssertionError("the TUI did not get there in time")

    async def drive() -> None:
        app = EdgeQRAApp(draft, job_path=saved)
        async with app.run_test(size=(80, 24)) as pilot:
            app.choose_profile("t4-16gb")
            await wait(pilot, lambda: isinstance(app.screen, PlanScreen))
            await wait(pilot, lambda: bool(app.screen.query("#verdict")))
            verdict = app.screen.query_one("#verdict")
            await wait(pilot, lambda: "budget" in str(verdict.render()))
            assert "unpruned" not in str(verdict.render())
            app.screen.query_one("#prune").value = "0.3"
            app.screen.plan()
            await wait(pilot, lambda: "unpruned" in str(verdict.render()))
            assert app.draft["prune"] == {"ratio": 0.3}
            await pilot.press("ctrl+s")
            await wait(pilot, saved.is_file)

    asyncio.run(drive())
    assert load_job(saved).prune == PruneSettings(ratio=0.3)


def test_search_takes_a_pruned_folder_as_any_model(folders, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("EDGEQRA_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("GPTQMODEL_CPU_WORKERS", "2")
    pruned = tmp_path / "pruned"
    prune_folder(folders["gemma3"], pruned, PruneSettings(ratio=RATIO, importance="magnitude"))
    argv = ["search", "--model", str(pruned), "--profile", "t4-16gb", "--bits", "4,8",
            "--ranks", "0,4", "--baseline-rank", "4", "--steps", "2", "--evals", "3",
            "--population", "2", "--children", "2", "--generations", "1", "--rungs", "1",
            "--no-sensitivity", "--no-bayes", "--no-baselines", "--n-train", "8",
            "--n-eval", "4", "--seq-len", "64", "--calib-samples", "4", "--group-size", "32",
            "--device", "cpu", "--out", str(tmp_path / "run"), "--json"]  # fmt: skip
    assert main(argv) == EXIT_OK
    summary = json.loads(capsys.readouterr().out)
    assert summary["model"] == str(pruned) and summary["chosen"]["fits"]
    chosen = json.loads((tmp_path / "run" / "chosen.json").read_text())
    # The search's memory model read the pruned shapes: the chosen config's predicted bytes
    # are those of the pruned model, below the same config on the original.
    from transformers import AutoConfig

    from edgeqra.memory import ModelSpec, estimate_for_profile
    from edgeqra.profiles import load_profile
    from edgeqra.space import Config

    config, profile = Config.parse(chosen["spec"]), load_profile("t4-16gb")
    after = ModelSpec.from_config(AutoConfig.from_pretrained(pruned))
    before = ModelSpec.from_config(AutoConfig.from_pretrained(folders["gemma3"]))
    predicted = chosen["predicted_memory"]["total"]
    assert predicted == estimate_for_profile(after, config, profile, group_size=32).total
    assert predicted < estimate_for_profile(before, config, profile, group_size=32).total
