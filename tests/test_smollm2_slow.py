"""The same engine checks on the real embedded SmolLM2 (slow: minutes on CPU; `pytest -m slow`)."""

from __future__ import annotations

import pytest
import torch

import edgeqra.gptq
from edgeqra.bank import BankSpec, build_bank
from edgeqra.data import calibration_batches, load_task
from edgeqra.evaluate import EvalSettings, Evaluator
from edgeqra.models import load_model
from edgeqra.space import Config
from edgeqra.tune import TuneSettings

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smol(tmp_path_factory):
    """SmolLM2 (dense cache in a temp dir) and its 4-bit bank from 16 x 128 c4 tokens."""
    cache = tmp_path_factory.mktemp("smolcache")
    mp = pytest.MonkeyPatch()
    mp.setenv("EDGEQRA_CACHE", str(cache))
    loaded = load_model("smollm2")
    calibration = calibration_batches(loaded.tokenizer, "c4", n_samples=16, seq_len=128)
    bank = build_bank(
        loaded.path,
        loaded.units,
        calibration,
        BankSpec(bits=(4,)),
        cache_root=cache / "banks",
        keep_checkpoints=True,
        progress=False,
    )
    yield loaded, bank
    mp.undo()


def test_uniform_4bit_assemble_matches_gptqmodel_on_real_text(smol):
    loaded, bank = smol
    reference = edgeqra.gptq.load_quantized(bank.root / "checkpoint-b4")
    bank.remember_originals(loaded.model)
    bank.assemble(loaded.model, Config.uniform(30, 4, 0))
    ids = loaded.tokenizer(
        "The history of the Roman Empire spans many centuries, and", return_tensors="pt"
    ).input_ids
    with torch.no_grad():
        delta = (loaded.model(ids).logits - reference(ids).logits).abs().max().item()
    assert delta < 1e-3, delta
    kwargs = dict(max_new_tokens=12, do_sample=False, pad_token_id=loaded.tokenizer.eos_token_id)
    assert torch.equal(loaded.model.generate(ids, **kwargs), reference.generate(ids, **kwargs))


def test_evaluate_is_deterministic_on_smollm2(smol):
    loaded, bank = smol
    task = load_task("arc_easy", n_train=32, n_eval=16)
    evaluator = Evaluator(
        loaded,
        task,
        bank,
        TuneSettings(steps=0, batch_size=2),
        EvalSettings(seq_len=128, eval_batch_size=16),
    )
    config = Config.from_pairs([(4, 8)] * 15 + [(16, 4)] * 15)
    first, second = evaluator.evaluate(config, 2), evaluator.evaluate(config, 2)
    assert (first.score, first.loss, first.train_loss) == (
        second.score,
        second.loss,
        second.train_loss,
    )
