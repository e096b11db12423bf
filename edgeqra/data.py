"""Named data sources -> examples and token batches for calibration, LoRA tuning and scoring.

Every source is offline, read from files that registry packages ship (never imported):

* plain text (``c4``, ``wiki``, ``code``, ``tiny``, ``technical``, ``multilingual``): the
  calibration files of ``exllamav2==0.3.2``; a local ``.txt`` (documents separated by blank
  lines) or ``.jsonl`` (a ``"text"`` field, or ``"prompt"`` + ``"completion"``) works the same;
* multiple choice (``arc_easy``, ``arc_challenge``, ``boolq``, ``piqa``, ``hellaswag``,
  ``winogrande``, ``openbookqa``): the official train / validation splits in lm-eval's *cloze*
  format; :mod:`edgeqra.tasks` reads and formats them.

Splits. MC tasks use the official train / validation files; a train question whose context
also occurs in validation is dropped. Text sources are split at document level by a fixed
permutation (``_SPLIT_SEED``, independent of ``seed``): its last 10 % of documents are held
out, so every job scores on the same documents and none is in both halves. ``seed`` only
picks the order and the ``n_train`` / ``n_eval`` subsets (prefixes of seeded permutations, so
a smaller subset is nested in a larger one).
"""

from __future__ import annotations

import json
import logging
import random
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from types import MappingProxyType
from typing import Any

import torch

from edgeqra.errors import DataError
from edgeqra.records import Example, MCItem, Package, TaskData
from edgeqra.tasks import MC_SOURCES, mc_items

__all__ = [
    "KNOWN_SOURCES",
    "Example",
    "MCItem",
    "TaskData",
    "calibration_batches",
    "calibration_texts",
    "encode_pair",
    "load_task",
    "prefix_token",
    "tokenize_examples",
]

log = logging.getLogger(__name__)

IGNORE_INDEX = -100
_SPLIT_SEED = 1234  # fixed: the held-out documents of a text source never depend on `seed`
_EVAL_FRACTION = 0.1
_CHUNK_CHARS = 1024  # train text is cut into pieces of about this many characters (~256 tokens)

_EXLLAMA = Package("exllamav2", "0.3.2")


# ---------------------------------------------------------------- text sources


def _split_lines(text: str) -> list[str]:
    """One document per line (the C4 file)."""
    return text.split("\n")


def _split_blank(text: str) -> list[str]:
    """Documents separated by blank lines."""
    return re.split(r"\n[ \t]*\n", text)


def _split_wiki(text: str) -> list[str]:
    """Wikipedia extractor output: ``<doc ...>body</doc>``."""
    return re.findall(r"<doc [^>]*>(.*?)</doc>", text, flags=re.DOTALL)


def _split_eot(text: str) -> list[str]:
    """TinyStories: stories separated by ``<|endoftext|>``."""
    return text.split("<|endoftext|>")


@dataclass(frozen=True)
class _TextSource:
    """A calibration text file of exllamav2 and how its documents are separated."""

    file: str
    split: Callable[[str], list[str]]
    description: str


_TEXT_SOURCES: dict[str, _TextSource] = {
    "c4": _TextSource(
        "c4.utf8", _split_lines, "C4 web text, 113 distinct documents (one per line)"
    ),
    "wiki": _TextSource("wiki.utf8", _split_wiki, "English Wikipedia, 2349 articles"),
    "code": _TextSource("code.utf8", _split_blank, "source code, blank-line separated blocks"),
    "tiny": _TextSource("tiny.utf8", _split_eot, "TinyStories, 317 short stories"),
    "technical": _TextSource(
        "technical.utf8", _split_blank, "technical prose, blank-line separated paragraphs"
    ),
    "multilingual": _TextSource(
        "multilingual.utf8", _split_blank, "multilingual prose, blank-line separated paragraphs"
    ),
}


