"""Score a model on a task's held-out split: multiple-choice accuracy (the lm-eval way) or perplexity.

Step 3 of "Evaluation of one candidate" (METHOD.md); :mod:`edgeqra.evaluate` runs the whole
candidate (attach, tune, score). The scoring functions are pure: they
take a model and a tokenizer, run it in eval mode without gradients and give the previous
train/eval flags back.

* Multiple choice (``mc_scores``): every (context_i, choice_i) pair of an item is split into
  tokens by :func:`edgeqra.data.encode_pair` (the split tuning trains on) and scored as
  log p(choice tokens | context tokens), summed. ``accuracy`` is lm-eval's ``acc`` (argmax of
  the sums), ``accuracy_norm`` its ``acc_norm`` (argmax of sum / character length of the
  choice, without the leading space lm-eval adds as ``target_delimiter``; lm-eval's
  ``completion_len = len(choice)`` in ``ConfigurableTask.process_results``). Pairs longer than
  ``max_length`` lose context tokens from the left, as lm-eval's ``_loglikelihood_tokens``
  does. ``loss`` is the mean NLL per token of the gold continuations.
* Text (``text_scores``): each held-out document is scored on its own, in windows whose
  targets never overlap and cover every token (lm-eval's ``loglikelihood_rolling`` with one
  context token); ``loss`` is the token-weighted mean NLL, ``perplexity`` its exp.
"""

from __future__ import annotations

import inspect
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from edgeqra.data import MCItem, TaskData, encode_pair, prefix_token
from edgeqra.device import eval_mode, model_device
from edgeqra.errors import DataError

__all__ = ["Scores", "mc_logliks", "mc_scores", "score_task", "text_scores"]

log = logging.getLogger(__name__)

_FALLBACK_MAX_LENGTH = 2048  # lm-eval's HFLM default when neither model nor tokenizer says
_TOKENIZER_NO_LIMIT = 10**9  # HF sets model_max_length to ~1e30 when a tokenizer has no limit
_SCORE_CHUNK = 2**26  # fp32 elements of one (targets, vocab) slice: 256 MiB


@dataclass(frozen=True)
class Scores:
    """What one held-out evaluation measured (higher accuracy / lower loss is better)."""

    loss: float  # mean NLL per target token (MC: gold continuations; text: every token)
    perplexity: float  # exp(loss)
    accuracy: float | None  # MC: lm-eval "acc"; None for text
    accuracy_norm: float | None  # MC: lm-eval "acc_norm"; None for text
    n: int  # items (MC) or documents (text) scored
    tokens: int  # target tokens counted in `loss`


# ---------------------------------------------------------------- model plumbing


