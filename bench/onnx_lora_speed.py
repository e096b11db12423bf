"""Decode cost of keeping LoRA unmerged in the ONNX graph (issue 21): SmolLM2, all 210 modules.

    python bench/onnx_lora_speed.py --checkpoint GPTQ --threads 1 --rounds 5 --out /tmp/lora.json
    python bench/onnx_lora_speed.py --threads 1          # quantize a uniform 4-bit GPTQ first
    python bench/onnx_lora_speed.py --checkpoint GPTQ --work DIR --rounds 15   # DIR kept; reused

Also times one linear (576 -> 1536 and 1536 -> 576, M = 1, 4-bit MatMulNBits) with and
without its LoRA branch (MatMul, MatMul, Mul, Add), interleaved: the per-module cost.

A speed figure, not a quality one: the adapter is random (PEFT ``init_lora_weights=False``,
B scaled so its effect is small), rank ``--rank`` on every linear of every layer, as a
package whose merge kept every unit unmerged holds it in ``adapter/``. Both packages (the
GPTQ checkpoint alone, and with that adapter) go through ``write_onnx``; then rounds of
greedy decoding alternate between the two graphs (a busy machine moves both alike), timing
the prefill and each cached decode step. Greedy tokens of the LoRA graph are checked
against the torch adapter form (float twin + PEFT adapter, HF ``generate``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

PROJ = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _quantize(dense: Path, out: Path, n_samples: int) -> Path:
    """Uniform 4-bit GPTQ checkpoint (group 64, C4 windows) of the dense model."""
    from transformers import AutoTokenizer

    from edgeqra.data import calibration_batches
    from edgeqra.gptq import quantize_to_checkpoint

    tokenizer = AutoTokenizer.from_pretrained(dense)
    calibration = calibration_batches(tokenizer, "c4", n_samples=n_samples, seq_len=256)
    return quantize_to_checkpoint(dense, out, calibration, bits=4, group_size=64)


def _lora_package(checkpoint: Path, dense: Path, dest: Path, rank: int, seed: int) -> list[str]:
    """``dest``: the checkpoint plus ``adapter/``, a random rank-``rank`` LoRA on every linear."""
    from edgeqra.exporters.gptq import UNMERGED_ADAPTER, write_partial_adapter
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    shutil.copytree(checkpoint, dest)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(dense, dtype=torch.float32)
    config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=list(PROJ),
                        init_lora_weights=False)  # fmt: skip
    peft_model = get_peft_model(model, config)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.mul_(0.01)  # a small effect: greedy text stays the base model's kind
    modules = sorted(n.removeprefix("base_model.model.") for n, m in peft_model.named_modules()
                     if hasattr(m, "lora_A") and n.endswith(PROJ))  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        peft_model.save_pretrained(tmp)
        write_partial_adapter(Path(tmp), modules, dest / UNMERGED_ADAPTER)
    return modules


def _one_linear(k: int, n: int, rank: int, lora: bool):
    """An onnxruntime session of y = MatMulNBits(x) [+ s·(x Aᵀ) Bᵀ], x (1, K); random weights."""
    import onnxruntime as ort
    from edgeqra.exporters.onnx import pack_matmul_nbits
    from onnx import helper, numpy_helper

    rng = np.random.default_rng(0)
    p = pack_matmul_nbits("m", rng.integers(0, 16, (k, n)), rng.integers(0, 16, (k // 64, n)),
                          rng.random((k // 64, n)).astype(np.float32), bits=4, group_size=64)  # fmt: skip
    inits = [numpy_helper.from_array(a, nm) for a, nm in ((p.b, "B"), (p.scales, "S"), (p.zero_points, "Z"))]  # fmt: skip
    nodes = [helper.make_node("MatMulNBits", ["X", "B", "S", "Z"], ["Y0" if lora else "Y"],
                              domain="com.microsoft", K=k, N=n, bits=4, block_size=64)]  # fmt: skip
    if lora:
        a = rng.standard_normal((k, rank)).astype(np.float32)  # Aᵀ (K, r)
        b = rng.standard_normal((rank, n)).astype(np.float32)  # Bᵀ (r, N)
        inits += [numpy_helper.from_array(a, "At"), numpy_helper.from_array(b, "Bt"),
                  numpy_helper.from_array(np.array(2.0, np.float32), "s")]  # fmt: skip
        nodes += [helper.make_node("MatMul", ["X", "At"], ["XA"]),
                  helper.make_node("MatMul", ["XA", "Bt"], ["XAB"]),
                  helper.make_node("Mul", ["XAB", "s"], ["L"]),
                  helper.make_node("Add", ["Y0", "L"], ["Y"])]  # fmt: skip
    graph = helper.make_graph(nodes, "one", [helper.make_tensor_value_info("X", 1, [1, k])],
                              [helper.make_tensor_value_info("Y", 1, [1, n])], initializer=inits)  # fmt: skip
    opsets = [helper.make_opsetid("", 20), helper.make_opsetid("com.microsoft", 1)]
    options = ort.SessionOptions()
    options.intra_op_num_threads = int(os.environ.get("EDGEQRA_ORT_THREADS", "1"))
    model = helper.make_model(graph, opset_imports=opsets)
    return ort.InferenceSession(
        model.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )


def branch_table(
    rank: int, blocks: int = 20, per_block: int = 100
) -> list[tuple[str, float, float]]:
    """(shape, µs without, µs with the LoRA branch): medians over interleaved blocks of runs."""
    rows = []
    for k, n in ((576, 1536), (1536, 576)):
        sessions = {lora: _one_linear(k, n, rank, lora) for lora in (False, True)}
        x = np.random.default_rng(1).standard_normal((1, k)).astype(np.float32)
        times: dict[bool, list[float]] = {False: [], True: []}
        for _ in range(blocks):
            for lora, sess in sessions.items():
                for _ in range(per_block):
                    started = time.perf_counter()
                    sess.run(None, {"X": x})
                    times[lora].append(time.perf_counter() - started)
        rows.append((f"{k} -> {n}", 1e6 * statistics.median(times[False]),
                     1e6 * statistics.median(times[True])))  # fmt: skip
    return rows


def _decode(dest: Path, prompt: list[int], new: int) -> tuple[float, list[float], list[int]]:
    """(prefill s, per-step decode s, tokens) of one greedy run through the exported cache."""
    from edgeqra.exporters.onnx import empty_cache, ort_session, run_step

    sess = ort_session(dest)
    keys = values = empty_cache(sess, 1)
    ids = np.array([prompt], dtype=np.int64)
    started = time.perf_counter()
    logits, keys, values = run_step(sess, ids, np.ones(ids.shape, np.int64), keys, values)
    prefill = time.perf_counter() - started
    tokens, steps, total = [int(logits[0, -1].argmax())], [], len(prompt)
    for _ in range(new - 1):
        total += 1
        started = time.perf_counter()
        logits, keys, values = run_step(sess, np.array([[tokens[-1]]], np.int64),
                                        np.ones((1, total), np.int64), keys, values)  # fmt: skip
        steps.append(time.perf_counter() - started)
        tokens.append(int(logits[0, -1].argmax()))
    return prefill, steps, tokens


def main() -> None:
    """Quantize (or reuse), build the LoRA package, export both, time them interleaved."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--checkpoint", type=Path, help="a uniform GPTQ checkpoint to reuse")
    parser.add_argument("--calib-samples", type=int, default=16)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="write the figures as JSON here")
    parser.add_argument("--work", type=Path, help="keep the packages and exports here (reused)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    os.environ["EDGEQRA_ORT_THREADS"] = str(args.threads)
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")

    import onnxruntime
    from edgeqra.exporters.onnx import float_model, write_onnx
    from transformers import AutoTokenizer

    from edgeqra.models import resolve_model

    dense = resolve_model(args.model)
    tokenizer = AutoTokenizer.from_pretrained(dense)
    text = "The history of the printing press begins in the fifteenth century, when " * 8
    prompt = tokenizer(text)["input_ids"][: args.prompt_tokens]
    figures: dict[str, object] = {
        "args": {k: str(v) for k, v in vars(args).items()},
        "machine": f"{platform.node()}, {os.cpu_count()} CPUs, {platform.processor()}",
        "versions": {"torch": torch.__version__, "onnxruntime": onnxruntime.__version__},
    }
    with tempfile.TemporaryDirectory(prefix="edgeqra-onnx-lora-") as tmp:
        root = args.work or Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        checkpoint = args.checkpoint or root / "gptq"
        if not (checkpoint / "config.json").is_file():
            _quantize(dense, checkpoint, args.calib_samples)
        if (root / "lora-pkg" / "modules.json").is_file():
            modules = json.loads((root / "lora-pkg" / "modules.json").read_text())
        else:
            modules = _lora_package(checkpoint, dense, root / "lora-pkg", args.rank, args.seed)
            (root / "lora-pkg" / "modules.json").write_text(json.dumps(modules))
        folders = {
            "none unmerged": root / "onnx-plain",
            f"all {len(modules)} unmerged": root / "onnx-lora",
        }
        infos = {}
        for (label, folder), source in zip(
            folders.items(), (checkpoint, root / "lora-pkg"), strict=True
        ):
            if (folder / "info.json").is_file():  # an earlier run's export (--work)
                infos[label] = json.loads((folder / "info.json").read_text())
                continue
            folder.mkdir()
            started = time.perf_counter()
            infos[label] = write_onnx(source, folder, progress=False)
            infos[label]["wall_s"] = time.perf_counter() - started
            (folder / "info.json").write_text(json.dumps(infos[label]))
            print(f"{label}: {infos[label]['storage_line']} ({infos[label]['wall_s']:.0f} s)")
        rounds: dict[str, list[tuple[float, list[float]]]] = {label: [] for label in folders}
        tokens: dict[str, list[int]] = {}
        for _ in range(args.rounds):
            for label, folder in folders.items():
                _decode(folder, prompt, 2)  # the session of this folder (one is cached)
                prefill, steps, tokens[label] = _decode(folder, prompt, args.new_tokens)
                rounds[label].append((prefill, steps))
        reference = float_model(root / "lora-pkg")  # torch adapter form: W_hat + PEFT, eval
        with torch.no_grad():
            ids = torch.tensor([prompt])
            out = reference.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                     max_new_tokens=args.new_tokens,
                                     min_new_tokens=args.new_tokens, pad_token_id=0)  # fmt: skip
        torch_tokens = out[0, len(prompt) :].tolist()

    lora_label = f"all {len(modules)} unmerged"
    print(f"\n| ONNX of uniform 4-bit SmolLM2, greedy {args.prompt_tokens}+{args.new_tokens}, "
          f"{args.threads} thread(s), {args.rounds} interleaved rounds | decode tok/s (median "
          "step) | per round | prefill ms | greedy tok/s end to end | model.onnx.data MiB |")  # fmt: skip
    print("|---|---|---|---|---|---|")
    rows = {}
    for label, runs in rounds.items():
        per_round = [1 / statistics.median(steps) for _, steps in runs]
        e2e = [args.new_tokens / (p + sum(steps)) for p, steps in runs]
        data = next(f["bytes"] for f in infos[label]["files"] if f["path"] == "model.onnx.data")
        rows[label] = {
            "decode_tok_s": statistics.median(per_round),
            "decode_tok_s_rounds": per_round,
            "prefill_ms": 1e3 * statistics.median(p for p, _ in runs),
            "greedy_tok_s": statistics.median(e2e),
            "data_bytes": data,
            "lora": infos[label]["lora"],
            "export_s": infos[label]["wall_s"],
            "parity": infos[label]["parity"],
        }
        r = rows[label]
        print(f"| {label} | {r['decode_tok_s']:.1f} | {', '.join(f'{v:.1f}' for v in per_round)} | "
              f"{r['prefill_ms']:.0f} | {r['greedy_tok_s']:.1f} | {data / 2**20:.1f} |")  # fmt: skip
    plain, lora = rows["none unmerged"], rows[lora_label]
    same = next((i for i, (a, b) in enumerate(zip(tokens[lora_label], torch_tokens, strict=True))
                 if a != b), args.new_tokens)  # fmt: skip
    ratio = lora["decode_tok_s"] / plain["decode_tok_s"]
    print(f"\nLoRA graph decode speed {ratio:.2f}x the plain one; LoRA bytes "
          f"{lora['lora']['bytes'] / 2**20:.2f} MiB ({lora['lora']['modules']} modules, ranks "
          f"{lora['lora']['ranks']}); greedy tokens equal to the torch adapter form: "
          f"{same} / {args.new_tokens}; parity max |Δlogits| {lora['parity']['max_abs_dlogits']:.2e}")  # fmt: skip
    branch = branch_table(args.rank)
    print(f"\nOne linear, M = 1, 4-bit MatMulNBits, rank-{args.rank} LoRA branch, "
          f"{args.threads} thread(s), µs (median of 20 interleaved blocks of 100 runs):\n")  # fmt: skip
    print("| K -> N | MatMulNBits | + LoRA branch | extra |\n|---|---|---|---|")
    for shape, without, with_lora in branch:
        print(f"| {shape} | {without:.1f} | {with_lora:.1f} | {with_lora - without:+.1f} |")
    figures.update(rows=rows, ratio=ratio, tokens_equal_torch_adapter_form=same, branch_us=branch)
    if args.out:
        args.out.write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