def _clean_documents(docs: Iterable[str]) -> list[str]:
    """Strip, drop empty documents and exact duplicates (a duplicate could land in both halves)."""
    return list(dict.fromkeys(d.strip() for d in docs if d.strip()))


@cache
def _text_documents(name: str) -> tuple[str, ...]:
    """All documents of a named text source."""
    src = _TEXT_SOURCES[name]
    path = _EXLLAMA.file(f"exllamav2/conversion/standard_cal_data/{src.file}", name)
    return tuple(_clean_documents(src.split(path.read_text(encoding="utf-8"))))


def _rng(purpose: str, seed: int) -> random.Random:
    """An independent seeded stream per purpose, so subsets of one never shift another."""
    return random.Random(f"edgeqra/{purpose}/{seed}")  # noqa: S311 (data order, not crypto)


def _split_documents(n: int) -> tuple[list[int], list[int]]:
    """(train, eval) document indices: the last 10 % of a fixed permutation are held out."""
    if n < 2:
        raise DataError(f"a text source needs at least 2 documents to hold one out, got {n}")
    perm = list(range(n))
    _rng("split", _SPLIT_SEED).shuffle(perm)
    n_eval = max(1, round(n * _EVAL_FRACTION))
    return sorted(perm[:-n_eval]), sorted(perm[-n_eval:])


