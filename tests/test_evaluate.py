"""Scoring: batched MC log-likelihoods vs a slow reference, metric definitions, perplexity."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import tiny_model
from torch import nn

from edgeqra import scoring
from edgeqra.data import MCItem, TaskData, encode_pair, load_task
from edgeqra.errors import DataError
from edgeqra.scoring import Scores, mc_logliks, mc_scores, score_task, text_scores

ATOL = 1e-4  # batched/padded vs one-sequence reference, float32 log-likelihoods in nats


def _model(tokenizer, arch: str = "llama", seed: int = 0) -> nn.Module:
    """A tiny random model whose vocabulary covers the tokenizer."""
    return tiny_model(arch, seed=seed, vocab_size=len(tokenizer))


def _uniform(model: nn.Module) -> nn.Module:
    """Zero the output head: every next-token distribution is uniform over the vocabulary."""
    with torch.no_grad():
        model.lm_head.weight.zero_()
    return model


def _favouring(model: nn.Module, token_ids: list[int], logit: float = 30.0) -> nn.Module:
    """A 'cheating' head: constant logits, `logit` on `token_ids`, 0 elsewhere."""
    head = nn.Linear(model.config.hidden_size, model.config.vocab_size, bias=True)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.zero_()
        head.bias[token_ids] = logit
    model.lm_head = head
    return model


ITEMS = (
    MCItem.shared("Question: what is the answer?\nAnswer:", [" yes", " no", " the a of to in"], 0),
    MCItem.shared("Question: is it?\nAnswer: ", ["yes", "no"], 1),  # trailing context space
    MCItem(("Al beat Bo because Al", "Al beat Bo because Bo"), (" was fast.", " was fast."), 1),
    MCItem.shared("", [" the answer", " no"], 0),  # empty context: scored after EOS
    MCItem.shared("the a of to in " * 6 + "Answer:", [" yes", " no", " in"], 2),
)


def _reference_logliks(model, tokenizer, items, max_length: int | None = None):
    """One unpadded sequence per pair; lm-eval's left cut when `max_length` is given.

    A continuation longer than the window keeps its last tokens (lm-eval would fail there).
    """
    out = []
    for item in items:
        row = []
        for context, choice in zip(item.contexts, item.choices, strict=True):
            ctx, cont = encode_pair(tokenizer, context, choice)
            whole = ctx + cont
            if max_length is not None:
                whole = whole[-(max_length + 1) :]
            inp = torch.tensor([whole[:-1]])
            logp = torch.log_softmax(model(input_ids=inp).logits[0].float(), dim=-1)
            n = min(len(cont), len(whole) - 1)
            targets = whole[len(whole) - n :]
            row.append(sum(float(logp[len(whole) - 1 - n + k, targets[k]]) for k in range(n)))
        out.append(row)
    return out


# ---------------------------------------------------------------- MC vs reference


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3"])
@pytest.mark.parametrize("batch_size", [1, 7])
def test_batched_logliks_match_one_sequence_reference(tokenizer, arch, batch_size) -> None:
    model = _model(tokenizer, arch)
    with torch.no_grad():
        expected = _reference_logliks(model, tokenizer, ITEMS)
    got = mc_logliks(model, tokenizer, ITEMS, batch_size=batch_size)
    assert [len(r) for r in got] == [len(i.choices) for i in ITEMS]
    for g, e in zip(got, expected, strict=True):
        assert g == pytest.approx(e, abs=ATOL)
    # WinoGrande: same continuation, different contexts -> different scores.
    assert got[2][0] != got[2][1]


def test_left_truncation_matches_lm_eval_cut(tokenizer, caplog) -> None:
    model = _model(tokenizer)
    max_length = 8  # items 0 and 4 lose context from the left; " was fast." is 9 tokens
    with torch.no_grad():
        expected = _reference_logliks(model, tokenizer, ITEMS, max_length=max_length)
    got = mc_logliks(model, tokenizer, ITEMS, batch_size=3, max_length=max_length)
    for g, e in zip(got, expected, strict=True):
        assert g == pytest.approx(e, abs=ATOL)
    full = mc_logliks(model, tokenizer, ITEMS[4:])
    assert abs(full[0][0] - got[4][0]) > ATOL  # the cut really changed the context
    assert "2 continuations are longer than `max_length`=8" in caplog.text


def test_model_without_logits_to_keep_gives_same_logliks(tokenizer) -> None:
    class Plain(nn.Module):
        """A wrapper whose forward has no `logits_to_keep` (full logits path)."""

        def __init__(self, inner: nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, input_ids, attention_mask):
            return self.inner(input_ids=input_ids, attention_mask=attention_mask)

    model = _model(tokenizer)
    wrapped = Plain(model)
    assert scoring._accepts_logits_to_keep(model)
    assert not scoring._accepts_logits_to_keep(wrapped)
    a = mc_logliks(model, tokenizer, ITEMS, batch_size=4)
    b = mc_logliks(wrapped, tokenizer, ITEMS, batch_size=4)
    for x, y in zip(a, b, strict=True):
        assert x == pytest.approx(y, abs=ATOL)


def test_scoring_in_row_chunks_gives_the_same_logliks(tokenizer, monkeypatch) -> None:
    """The (targets, vocab) slice is scored in bounded chunks: one row each changes nothing."""
    model = _model(tokenizer)
    whole = mc_logliks(model, tokenizer, ITEMS, batch_size=5)
    monkeypatch.setattr(scoring, "_SCORE_CHUNK", 1)  # one target row per chunk
    chunked = mc_logliks(model, tokenizer, ITEMS, batch_size=5)
    for c, w in zip(chunked, whole, strict=True):
        assert c == pytest.approx(w, abs=1e-6)


def test_bfloat16_model_is_scored_in_float32(tokenizer) -> None:
    model = _model(tokenizer)
    ref = mc_logliks(model, tokenizer, ITEMS)
    got = mc_logliks(model.to(torch.bfloat16), tokenizer, ITEMS)
    for g, r in zip(got, ref, strict=True):
        assert g == pytest.approx(r, abs=0.5)  # bf16 weights/activations; sums stay close


# ---------------------------------------------------------------- metric definitions


def test_scores_are_computed_from_the_logliks(tokenizer) -> None:
    model = _model(tokenizer, seed=3)
    lls = mc_logliks(model, tokenizer, ITEMS)
    s = mc_scores(model, tokenizer, ITEMS, batch_size=2)
    acc = sum(
        max(range(len(ll)), key=ll.__getitem__) == i.gold for ll, i in zip(lls, ITEMS, strict=True)
    )
    normed = [
        [v / len(c.removeprefix(" ")) for v, c in zip(ll, i.choices, strict=True)]
        for ll, i in zip(lls, ITEMS, strict=True)
    ]
    acc_norm = sum(
        max(range(len(nl)), key=nl.__getitem__) == i.gold
        for nl, i in zip(normed, ITEMS, strict=True)
    )
    gold_tokens = [
        len(encode_pair(tokenizer, i.contexts[i.gold], i.choices[i.gold])[1]) for i in ITEMS
    ]
    assert s.n == len(ITEMS) and s.tokens == sum(gold_tokens)
    assert s.accuracy == acc / len(ITEMS) and s.accuracy_norm == acc_norm / len(ITEMS)
    assert s.loss == pytest.approx(
        -sum(ll[i.gold] for ll, i in zip(lls, ITEMS, strict=True)) / s.tokens
    )
    assert s.perplexity == pytest.approx(math.exp(s.loss))


def test_acc_and_acc_norm_disagree_in_closed_form(tokenizer) -> None:
    # Uniform model: loglik = -n_tokens * log V. " q" is 2 tokens / 1 char, " yes yes yes" is
    # 3 tokens / 11 chars: acc prefers the fewer tokens, acc_norm the fewer tokens per char.
    short, long = " q", " yes yes yes"
    assert len(encode_pair(tokenizer, "Q:", short)[1]) == 2
    assert len(encode_pair(tokenizer, "Q:", long)[1]) == 3
    model = _uniform(_model(tokenizer))
    items = [MCItem.shared("Q:", [short, long], 0), MCItem.shared("Q:", [short, long], 1)]
    log_v = math.log(len(tokenizer))
    lls = mc_logliks(model, tokenizer, items)
    assert lls[0] == pytest.approx([-2 * log_v, -3 * log_v], abs=ATOL)
    assert mc_scores(model, tokenizer, items[:1]).accuracy == 1.0
    assert mc_scores(model, tokenizer, items[:1]).accuracy_norm == 0.0
    s = mc_scores(model, tokenizer, items[1:])
    assert (s.accuracy, s.accuracy_norm) == (0.0, 1.0)
    assert s.loss == pytest.approx(log_v, rel=1e-5) and s.tokens == 3


def test_a_model_that_always_says_yes_is_right_exactly_when_gold_is_yes(tokenizer) -> None:
    (yes,) = encode_pair(tokenizer, "Answer:", " yes")[1]
    model = _favouring(_model(tokenizer), [yes])
    says_yes = [
        MCItem.shared(f"Question {k}?\nAnswer:", [" no", " yes", " the a"], 1) for k in range(4)
    ]
    says_no = [
        MCItem.shared(f"Question {k}?\nAnswer:", [" yes", " no", " in"], 1) for k in range(4)
    ]
    right = mc_scores(model, tokenizer, says_yes, batch_size=5)
    wrong = mc_scores(model, tokenizer, says_no, batch_size=5)
    assert (right.accuracy, right.accuracy_norm) == (1.0, 1.0)
    assert (wrong.accuracy, wrong.accuracy_norm) == (0.0, 0.0)
    assert right.loss < 1e-6 < 25 < wrong.loss  # gold prob ~1 vs ~e^-30


# ---------------------------------------------------------------- text


DOCS = (
    "Question: what is the answer?\nAnswer: yes",
    "the a of to in " * 12,
    "no",
)


def test_uniform_model_perplexity_is_the_vocabulary_size(tokenizer) -> None:
    model = _uniform(_model(tokenizer))
    s = text_scores(model, tokenizer, DOCS, seq_len=7, batch_size=3)
    assert s.perplexity == pytest.approx(model.config.vocab_size, rel=1e-3)
    assert (s.accuracy, s.accuracy_norm, s.n) == (None, None, len(DOCS))
    # EOS is prepended (no BOS here), so every document token is predicted exactly once.
    assert s.tokens == sum(len(tokenizer(d)["input_ids"]) for d in DOCS)


def test_text_windows_match_unbatched_reference(tokenizer) -> None:
    model = _model(tokenizer, seed=1)
    seq_len = 7
    nll, count = 0.0, 0
    with torch.no_grad():
        for doc in DOCS:
            ids = [tokenizer.eos_token_id, *tokenizer(doc)["input_ids"]]
            for s in range(0, len(ids) - 1, seq_len):
                w = ids[s : s + seq_len + 1]
                logits = model(input_ids=torch.tensor([w[:-1]])).logits[0].float()
                nll += float(
                    torch.nn.functional.cross_entropy(logits, torch.tensor(w[1:]), reduction="sum")
                )
                count += len(w) - 1
    s = text_scores(model, tokenizer, DOCS, seq_len=seq_len, batch_size=4)
    assert s.tokens == count
    assert s.loss == pytest.approx(nll / count, abs=ATOL)
    # Longer windows see more context but predict the same tokens.
    assert text_scores(model, tokenizer, DOCS, seq_len=256).tokens == count


def test_document_windows_tile_the_targets() -> None:
    ids = list(range(20))
    windows = scoring._document_windows(ids, 6)
    assert [w[1:] for w in windows] == [ids[1:7], ids[7:13], ids[13:19], ids[19:20]]
    assert all(len(w) <= 7 for w in windows)
    assert scoring._document_windows([5], 6) == []


# ---------------------------------------------------------------- determinism and state


def test_determinism_and_training_flags_restored(tokenizer) -> None:
    model = _model(tokenizer)
    model.train()
    model.model.layers[1].eval()  # a mixed state must come back as it was
    flags = {name: m.training for name, m in model.named_modules()}
    a = mc_scores(model, tokenizer, ITEMS, batch_size=3)
    b = mc_scores(model, tokenizer, ITEMS, batch_size=3)
    assert isinstance(a, Scores) and a == b
    t1 = text_scores(model, tokenizer, DOCS, seq_len=16)
    assert t1 == text_scores(model, tokenizer, DOCS, seq_len=16)
    assert {name: m.training for name, m in model.named_modules()} == flags
    assert all(p.grad is None for p in model.parameters())


def test_bad_arguments_raise(tokenizer) -> None:
    model = _model(tokenizer)
    with pytest.raises(DataError, match="no MC items"):
        mc_scores(model, tokenizer, [])
    with pytest.raises(ValueError, match="`batch_size`=0"):
        mc_scores(model, tokenizer, ITEMS, batch_size=0)
    with pytest.raises(ValueError, match="`max_length`=0"):
        mc_scores(model, tokenizer, ITEMS, max_length=0)
    with pytest.raises(DataError, match="empty"):
        text_scores(model, tokenizer, [""])


# ---------------------------------------------------------------- real data


def test_arc_easy_smoke(tokenizer) -> None:
    task = load_task("arc_easy", n_eval=8)
    s = score_task(_model(tokenizer), tokenizer, task, batch_size=8)
    assert s.n == 8 and 0.0 <= s.accuracy <= 1.0 and 0.0 <= s.accuracy_norm <= 1.0
    assert s.tokens > 0 and math.isfinite(s.loss) and s.loss > 0


def test_text_task_dispatch(tokenizer) -> None:
    task = load_task("tiny", n_eval=3)
    s = score_task(_model(tokenizer), tokenizer, task, seq_len=64)
    assert s.n == 3 and s.accuracy is None and math.isfinite(s.perplexity)
    with pytest.raises(DataError, match="kind"):
        score_task(_model(tokenizer), tokenizer, TaskData("x", "other", (), (), ()))  # type: ignore[arg-type]
