"""ONNX export of a mixed-bit SmolLM2 GPTQ checkpoint: export time, sizes, parity, tokens/s.

    python bench/onnx_speed.py --out /tmp/onnx_speed.json
    python bench/onnx_speed.py --checkpoint DIR   # reuse a GPTQ checkpoint, skip quantizing

Quantizes SmolLM2-135M-Instruct with GPTQModel at a fixed per-layer mix of 2/3/4/8 bits
(group 64, C4 calibration windows), exports it with ``edgeqra.exporters.onnx.write_onnx``,
then times greedy generation in onnxruntime (CPU, KV cache, MatMulNBits) against the float32
torch model with the same dequantized weights (HF ``generate``, KV cache). Prints a markdown
table (paste it into bench/RESULTS.md with the command and the machine).
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

import torch

BITS_CYCLE = (4, 3, 4, 8, 2, 4)  # layer i gets BITS_CYCLE[i % 6]: all four widths, 4 most common


def _folder_bytes(folder: Path, suffixes: tuple[str, ...]) -> int:
    """Total size of the files in ``folder`` whose name ends with one of ``suffixes``."""
    return sum(p.stat().st_size for p in folder.iterdir() if p.name.endswith(suffixes))


def _quantize(dense: Path, out: Path, n_samples: int) -> tuple[Path, float]:
    """GPTQ checkpoint of the dense model at BITS_CYCLE; returns (folder, seconds)."""
    from transformers import AutoConfig, AutoTokenizer

    from edgeqra.data import calibration_batches
    from edgeqra.gptq import quantize_to_checkpoint

    layers = AutoConfig.from_pretrained(dense).num_hidden_layers
    bits = {f"model.layers.{i}": BITS_CYCLE[i % len(BITS_CYCLE)] for i in range(layers)}
    tokenizer = AutoTokenizer.from_pretrained(dense)
    calibration = calibration_batches(tokenizer, "c4", n_samples=n_samples, seq_len=256)
    started = time.perf_counter()
    quantize_to_checkpoint(dense, out, calibration, bits=bits, group_size=64)
    return out, time.perf_counter() - started


def _torch_tokens_per_s(model, prompt: torch.Tensor, new: int, repeats: int) -> tuple[float, list]:
    """Median tokens/s of HF greedy generate (KV cache) and the tokens it produced."""
    times, tokens = [], []
    with torch.no_grad():
        for _ in range(repeats):
            started = time.perf_counter()
            out = model.generate(
                prompt,
                attention_mask=torch.ones_like(prompt),
                max_new_tokens=new,
                min_new_tokens=new,
                do_sample=False,
                pad_token_id=0,
            )
            times.append(time.perf_counter() - started)
            tokens = out[0, prompt.shape[1] :].tolist()
    return new / statistics.median(times), tokens


def _ort_tokens_per_s(dest: Path, prompt: list[int], new: int, repeats: int) -> tuple[float, list]:
    """Median tokens/s of onnxruntime greedy decoding (KV cache) and its tokens."""
    from edgeqra.exporters.onnx import greedy_generate

    greedy_generate(dest, prompt, 1)  # session creation outside the timing
    times, tokens = [], []
    for _ in range(repeats):
        started = time.perf_counter()
        tokens = greedy_generate(dest, prompt, new)
        times.append(time.perf_counter() - started)
    return new / statistics.median(times), tokens


def _kernel_us(
    bits: int, accuracy_level: int, storage: str = "nbits", k: int = 576, n: int = 1536
) -> float:
    """Median µs of one linear (M=1, SmolLM2's up_proj shape, group 64) in onnxruntime.

    ``storage``: ``nbits`` (MatMulNBits at the native width, 3 at 4), ``as4`` (2/3-bit codes
    in the 4-bit kernel), ``split`` (8-bit as two 4-bit nodes + Add), ``float32`` (MatMul on
    the dequantized weight).
    """
    import numpy as np
    import onnxruntime as ort
    from edgeqra.exporters.onnx import pack_matmul_nbits, split_eight_bit
    from onnx import helper, numpy_helper

    rng = np.random.default_rng(bits)
    codes = rng.integers(0, 2**bits, (k, n))
    zeros = rng.integers(0, 2**bits, (k // 64, n))
    scales = rng.random((k // 64, n)).astype(np.float16).astype(np.float32)
    if storage == "float32":
        w = scales[np.arange(k) // 64] * (codes - zeros[np.arange(k) // 64])  # (K, N)
        nodes = [helper.make_node("MatMul", ["A", "W"], ["Y"])]
        inits = [numpy_helper.from_array(w.astype(np.float32), "W")]
    else:
        if storage == "split":
            parts = split_eight_bit("m", codes, zeros, scales, group_size=64)
        else:
            native = 4 if bits == 3 or storage == "as4" else bits
            parts = (pack_matmul_nbits("m", codes, zeros, scales, bits=bits, group_size=64,
                                       stored_bits=native),)  # fmt: skip
        nodes, inits = [], []
        for i, p in enumerate(parts):
            attrs = {"K": k, "N": n, "bits": p.bits_stored, "block_size": p.block_size}
            if accuracy_level:
                attrs["accuracy_level"] = accuracy_level
            names = [f"B{i}", f"S{i}", f"Z{i}"]
            out = "Y" if len(parts) == 1 else f"Y{i}"
            nodes.append(helper.make_node("MatMulNBits", ["A", *names], [out],
                                          domain="com.microsoft", **attrs))  # fmt: skip
            inits += [numpy_helper.from_array(x, nm)
                      for x, nm in zip((p.b, p.scales, p.zero_points), names, strict=True)]  # fmt: skip
        if len(parts) == 2:
            nodes.append(helper.make_node("Add", ["Y0", "Y1"], ["Y"]))
    graph = helper.make_graph(
        nodes,
        "one",
        [helper.make_tensor_value_info("A", 1, [1, k])],
        [helper.make_tensor_value_info("Y", 1, [1, n])],
        initializer=inits,
    )
    opsets = [helper.make_opsetid("", 20), helper.make_opsetid("com.microsoft", 1)]
    options = ort.SessionOptions()
    options.intra_op_num_threads = int(os.environ.get("EDGEQRA_ORT_THREADS", "0"))
    sess = ort.InferenceSession(
        helper.make_model(graph, opset_imports=opsets).SerializeToString(),
        options,
        providers=["CPUExecutionProvider"],
    )
    a = rng.standard_normal((1, k)).astype(np.float32)
    times = []
    for _ in range(105):
        started = time.perf_counter()
        sess.run(None, {"A": a})
        times.append(time.perf_counter() - started)
    return statistics.median(times[5:]) * 1e6


KERNEL_CASES = (  # (bits, storage, label)
    (2, "nbits", "2-bit MatMulNBits"),
    (2, "as4", "2-bit codes in 4-bit MatMulNBits (export default)"),
    (3, "nbits", "3-bit codes in 4-bit MatMulNBits (export default)"),
    (4, "nbits", "4-bit MatMulNBits"),
    (8, "nbits", "8-bit MatMulNBits (`--eight-bit native`)"),
    (8, "split", "8-bit as two 4-bit MatMulNBits + Add (`split`, export default)"),
    (8, "float32", "8-bit as float32 MatMul initializer (`float32`)"),
)


def kernel_table(k: int = 576, n: int = 1536) -> list[tuple[str, float, float, int]]:
    """(case, µs at accuracy_level 0, µs at 4 (nan for float32), bytes) for every KERNEL_CASE."""
    from edgeqra.exporters.onnx import nbits_bytes

    rows = []
    for bits, storage, label in KERNEL_CASES:
        if storage == "float32":
            nbytes, us4 = k * n * 4, float("nan")
        else:
            width = 4 if storage in ("as4", "split") or bits == 3 else bits
            nbytes = nbits_bytes(k, n, 64, width) * (2 if storage == "split" else 1)
            us4 = _kernel_us(bits, 4, storage, k, n)
        rows.append((label, _kernel_us(bits, 0, storage, k, n), us4, nbytes))
    return rows


def _prefix(a: list[int], b: list[int]) -> int:
    """Length of the common prefix of two token lists."""
    return next(
        (i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b))
    )


def _int8_variant(dest: Path, out: Path) -> Path:
    """A copy of the graph with MatMulNBits accuracy_level=4 (int8 activations), same weights."""
    import onnx
    from onnx import helper

    model = onnx.load(str(dest / "model.onnx"), load_external_data=False)
    for node in model.graph.node:
        if node.op_type == "MatMulNBits":
            node.attribute.append(helper.make_attribute("accuracy_level", 4))
    out.mkdir()
    onnx.save(model, str(out / "model.onnx"))
    os.link(dest / "model.onnx.data", out / "model.onnx.data")  # onnxruntime refuses symlinks
    return out


def _export_rows(info: dict, quant_s: float | None, export_s: float) -> list[tuple[str, str]]:
    """Table rows about the export itself (absent when timing an existing folder)."""
    return [
        ("GPTQ quantize (GPTQModel, CPU)", f"{quant_s:.0f} s" if quant_s else "reused"),
        ("write_onnx total (float twin, export, swap, save, parity)", f"{export_s:.0f} s"),
        ("  of which torch.onnx.export (dynamo)", f"{info['torch_export_seconds']:.0f} s"),
        ("MatMulNBits nodes (bits stored)", f"{len(info['nodes'])} ({info['bits_stored']})"),
        (
            "3-bit modules stored at 4 bits: extra bytes",
            f"{info['three_bit']['extra_bytes'] / (1 << 20):.2f} MiB",
        ),
        (
            "max |Δlogits| ORT vs torch, prefill (2 × 16)",
            f"{info['parity']['max_abs_dlogits']:.2e}",
        ),
        (
            "max |Δlogits|, one cached decode step",
            f"{info['parity']['max_abs_dlogits_cached_step']:.2e}",
        ),
    ]


def _compare(args) -> None:
    """Greedy tok/s of torch fp32 and of each ONNX folder, rounds interleaved (a busy machine
    moves every figure; interleaving moves them alike), medians printed."""
    from edgeqra.exporters.onnx import float_model
    from transformers import AutoTokenizer

    from edgeqra.models import resolve_model

    tokenizer = AutoTokenizer.from_pretrained(resolve_model(args.model))
    text = "The history of the printing press begins in the fifteenth century, when " * 8
    prompt = tokenizer(text, return_tensors="pt")["input_ids"][:, : args.prompt_tokens]
    model = float_model(args.checkpoint)  # float32 throughout, the fp32 embedding included
    rates: dict[str, list[float]] = {"torch": []}
    tokens: dict[str, list[int]] = {}
    for folder in args.compare:
        rates[str(folder)] = []
    for _ in range(args.repeats):
        for name in rates:
            if name == "torch":
                tps, toks = _torch_tokens_per_s(model, prompt, args.new_tokens, 1)
            else:
                tps, toks = _ort_tokens_per_s(Path(name), prompt[0].tolist(), args.new_tokens, 1)
            rates[name].append(tps)
            tokens[name] = toks
    print(f"| greedy {args.prompt_tokens}+{args.new_tokens} tokens, {args.threads} thread(s) | "
          "tok/s (median of rounds) | rounds | tokens equal to torch |")  # fmt: skip
    print("|---|---|---|---|")
    for name, values in rates.items():
        same = _prefix(tokens["torch"], tokens[name])
        info = ""
        if name != "torch":
            size = _folder_bytes(Path(name), (".onnx", ".onnx.data")) / 2**20
            info = f" ({size:.1f} MiB)"
        print(f"| {name}{info} | {statistics.median(values):.1f} | "
              f"{', '.join(f'{v:.1f}' for v in values)} | {same} / {args.new_tokens} |")  # fmt: skip


def _print_kernels(rows) -> None:
    """The per-kernel markdown table."""
    print("\nOne linear 576 -> 1536, M=1, group 64 (µs, median of 100):\n")
    print("| storage | accuracy_level 0 (fp32) | accuracy_level 4 (int8 A) | KiB |")
    print("|---|---|---|---|")
    for label, us0, us4, nbytes in rows:
        print(f"| {label} | {us0:.0f} | {us4:.0f} | {nbytes / 1024:.0f} |")


def main() -> None:
    """Quantize (or reuse), export, measure, print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--checkpoint", type=Path, help="existing GPTQ checkpoint to export")
    parser.add_argument("--calib-samples", type=int, default=32)
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--keep", type=Path, help="copy the ONNX folder here (must not exist)")
    parser.add_argument("--onnx", type=Path, help="time an existing ONNX folder (no export)")
    parser.add_argument("--keep-gptq", type=Path, help="copy the GPTQ checkpoint here")
    parser.add_argument("--eight-bit", default="split", choices=["split", "float32", "native"])
    parser.add_argument("--two-bit-storage", type=int, default=4, choices=[2, 4])
    parser.add_argument("--cache-io", default="genai", choices=["genai", "stacked"])
    parser.add_argument("--embedding-dtype", default="float16",
                        choices=["float16", "bfloat16", "int8", "float32"])  # fmt: skip
    parser.add_argument("--compare", type=Path, nargs="+",
                        help="ONNX folders to time against torch, interleaved (no export)")  # fmt: skip
    parser.add_argument("--kernels-only", action="store_true",
                        help="only the per-kernel table (no model, seconds)")  # fmt: skip
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    os.environ["EDGEQRA_ORT_THREADS"] = str(args.threads)  # same thread count on both sides
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")
    if args.kernels_only:
        _print_kernels(kernel_table())
        return
    if args.compare:
        _compare(args)
        return

    from edgeqra.exporters.onnx import float_model, onnx_logits, write_onnx
    from transformers import AutoTokenizer

    from edgeqra.models import resolve_model

    dense = resolve_model(args.model)
    figures: dict[str, object] = {"args": {k: str(v) for k, v in vars(args).items()}}
    figures["machine"] = f"{platform.node()}, {os.cpu_count()} CPUs, torch {torch.__version__}"
    with tempfile.TemporaryDirectory(prefix="edgeqra-onnx-bench-") as tmp:
        if args.checkpoint:
            checkpoint, quant_s = args.checkpoint, None
        else:
            checkpoint, quant_s = _quantize(dense, Path(tmp) / "gptq", args.calib_samples)
            if args.keep_gptq:
                shutil.copytree(checkpoint, args.keep_gptq)
        if args.onnx:  # timing only: the export figures come from the run that wrote it
            dest, info, export_s = args.onnx, None, None
        else:
            dest = Path(tmp) / "onnx"
            dest.mkdir()
            started = time.perf_counter()
            info = write_onnx(checkpoint, dest, progress=False, eight_bit=args.eight_bit,
                              embedding_dtype=args.embedding_dtype, cache_io=args.cache_io,
                              two_bit_storage=args.two_bit_storage)  # fmt: skip
            print(info["storage_line"])
            export_s = time.perf_counter() - started

        tokenizer = AutoTokenizer.from_pretrained(dense)
        text = "The history of the printing press begins in the fifteenth century, when " * 8
        prompt = tokenizer(text, return_tensors="pt")["input_ids"][:, : args.prompt_tokens]
        model = float_model(checkpoint)
        if args.embedding_dtype != "float32":  # the reference holds the exported table
            from edgeqra.exporters.onnx import embedding_storage

            with torch.no_grad():
                table = model.get_input_embeddings().weight
                _, back = embedding_storage(table.numpy(), args.embedding_dtype)
                table.copy_(torch.from_numpy(back))
        torch_tps, torch_tokens = _torch_tokens_per_s(model, prompt, args.new_tokens, args.repeats)
        ort_tps, ort_tokens = _ort_tokens_per_s(
            dest, prompt[0].tolist(), args.new_tokens, args.repeats
        )
        int8 = _int8_variant(dest, Path(tmp) / "onnx_int8")
        int8_tps, int8_tokens = _ort_tokens_per_s(
            int8, prompt[0].tolist(), args.new_tokens, args.repeats
        )
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(0, model.config.vocab_size, (2, 16), generator=g)
        with torch.no_grad():
            ref = model(ids, use_cache=False).logits.numpy()
        int8_dlogits = float(abs(onnx_logits(int8, ids.numpy()) - ref).max())
        same = _prefix(torch_tokens, ort_tokens)
        if args.keep:
            shutil.copytree(dest, args.keep)
        kernel_rows = kernel_table()
        kernels = {label: [us0, us4, nbytes] for label, us0, us4, nbytes in kernel_rows}
        if info:
            figures.update(
                quantize_s=quant_s,
                export_s=export_s,
                torch_export_s=info["torch_export_seconds"],
                onnx_files={f["path"]: f["bytes"] for f in info["files"]},
                nodes=len(info["nodes"]),
                bits_requested=info["bits_requested"],
                bits_stored=info["bits_stored"],
                three_bit=info["three_bit"],
                storage=info["storage"],
                embedding=info["embedding"],
                parity=info["parity"],
            )
        figures.update(
            onnx_bytes=_folder_bytes(dest, (".onnx", ".onnx.data")),
            gptq_bytes=_folder_bytes(checkpoint, (".safetensors",)),
            dense_bytes=_folder_bytes(dense, (".safetensors",)),
            torch_tokens_per_s=torch_tps,
            ort_tokens_per_s=ort_tps,
            greedy_tokens_equal_prefix=same,
            kernel_us=kernels,
            int8_tokens_per_s=int8_tps,
            int8_max_abs_dlogits=int8_dlogits,
            int8_greedy_tokens_equal_prefix=_prefix(torch_tokens, int8_tokens),
            ort_text=tokenizer.decode(ort_tokens),
        )
    mib = 1 << 20
    rows = []
    if info:
        rows += _export_rows(info, quant_s, export_s)
    rows += [
        ("model.onnx + model.onnx.data", f"{figures['onnx_bytes'] / mib:.1f} MiB"),
        ("GPTQ checkpoint safetensors", f"{figures['gptq_bytes'] / mib:.1f} MiB"),
        ("dense fp32 safetensors", f"{figures['dense_bytes'] / mib:.1f} MiB"),
    ]
    rows += [
        (
            f"torch fp32 greedy, {args.prompt_tokens}+{args.new_tokens} tokens",
            f"{torch_tps:.1f} tok/s",
        ),
        (
            f"onnxruntime MatMulNBits greedy, {args.prompt_tokens}+{args.new_tokens}",
            f"{ort_tps:.1f} tok/s",
        ),
        ("greedy tokens equal (ORT vs torch)", f"{same} / {args.new_tokens}"),
        ("same graph, accuracy_level=4 (int8 activations): greedy", f"{int8_tps:.1f} tok/s"),
        ("  its max |Δlogits| vs torch (2 × 16)", f"{int8_dlogits:.2e}"),
        (
            "  its greedy tokens equal to torch",
            f"{figures['int8_greedy_tokens_equal_prefix']} / {args.new_tokens}",
        ),
    ]
    print("| what | figure |\n|---|---|")
    for what, figure in rows:
        print(f"| {what} | {figure} |")
    _print_kernels(kernel_rows)
    print("\nORT continuation:", repr(figures["ort_text"]))
    if args.out:
        args.out.write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
