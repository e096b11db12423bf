"""The fast tuning engine against the eager PEFT reference: same init, same losses, same scores.

On CPU the engine runs its padded-rank step eagerly (the CUDA graph is the only thing it
adds on a GPU); the GPU tests check the captured step against the eager one and that one
capture serves several configs.
"""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import tiny_model

from edgeqra.data import MCItem
from edgeqra.engine import EngineSettings, GraphLoRA, peft_lora_init
from edgeqra.errors import ConfigError
from edgeqra.models import find_units
from edgeqra.scoring import _mc_requests, _pad_id, mc_logliks, mc_scores
from edgeqra.space import Config
from edgeqra.tune import TARGETS, TrainBatches, TuneSettings, attach_lora, detach_lora, tune

VOCAB = 256  # conftest.TINY

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models gain nothing from threads; spinning OpenMP threads slow shared cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _batches(n: int = 12, seq: int = 32, seed: int = 0) -> TrainBatches:
    """Right-padded random rows of varied length: a prompt, a labelled completion, padding."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (n, seq), generator=g)  # (n, seq)
    labels = torch.full_like(ids, -100)
    mask = torch.zeros_like(ids)
    for row in range(n):
        length = int(torch.randint(10, seq - 6, (1,), generator=g))  # real tokens
        labels[row, 4:length] = ids[row, 4:length]
        mask[row, :length] = 1
        ids[row, length:] = 0  # the pad id
    return TrainBatches(ids, labels, mask)


CONFIGS = [
    Config.from_pairs([(4, 8), (4, 0), (4, 16)]),
    Config.from_pairs([(4, 4), (4, 4), (4, 32)]),
]


def test_lora_init_replays_peft_draws_exactly():
    model = tiny_model()
    units = find_units(model)
    config = Config.from_pairs([(4, 4), (4, 0), (4, 16)])
    linears = [
        (lin.name, lin.d_in, lin.d_out)
        for unit in units
        for lin in unit.linears
        if lin.name.rsplit(".", 1)[-1] in TARGETS
    ]
    ranks = {lin.name: config[u.index].rank for u in units for lin in u.linears}
    ours = peft_lora_init(linears, ranks, seed=7)
    peft_model = attach_lora(model, units, config, TuneSettings(steps=0, seed=7))
    base = peft_model.get_base_model()
    theirs = {
        name: base.get_submodule(name).lora_A["default"].weight.detach()
        for name, _, _ in linears
        if ranks[name]
    }
    assert ours.keys() == theirs.keys()
    for name, a in theirs.items():
        assert torch.equal(ours[name], a), name


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: c.short())
def test_padded_engine_follows_the_eager_reference(config):
    """Same losses step by step (fp32, CPU: 1e-5 relative) and the same trained outputs."""
    settings = TuneSettings(steps=6, lr=5e-3, batch_size=3, seed=2, warmup_steps=2)
    batches = _batches()
    reference_model = tiny_model()
    tuned, ref_log = tune(reference_model, find_units(reference_model), config, batches, settings)

    model = tiny_model()
    engine = GraphLoRA(model, find_units(model), settings.alpha_ratio, EngineSettings(max_rank=32))
    log_ = engine.train(config, batches, settings)
    assert len(log_.losses) == settings.steps
    assert log_.trainable_params == ref_log.trainable_params
    torch.testing.assert_close(
        torch.tensor(log_.losses), torch.tensor(ref_log.losses), rtol=1e-5, atol=1e-6
    )
    probe = batches.input_ids[:2, :20]
    with torch.no_grad():
        torch.testing.assert_close(
            engine.model(input_ids=probe).logits,
            tuned(input_ids=probe).logits,
            rtol=1e-4,
            atol=1e-5,
        )


def test_one_engine_serves_many_configs_and_repeats_itself():
    """Reuse: config A, then B, then A again gives A's losses bit for bit (seeded, reset)."""
    settings = TuneSettings(steps=4, lr=5e-3, batch_size=4, seed=1)
    batches = _batches()
    model = tiny_model()
    engine = GraphLoRA(model, find_units(model), settings.alpha_ratio)
    first = engine.train(CONFIGS[0], batches, settings).losses
    other = engine.train(CONFIGS[1], batches, settings).losses
    again = engine.train(CONFIGS[0], batches, settings).losses
    assert first == again
    assert first != other
    # the padding stayed exactly zero: rank-0 unit 1 has all-zero adapters, unit 0 uses 8 rows
    base = engine.model.get_base_model()
    q0 = base.get_submodule("model.layers.0.self_attn.q_proj")
    assert torch.count_nonzero(q0.lora_A["default"].weight[8:]) == 0
    assert torch.count_nonzero(q0.lora_B["default"].weight[:, 8:]) == 0
    q1 = base.get_submodule("model.layers.1.self_attn.q_proj")
    assert torch.count_nonzero(q1.lora_A["default"].weight) == 0
    assert torch.count_nonzero(q1.lora_B["default"].weight) == 0


def test_saved_adapter_has_the_config_ranks_and_the_engine_outputs(tmp_path):
    from peft import PeftModel

    settings = TuneSettings(steps=3, lr=5e-3, batch_size=4, seed=0)
    batches = _batches()
    model = tiny_model()
    fresh = copy.deepcopy(model)
    engine = GraphLoRA(model, find_units(model), settings.alpha_ratio)
    engine.train(CONFIGS[0], batches, settings)
    engine.save_adapter(CONFIGS[0], settings, tmp_path / "adapter")
    loaded = PeftModel.from_pretrained(fresh, str(tmp_path / "adapter")).eval()
    lora_a = loaded.get_base_model().get_submodule("model.layers.2.mlp.down_proj").lora_A
    assert lora_a["default"].weight.shape[0] == 16
    assert not hasattr(
        loaded.get_base_model().get_submodule("model.layers.1.mlp.up_proj"), "lora_A"
    )
    probe = batches.input_ids[:2, :20]
    with torch.no_grad():
        torch.testing.assert_close(
            loaded(input_ids=probe).logits, engine.model(input_ids=probe).logits, rtol=0, atol=1e-5
        )