def _chunk(doc: str, max_chars: int = _CHUNK_CHARS) -> list[str]:
    """Cut a document into pieces of at most ~`max_chars` characters at whitespace."""
    chunks, rest = [], doc
    while len(rest) > max_chars:
        cut = max(rest.rfind(c, max_chars // 2, max_chars) for c in "\n ")
        cut = cut if cut > 0 else max_chars
        chunks.append(rest[:cut].strip())
        rest = rest[cut:]
    chunks.append(rest.strip())
    return [c for c in chunks if c]


# ---------------------------------------------------------------- local files


def _is_file_source(name: str) -> bool:
    """A local data file rather than a registry name."""
    return name.endswith((".txt", ".jsonl")) or Path(name).is_file()


def _file_records(name: str) -> list[Example]:
    """Records of a local file: text documents as Example("", text), or prompt/completion."""
    path = Path(name).expanduser()
    if not path.is_file():
        raise DataError(f"data file `{name}` does not exist; pass a .txt or .jsonl path")
    if path.suffix == ".txt":
        docs = _clean_documents(_split_blank(path.read_text(encoding="utf-8")))
        records = [Example("", d) for d in docs]
    elif path.suffix == ".jsonl":
        records = []
        for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if line.strip():
                records.append(_jsonl_record(line, f"{name}:{lineno}"))
        records = list(dict.fromkeys(r for r in records if (r.prompt + r.completion).strip()))
    else:
        raise DataError(f"data file `{name}` has suffix `{path.suffix}`; use .txt or .jsonl")
    if not records:
        raise DataError(f"data file `{name}` holds no documents")
    return records


def _jsonl_record(line: str, where: str) -> Example:
    """One JSONL line: {"text": ...} or {"prompt": ..., "completion": ...}."""
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise DataError(f"`{where}` is not valid JSON ({e.msg})") from None
    if isinstance(obj, dict) and isinstance(obj.get("text"), str):
        return Example("", obj["text"].strip())
    if (
        isinstance(obj, dict)
        and isinstance(obj.get("prompt"), str)
        and isinstance(obj.get("completion"), str)
    ):
        return Example(obj["prompt"], obj["completion"])
    raise DataError(
        f"`{where}` needs a string field `text`, or `prompt` and `completion`; "
        f"got keys {sorted(obj) if isinstance(obj, dict) else type(obj).__name__}"
    )


# ---------------------------------------------------------------- registry + loading


KNOWN_SOURCES: Mapping[str, str] = MappingProxyType(
    {name: s.description for name, s in _TEXT_SOURCES.items()}
    | {name: s.description for name, s in MC_SOURCES.items()}
)
"""Registry names -> one-line descriptions; a path to a .txt or .jsonl file also works."""


def _unknown(name: str) -> DataError:
    """The error for a name that is neither registered nor a file."""
    return DataError(
        f"unknown data source `{name}`; known: {', '.join(sorted(KNOWN_SOURCES))}, "
        f"or a path to a .txt / .jsonl file"
    )


def _subsample(
    items: Sequence[Any], n: int | None, rng: random.Random, *, keep_order: bool, what: str
) -> tuple[Any, ...]:
    """A seeded subset: the first `n` of a permutation (nested across `n`)."""
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
        raise DataError(f"`{what}`={n!r} must be a positive integer or None (all)")
    if n is not None and n > len(items):
        log.warning("`%s`=%d exceeds the %d available; using all", what, n, len(items))
    perm = list(range(len(items)))
    rng.shuffle(perm)
    picked = perm[:n] if n is not None else perm
    if keep_order:
        picked = sorted(picked)
    return tuple(items[i] for i in picked)


def load_task(
    name: str, *, seed: int = 0, n_train: int | None = None, n_eval: int | None = None
) -> TaskData:
    """Train examples + held-out data of a named source or local file, deterministic in `seed`.

    Args:
        name: a key of ``KNOWN_SOURCES`` or a path to a ``.txt`` / ``.jsonl`` file.
        seed: orders the train examples and picks the subsets; never moves the split.
        n_train: number of train examples (None: all), a prefix of a seeded shuffle.
        n_eval: number of held-out MC items / documents (None: all), kept in file order.
    """
    train_rng = _rng("train", seed)
    eval_rng = _rng("eval", seed)
    if name in MC_SOURCES:
        train_items, eval_items = mc_items(name)
        return TaskData(
            name,
            "mc",
            _subsample(
                [t.example() for t in train_items],
                n_train,
                train_rng,
                keep_order=False,
                what="n_train",
            ),
            _subsample(eval_items, n_eval, eval_rng, keep_order=True, what="n_eval"),
            (),
        )
    records = _records(name)
    train_idx, eval_idx = _split_documents(len(records))
    train: list[Example] = []
    for i in train_idx:  # prompt/completion records stay whole; plain text is chunked
        rec = records[i]
        train.extend([rec] if rec.prompt else [Example("", c) for c in _chunk(rec.completion)])
    eval_text = [records[i].prompt + records[i].completion for i in eval_idx]
    return TaskData(
        name,
        "text",
        _subsample(train, n_train, train_rng, keep_order=False, what="n_train"),
        (),
        _subsample(eval_text, n_eval, eval_rng, keep_order=True, what="n_eval"),
    )


def _records(name: str) -> list[Example]:
    """All documents of a text source or file, as Example("", text) or prompt/completion."""
    if name in _TEXT_SOURCES:
        return [Example("", d) for d in _text_documents(name)]
    if _is_file_source(name):
        return _file_records(name)
    raise _unknown(name)


def _train_texts(source: str) -> list[str]:
    """Whole training-side texts of any source (held-out documents / validation never used)."""
    if source in MC_SOURCES:
        return [t.example().prompt + t.example().completion for t in mc_items(source)[0]]
    records = _records(source)
    return [records[i].prompt + records[i].completion for i in _split_documents(len(records))[0]]


# ---------------------------------------------------------------- calibration


def calibration_texts(source: str = "c4", *, n_samples: int = 128, seed: int = 0) -> list[str]:
    """Seeded whole training documents, for GPTQModel's ``calibration_dataset`` (list of str)."""
    docs = _train_texts(source)
    _rng("calibration", seed).shuffle(docs)
    if n_samples > len(docs):
        log.warning(
            "`n_samples`=%d exceeds the %d documents of `%s`; using all",
            n_samples,
            len(docs),
            source,
        )
    return docs[:n_samples]


def calibration_batches(
    tokenizer: Any, source: str = "c4", *, n_samples: int = 128, seq_len: int = 256, seed: int = 0
) -> torch.Tensor:
    """Random token windows over training documents joined by EOS, for GPTQ's Hessians.

    Returns:
        LongTensor (n_samples, seq_len); the same arguments give the same tensor.
    """
    if n_samples < 1 or seq_len < 1:
        raise DataError(f"`n_samples`={n_samples} and `seq_len`={seq_len} must be >= 1")
    docs = _train_texts(source)
    _rng("calibration", seed).shuffle(docs)
    eos = tokenizer.eos_token_id
    need = 2 * n_samples * seq_len  # twice what is drawn, so windows overlap little
    stream: list[int] = []
    for start in range(0, len(docs), 64):
        for ids in tokenizer(docs[start : start + 64], add_special_tokens=False)["input_ids"]:
            stream.extend(ids)
            if eos is not None:
                stream.append(eos)
        if len(stream) >= need:
            break
    if len(stream) < seq_len:
        raise DataError(
            f"source `{source}` has only {len(stream)} training tokens; `seq_len`={seq_len} "
            f"needs more: use a larger source or a shorter seq_len"
        )
    tokens = torch.tensor(stream, dtype=torch.long)  # (n_tokens,)
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(stream) - seq_len + 1, (n_samples,), generator=gen)
    offsets = torch.arange(seq_len)
    return tokens[starts[:, None] + offsets[None, :]]  # (n_samples, seq_len)


# ---------------------------------------------------------------- tokenization


def prefix_token(tokenizer: Any) -> int | None:
    """The token an empty context starts from: BOS, else EOS (lm-eval's prefix_token_id)."""
    bos = tokenizer.bos_token_id
    return bos if bos is not None else tokenizer.eos_token_id


def encode_pair(tokenizer: Any, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Token ids of (context, continuation) exactly as lm-eval splits them.

    The pair is encoded whole and cut after the context's own length, with trailing context
    spaces moved to the continuation; an empty context becomes the BOS (else EOS) token so
    the first continuation token is predicted. Training and scoring share this function.
    """
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    whole = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
    n_ctx = len(tokenizer(context, add_special_tokens=False)["input_ids"]) if context else 0
    ctx, cont = list(whole[:n_ctx]), list(whole[n_ctx:])
    if not ctx and (prefix := prefix_token(tokenizer)) is not None:
        ctx = [prefix]
    return ctx, cont


def tokenize_examples(
    tokenizer: Any, examples: Sequence[Example], seq_len: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded batches whose labels cover only completion tokens.

    A too-long example loses prompt tokens from the left first; a completion longer than
    ``seq_len - 1`` keeps its start (one context token stays so its first token is predicted).

    Returns:
        input_ids, labels, attention_mask: LongTensors (len(examples), seq_len); labels are
        -100 on prompt and padding, the input id elsewhere (the model shifts them).
    """
    if seq_len < 2:
        raise DataError(f"`seq_len`={seq_len} must be >= 2 (one context + one target token)")
    pad = tokenizer.pad_token_id
    pad = pad if pad is not None else tokenizer.eos_token_id
    pad = pad if pad is not None else 0
    n = len(examples)
    input_ids = torch.full((n, seq_len), pad, dtype=torch.long)  # (n, seq_len)
    labels = torch.full((n, seq_len), IGNORE_INDEX, dtype=torch.long)  # (n, seq_len)
    attention_mask = torch.zeros((n, seq_len), dtype=torch.long)  # (n, seq_len)
    for row, ex in enumerate(examples):
        ctx, cont = encode_pair(tokenizer, ex.prompt, ex.completion)
        cont = cont[: seq_len - 1] if ctx else cont[:seq_len]
        ctx = ctx[len(ctx) - (seq_len - len(cont)) :] if len(ctx) + len(cont) > seq_len else ctx
        ids = ctx + cont
        input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        labels[row, len(ctx) : len(ids)] = torch.tensor(cont, dtype=torch.long)
        attention_mask[row, : len(ids)] = 1
    return input_ids, labels, attention_mask