def _accepts_logits_to_keep(model: nn.Module) -> bool:
    """Whether the (PEFT-unwrapped) model's forward takes HF's ``logits_to_keep``."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    try:
        return "logits_to_keep" in inspect.signature(base.forward).parameters
    except (TypeError, ValueError):
        return False


def _logits(
    model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, keep: int | None
) -> torch.Tensor:
    """Logits of the last `keep` positions (all when None or unsupported), shape (B, K, V)."""
    kwargs: dict[str, Any] = {"input_ids": input_ids, "attention_mask": attention_mask}
    if keep is not None and _accepts_logits_to_keep(model):
        kwargs["logits_to_keep"] = keep
    logits = model(**kwargs).logits  # (batch, keep or seq, vocab)
    if keep is not None:
        logits = logits[:, -keep:]  # a no-op when the model already cut them
    return logits


def _pad_id(tokenizer: Any) -> int:
    """Any valid id for padding (padded positions are masked and never scored)."""
    for pad in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if pad is not None:
            return int(pad)
    return 0


def _default_max_length(model: nn.Module, tokenizer: Any) -> int:
    """The model's max positions, capped by the tokenizer's limit (lm-eval's HFLM.max_length)."""
    limits = []
    config = getattr(model, "config", None)
    for attr in ("max_position_embeddings", "n_positions", "n_ctx"):
        value = getattr(config, attr, None)
        if isinstance(value, int) and value > 0:
            limits.append(value)
            break
    model_max = getattr(tokenizer, "model_max_length", None)
    if isinstance(model_max, int) and 0 < model_max < _TOKENIZER_NO_LIMIT:
        limits.append(model_max)
    return min(limits) if limits else _FALLBACK_MAX_LENGTH


def _right_pad(rows: Sequence[Sequence[int]], pad: int, device: torch.device):
    """(input_ids, attention_mask) LongTensors (len(rows), max len), right-padded."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)  # (batch, width)
    mask = torch.zeros((len(rows), width), dtype=torch.long)  # (batch, width)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        mask[i, : len(row)] = 1
    return ids.to(device), mask.to(device)


def _check_batch_size(batch_size: int | None) -> None:
    """Reject a batch size that is not a positive integer (None = by device)."""
    if batch_size is None:
        return
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"`batch_size`={batch_size!r} must be a positive integer or None")


def _batch_size(batch_size: int | None, device: torch.device, *, gpu: int, cpu: int) -> int:
    """Sequences per forward: as given, else by device (a GPU is launch-bound at small batches)."""
    if batch_size is not None:
        return batch_size
    return gpu if device.type == "cuda" else cpu


# ---------------------------------------------------------------- multiple choice


@dataclass(frozen=True)
class _Request:
    """One (context, continuation) pair as model input: `n` scored tokens end `tokens`."""

    tokens: tuple[int, ...]  # model input (context + continuation minus its last token)
    targets: tuple[int, ...]  # the continuation tokens scored, predicted by the last `n` inputs

    @property
    def n(self) -> int:
        """Number of scored tokens."""
        return len(self.targets)


def _request(ctx: list[int], cont: list[int], max_length: int) -> _Request:
    """lm-eval's cut: keep the last max_length + 1 tokens, feed all but the last."""
    whole = (ctx + cont)[-(max_length + 1) :]
    n = min(len(cont), len(whole) - 1)
    return _Request(tuple(whole[:-1]), tuple(whole[len(whole) - n :]) if n else ())


def _target_logprobs(
    logits: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, targets: torch.Tensor
) -> torch.Tensor:
    """log p(targets[t]) at logits[rows[t], cols[t]] in fp32, shape (T,).

    The fp32 (T, vocab) slice is the scorer's largest tensor, and ``logsumexp`` makes as much
    again: PIQA's longest batch of 256 pairs has 22.6k targets, 4.2 GiB each with SmolLM2's 49k
    vocabulary, which put eight benchmark searches sharing one H200 out of memory (issue 20).
    Row chunks of at most ``_SCORE_CHUNK`` elements bound it; every row's value is computed
    the same way.
    """
    step = max(1, _SCORE_CHUNK // logits.shape[-1])
    out = []
    for at in range(0, len(targets), step):
        r, c, t = rows[at : at + step], cols[at : at + step], targets[at : at + step]
        picked = logits[r, c].float()  # (chunk, vocab)
        out.append(picked.gather(-1, t[:, None]).squeeze(-1) - picked.logsumexp(-1))
    return torch.cat(out)


def _score_requests(
    model: nn.Module, requests: Sequence[_Request], pad: int, batch_size: int
) -> list[float]:
    """Summed log p(targets | inputs) per request, in the order given.

    Longest first (lm-eval's order: an out-of-memory shows on the first batch), right-padded,
    one forward per batch; the log-probabilities of every target of the batch are gathered
    at once (logit − logsumexp at the target positions only) and summed per request on the
    device, so a batch costs one host sync instead of one per request.
    """
    device = model_device(model)
    order = sorted(range(len(requests)), key=lambda i: (-len(requests[i].tokens), i))
    out = [0.0] * len(requests)
    for start in range(0, len(order), batch_size):
        idx = [i for i in order[start : start + batch_size] if requests[i].n]
        if not idx:
            continue
        rows = [requests[i] for i in idx]
        ids, mask = _right_pad([r.tokens for r in rows], pad, device)  # (batch, width)
        width = ids.shape[1]
        # Row r's targets are predicted at positions [len - n, len); keep only what any row needs.
        first = min(len(r.tokens) - r.n for r in rows)
        logits = _logits(model, ids, mask, keep=width - first)  # (batch, width - first, vocab)
        row_of, col_of, targets = [], [], []
        for j, r in enumerate(rows):
            end = len(r.tokens) - first
            row_of.extend([j] * r.n)
            col_of.extend(range(end - r.n, end))
            targets.extend(r.targets)
        row_t = torch.tensor(row_of, dtype=torch.long, device=device)  # (T,)
        col_t = torch.tensor(col_of, dtype=torch.long, device=device)  # (T,)
        target_t = torch.tensor(targets, dtype=torch.long, device=device)  # (T,)
        logp = _target_logprobs(logits, row_t, col_t, target_t)  # (T,)
        sums = torch.zeros(len(rows), dtype=logp.dtype, device=device)  # (batch,)
        sums.index_add_(0, row_t, logp)
        for i, value in zip(idx, sums.tolist(), strict=True):
            out[i] = value
    return out


def _mc_requests(
    model: nn.Module, tokenizer: Any, items: Sequence[MCItem], max_length: int | None
) -> list[_Request]:
    """One request per (item, choice), flattened in item order."""
    if max_length is None:
        max_length = _default_max_length(model, tokenizer)
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1:
        raise ValueError(f"`max_length`={max_length!r} must be a positive integer or None")
    requests, cut = [], 0
    for item in items:
        for context, choice in zip(item.contexts, item.choices, strict=True):
            ctx, cont = encode_pair(tokenizer, context, choice)
            req = _request(ctx, cont, max_length)
            cut += req.n < len(cont)
            requests.append(req)
    if cut:
        log.warning(
            "%d continuations are longer than `max_length`=%d; only their last tokens count",
            cut,
            max_length,
        )
    return requests


@torch.no_grad()
def mc_logliks(
    model: nn.Module,
    tokenizer: Any,
    items: Sequence[MCItem],
    *,
    batch_size: int | None = None,
    max_length: int | None = None,
) -> list[list[float]]:
    """Summed log-likelihood of each choice given its context, per item.

    Args:
        model: a causal LM (any device / dtype); its train/eval flags are restored.
        tokenizer: the model's tokenizer (split by :func:`edgeqra.data.encode_pair`).
        items: the MC items.
        batch_size: pairs per forward pass (None: 256 on a GPU, 16 on a CPU).
        max_length: longest model input; longer pairs lose context from the left
            (default: the model's max positions, capped by the tokenizer's limit).

    Returns:
        ``lls[k][c]`` = log p(items[k].choices[c] | items[k].contexts[c]), in nats.
    """
    return _mc_logliks_and_lengths(model, tokenizer, items, batch_size, max_length)[0]


def _mc_logliks_and_lengths(
    model: nn.Module,
    tokenizer: Any,
    items: Sequence[MCItem],
    batch_size: int | None,
    max_length: int | None,
) -> tuple[list[list[float]], list[list[int]]]:
    """(log-likelihoods, scored token counts), both nested per item and choice."""
    _check_batch_size(batch_size)
    requests = _mc_requests(model, tokenizer, items, max_length)
    with eval_mode(model):
        size = _batch_size(batch_size, model_device(model), gpu=256, cpu=16)
        flat = _score_requests(model, requests, _pad_id(tokenizer), size)
    lls, lens, at = [], [], 0
    for item in items:
        k = len(item.choices)
        lls.append(flat[at : at + k])
        lens.append([r.n for r in requests[at : at + k]])
        at += k
    return lls, lens


def _argmax(values: Sequence[float]) -> int:
    """Index of the largest value, the first on ties (numpy's argmax, as lm-eval uses)."""
    return max(range(len(values)), key=lambda i: (values[i], -i))


def _choice_length(choice: str) -> int:
    """lm-eval's acc_norm denominator: characters of the choice without the leading space."""
    return max(1, len(choice.removeprefix(" ")))


@torch.no_grad()
def mc_scores(
    model: nn.Module,
    tokenizer: Any,
    items: Sequence[MCItem],
    *,
    batch_size: int | None = None,
    max_length: int | None = None,
) -> Scores:
    """Accuracy (acc, acc_norm) and gold-continuation loss of `model` on MC items.

    Args: as :func:`mc_logliks`.
    """
    if not items:
        raise DataError("no MC items to score; pass `n_eval` >= 1 or a task with validation")
    lls, lens = _mc_logliks_and_lengths(model, tokenizer, items, batch_size, max_length)
    correct = correct_norm = 0
    nll = 0.0
    tokens = 0
    for item, ll, n in zip(items, lls, lens, strict=True):
        correct += _argmax(ll) == item.gold
        normed = [v / _choice_length(c) for v, c in zip(ll, item.choices, strict=True)]
        correct_norm += _argmax(normed) == item.gold
        nll -= ll[item.gold]
        tokens += n[item.gold]
    loss = nll / tokens if tokens else float("nan")
    return Scores(
        loss=loss,
        perplexity=math.exp(loss) if tokens else float("nan"),
        accuracy=correct / len(items),
        accuracy_norm=correct_norm / len(items),
        n=len(items),
        tokens=tokens,
    )


# ---------------------------------------------------------------- text


def _document_windows(ids: Sequence[int], seq_len: int) -> list[list[int]]:
    """Windows of at most `seq_len` inputs whose targets (inputs shifted by one) tile ids[1:].

    Consecutive windows share one token: the last target of one is the first input of the
    next, so every token after the first is predicted exactly once.
    """
    return [list(ids[s : s + seq_len + 1]) for s in range(0, len(ids) - 1, seq_len)]


def _document_ids(tokenizer: Any, text: str) -> list[int]:
    """A document's ids as the tokenizer adds specials, starting with the BOS/EOS prefix.

    With no BOS added, lm-eval's prefix token (BOS, else EOS) is prepended so the first real
    token is predicted too.
    """
    ids = list(tokenizer(text)["input_ids"])
    prefix = prefix_token(tokenizer)
    if prefix is not None and (not ids or ids[0] != prefix):
        ids.insert(0, prefix)
    return ids


@torch.no_grad()
def text_scores(
    model: nn.Module,
    tokenizer: Any,
    texts: Sequence[str],
    *,
    seq_len: int = 256,
    batch_size: int | None = None,
) -> Scores:
    """Token-weighted mean NLL (and perplexity) of held-out documents.

    Args:
        model: a causal LM (any device / dtype); its train/eval flags are restored.
        tokenizer: the model's tokenizer.
        texts: the documents; each is scored on its own (no context from another).
        seq_len: tokens predicted per window (the model sees seq_len of them as input).
        batch_size: windows per forward pass (None: 32 on a GPU, 8 on a CPU).
    """
    _check_batch_size(batch_size)
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1:
        raise ValueError(f"`seq_len`={seq_len!r} must be a positive integer")
    windows = []  # each (seq_len + 1 or fewer) ids: inputs w[:-1], targets w[1:]
    n_docs = 0
    for text in texts:
        doc = _document_windows(_document_ids(tokenizer, text), seq_len)
        windows.extend(doc)
        n_docs += bool(doc)
    if not windows:
        raise DataError("no text to score: every held-out document is empty")
    device, pad = model_device(model), _pad_id(tokenizer)
    batch_size = _batch_size(batch_size, device, gpu=32, cpu=8)
    order = sorted(range(len(windows)), key=lambda i: (-len(windows[i]), i))
    nll = 0.0
    tokens = 0
    with eval_mode(model):
        for start in range(0, len(order), batch_size):
            rows = [windows[i] for i in order[start : start + batch_size]]
            ids, mask = _right_pad([w[:-1] for w in rows], pad, device)  # (batch, width)
            logits = _logits(model, ids, mask, keep=None)  # (batch, width, vocab)
            for j, w in enumerate(rows):
                n = len(w) - 1
                target = torch.tensor(w[1:], dtype=torch.long, device=device)  # (n,)
                nll += float(F.cross_entropy(logits[j, :n].float(), target, reduction="sum"))
                tokens += n
    loss = nll / tokens
    return Scores(
        loss=loss,
        perplexity=math.exp(loss),
        accuracy=None,
        accuracy_norm=None,
        n=n_docs,
        tokens=tokens,
    )


# ---------------------------------------------------------------- dispatch


def score_task(model: nn.Module, tokenizer: Any, task: TaskData, **kwargs: Any) -> Scores:
    """Score `task`'s held-out split: :func:`mc_scores` or :func:`text_scores` by its kind."""
    if task.kind == "mc":
        return mc_scores(model, tokenizer, task.eval_mc, **kwargs)
    if task.kind == "text":
        return text_scores(model, tokenizer, task.eval_text, **kwargs)
    raise DataError(f"task `{task.name}` has kind `{task.kind}`; expected `mc` or `text`")