def test_close_gives_the_bare_model_back():
    model = tiny_model()
    probe = torch.arange(16)[None]
    with torch.no_grad():
        before = model(input_ids=probe).logits
    engine = GraphLoRA(model, find_units(model), 2.0)
    engine.train(CONFIGS[0], _batches(), TuneSettings(steps=2, lr=1e-2))
    base = engine.close()
    with torch.no_grad():
        assert torch.equal(base(input_ids=probe).logits, before)


def test_rank_above_the_padding_and_dropout_are_refused():
    model = tiny_model()
    engine = GraphLoRA(model, find_units(model), 2.0, EngineSettings(max_rank=8))
    with pytest.raises(ConfigError, match="max_rank"):
        engine.train(CONFIGS[0], _batches(), TuneSettings(steps=1))
    with pytest.raises(ConfigError, match="dropout"):
        engine.train(CONFIGS[1], _batches(), TuneSettings(steps=1, dropout=0.1))
    with pytest.raises(ConfigError, match="check_every"):
        EngineSettings(check_every=0)


# ---------------------------------------------------------------- batched scoring


def _reference_logliks(model, tokenizer, items):
    """One request at a time, no padding, log_softmax over the whole vocabulary: the oracle."""
    requests = _mc_requests(model, tokenizer, items, None)
    out = []
    with torch.no_grad():
        for r in requests:
            if not r.n:
                out.append(0.0)
                continue
            logits = model(input_ids=torch.tensor([r.tokens])).logits[0]  # (len, vocab)
            logp = torch.log_softmax(logits[-r.n :].float(), dim=-1)  # (n, vocab)
            out.append(float(logp.gather(-1, torch.tensor(r.targets)[:, None]).sum()))
    return out


@pytest.mark.parametrize("batch_size", [1, 5, 64])
def test_batched_scoring_equals_the_one_by_one_oracle(tokenizer, batch_size):
    model = tiny_model("llama", vocab_size=len(tokenizer))
    items = [
        MCItem(
            contexts=(f"Question: what is {k}?\nAnswer:",) * 3,
            choices=(" yes", " no the a", " of to in the answer"),
            gold=k % 3,
        )
        for k in range(7)
    ]
    flat = [v for row in mc_logliks(model, tokenizer, items, batch_size=batch_size) for v in row]
    torch.testing.assert_close(
        torch.tensor(flat),
        torch.tensor(_reference_logliks(model, tokenizer, items)),
        rtol=0,
        atol=1e-4,
    )
    assert _pad_id(tokenizer) is not None
    scores = mc_scores(model, tokenizer, items, batch_size=batch_size)
    assert scores.n == 7


# ---------------------------------------------------------------- GPU: the captured step


def _cuda_model():
    return tiny_model().to("cuda", torch.bfloat16)


@cuda
@pytest.mark.gpu
def test_captured_step_equals_the_eager_padded_step_and_is_reused():
    settings = TuneSettings(steps=8, lr=5e-3, batch_size=4, seed=0, warmup_steps=2)
    batches = _batches()
    eager_model = _cuda_model()
    eager = GraphLoRA(eager_model, find_units(eager_model), 2.0, EngineSettings(graphs=False))
    graph_model = _cuda_model()
    graph = GraphLoRA(graph_model, find_units(graph_model), 2.0)
    for config in CONFIGS:
        want = eager.train(config, batches, settings).losses
        got = graph.train(config, batches, settings).losses
        torch.testing.assert_close(torch.tensor(got), torch.tensor(want), rtol=2e-2, atol=2e-2)
    captured = graph.capture_seconds
    again = graph.train(CONFIGS[0], batches, settings).losses
    assert graph.capture_seconds == captured  # no new capture for a known shape
    assert again == graph.train(CONFIGS[0], batches, settings).losses  # deterministic replay


@cuda
@pytest.mark.gpu
def test_captured_step_follows_the_peft_reference_on_gpu():
    settings = TuneSettings(steps=8, lr=5e-3, batch_size=4, seed=0)
    batches = _batches()
    ref_model = _cuda_model()
    _, ref_log = tune(ref_model, find_units(ref_model), CONFIGS[0], batches, settings)
    detach_lora(ref_model)
    model = _cuda_model()
    graph = GraphLoRA(model, find_units(model), 2.0)
    got = graph.train(CONFIGS[0], batches, settings).losses
    torch.testing.assert_close(
        torch.tensor(got), torch.tensor(ref_log.losses), rtol=2e-2, atol=2e-2
    )


@pytest.mark.slow
def test_compiled_step_is_deterministic_and_follows_the_uncompiled_one():
    """torch.compile on/off: the same seed gives the same losses twice, and both agree."""
    settings = TuneSettings(steps=4, lr=5e-3, batch_size=3, seed=4)
    batches = _batches()
    runs = {}
    for name, compiled in (("off", False), ("on", True), ("on again", True)):
        model = tiny_model()
        engine = GraphLoRA(model, find_units(model), 2.0, EngineSettings(compile=compiled))
        runs[name] = engine.train(CONFIGS[0], batches, settings).losses
    assert runs["on"] == runs["on again"]
    torch.testing.assert_close(
        torch.tensor(runs["on"]), torch.tensor(runs["off"]), rtol=1e-4, atol=1e-5
    )
