"""What is alive at a LoRA step's memory peak: a census of every tensor ATen returns.

    # CPU (the FP16 LoRA model; seconds to minutes):
    python bench/peak_census.py --arch examples/architectures/smollm2-135m --device cpu
    # GPU (issue 15: which bytes the memory model misses; a quantized config needs GPTQModel):
    python bench/peak_census.py --arch examples/architectures/smollm2-135m --device cuda \\
        --config 16/8x30 --out $OUT/census.json
    # the prefill + decode of generate (Qwen2.5-1.5B's 8-bit row is 14.6 MiB under there):
    python bench/peak_census.py --arch examples/architectures/qwen2.5-1.5b --device cuda \\
        --phase inference --config 8/8x28 --out $OUT/census_qwen_u8.json

Issue 15 left SmolLM2's fine-tuning without checkpointing under-predicted on the H200 by
17-25 MiB of ~3.5 GiB (uniform configs, 2 × 1024 tokens). ``memory_truth.py`` reads only the
allocator's peak; this script says what made it. A ``TorchDispatchMode`` registers the
storage of every tensor an op returns (storages are PyObject-preserved, so a weakref
finalizer fires when one dies; storages alive before the step, the weights and adapters, are
left out) and keeps the live set at its largest. On CUDA it also reads the allocator after
every op: when ``max_memory_allocated`` rises the op and the census at that moment are kept,
so the allocator's peak minus the live tensors is what no tensor holds (cuBLAS and kernel
workspaces, an op's transient buffers). Runs one warm-up step and then ``--steps`` measured
steps in one ``train`` call, as ``edgeqra.measure.measure_finetune`` does.
"""

from __future__ import annotations

import argparse
import collections
import gc
import hashlib
import json
import os
import sys
import time
import weakref
from collections.abc import Iterator
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from edgeqra.memory import ModelSpec, estimate
from edgeqra.profiles import BudgetMode, FinetuneWorkload, InferenceWorkload
from edgeqra.space import Config

MiB = 2**20
REPO = Path(__file__).resolve().parents[1]


class LiveTensors(TorchDispatchMode):
    """Live bytes of the storages ops return, their largest set, and the allocator's peaks."""

    def __init__(self, device: str, ignore: set[int]) -> None:
        super().__init__()
        self.device = device
        self.ignore = ignore  # storages alive before the step
        self.live: dict[int, tuple[int, str, tuple[int, ...], str]] = {}
        self.bytes = 0
        self.peak = 0
        self.peak_at: tuple[int, str] | None = None
        self.peak_set: list[tuple[int, str, tuple[int, ...], str]] = []
        self.ops = 0
        self.cuda = device.startswith("cuda")
        self.max_allocated = torch.cuda.max_memory_allocated() if self.cuda else 0
        self.allocator_peak: dict[str, object] | None = None

    def _free(self, key: int) -> None:
        self.bytes -= self.live.pop(key, (0,))[0]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.ops += 1
        name = str(func.overloadpacket.__name__)
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor) or t.device.type != self.device.split(":")[0]:
                continue
            storage = t.untyped_storage()
            key, n = storage.data_ptr(), storage.nbytes()
            if n == 0 or key in self.live or key in self.ignore:
                continue
            self.live[key] = (n, name, tuple(t.shape), str(t.dtype).removeprefix("torch."))
            self.bytes += n
            weakref.finalize(storage, self._free, key)
        if self.bytes > self.peak:
            self.peak, self.peak_at = self.bytes, (self.ops, name)
            self.peak_set = list(self.live.values())
        if self.cuda:
            high = torch.cuda.max_memory_allocated()
            if high > self.max_allocated:  # this op set a new allocator peak
                self.max_allocated = high
                self.allocator_peak = {
                    "op": name,
                    "op_index": self.ops,
                    "max_allocated": high,
                    "allocated_after_op": torch.cuda.memory_allocated(),
                    "live_tensors": self.bytes,
                    "live_set": list(self.live.values()),
                    "live_keys": set(self.live),
                }
        return out


def _caller(frames: list[dict]) -> str:
    """Where an allocation came from: the innermost Python frame outside torch's own code
    (a PEFT layer, a GPTQModel kernel, edgeqra), or the innermost frame when all are torch's."""

    def fmt(f: dict) -> str:
        name = f["filename"].rsplit("site-packages/", 1)[-1]
        name = name.removeprefix(str(REPO) + "/")
        return f"{name}:{f['line']} {f['name']}"

    outside = [f for f in frames if "/torch/" not in f["filename"]]
    chosen = outside[0] if outside else (frames[0] if frames else None)
    return fmt(chosen) if chosen else "(no Python frame)"


def _by_caller(blocks: list[tuple[int, list[dict]]], top: int) -> list[dict]:
    """(bytes, alloc frames) grouped by :func:`_caller`, largest first."""
    groups: dict[str, list[int]] = collections.defaultdict(lambda: [0, 0])
    for n, frames in blocks:
        groups[_caller(frames)][0] += n
        groups[_caller(frames)][1] += 1
    rows = sorted(groups.items(), key=lambda kv: -kv[1][0])[:top]
    return [{"where": k, "count": c, "mib": n / MiB} for k, (n, c) in rows]


def unowned_blocks(segments: list[dict], owned: set[int], top: int) -> dict:
    """Allocated blocks of a memory snapshot that no known storage starts at, by caller.

    ``owned``: data pointers of the storages accounted for (the model's parameters, buffers
    and tensor attributes). What is left after a build is what the memory model would have
    to call a kernel cache or a leftover (issue 15: Qwen2.5-1.5B at 8 bits, 61 MiB).
    """
    blocks = [
        (b["size"], b.get("frames", []))
        for seg in segments
        for b in seg["blocks"]
        if b["state"] == "active_allocated" and b["address"] not in owned
    ]
    return {"mib": sum(n for n, _ in blocks) / MiB, "by_caller": _by_caller(blocks, top)}


def trace_peak(start: dict[int, int], entries: list[dict], owned: set[int], top: int) -> dict:
    """Replay the allocator's trace of the measured step; at its highest point, the blocks
    that neither existed at the start nor hold a storage the census saw, by caller.

    ``start``: address → size of the blocks allocated when the step began; ``entries``: the
    step's trace (alloc / free_completed, as ``torch.cuda.memory._snapshot`` records them);
    ``owned``: the census's live storages at the allocator peak. This names what the census
    cannot: bytes the allocator hands out below the dispatcher (workspaces, caches).
    """
    live = dict(start)
    frames: dict[int, list[dict]] = {}
    total = high = sum(live.values())
    at = -1
    for i, e in enumerate(entries):
        if e["action"] == "alloc":
            live[e["addr"]] = e["size"]
            total += e["size"]
        elif e["action"] == "free_completed" and e["addr"] in live:
            total -= live.pop(e["addr"])
        if total > high:
            high, at = total, i
    live = dict(start)
    for e in entries[: at + 1]:  # the live set at the highest point
        if e["action"] == "alloc":
            live[e["addr"]] = e["size"]
            frames[e["addr"]] = e.get("frames", [])
        elif e["action"] == "free_completed":
            live.pop(e["addr"], None)
            frames.pop(e["addr"], None)
    extra = [(n, frames.get(a, [])) for a, n in live.items() if a not in start and a not in owned]
    return {
        "peak_mib": high / MiB,
        "above_start_mib": (high - sum(start.values())) / MiB,
        "unowned_mib": sum(n for n, _ in extra) / MiB,
        "unowned_by_caller": _by_caller(extra, top),
    }


def _groups(items: list[tuple[int, str, tuple[int, ...], str]], top: int) -> list[dict]:
    """Live storages grouped by (op, shape, dtype), largest first."""
    groups: dict[tuple, list[int]] = collections.defaultdict(lambda: [0, 0])
    for n, op, shape, dtype in items:
        groups[(op, shape, dtype)][0] += n
        groups[(op, shape, dtype)][1] += 1
    rows = sorted(groups.items(), key=lambda kv: -kv[1][0])[:top]
    return [
        {"op": op, "shape": list(shape), "dtype": dtype, "count": c, "mib": n / MiB}
        for (op, shape, dtype), (n, c) in rows
    ]


def module_tensors(model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """(kind, tensor) for every parameter, buffer and tensor a module keeps as a plain
    attribute (kernel caches, a second qzeros copy), meta tensors left out."""
    items: list[tuple[str, object]] = []
    for name, p in model.named_parameters():
        items.append(("parameter " + ("lora" if ".lora_" in name else name.rsplit(".", 1)[-1]), p))
    for name, b in model.named_buffers():
        items.append(("buffer " + name.rsplit(".", 1)[-1], b))
    for module in model.modules():
        for attr, value in vars(module).items():
            if attr.startswith("_parameters") or attr.startswith("_buffers"):
                continue
            if isinstance(value, dict):
                value = list(value.values())
            for t in value if isinstance(value, list | tuple) else (value,):
                items.append((f"attribute {type(module).__name__}.{attr}", t))
    for kind, t in items:
        if isinstance(t, torch.Tensor) and t.device.type != "meta":
            yield kind, t


def static_census(model: torch.nn.Module) -> dict[str, float]:
    """MiB the model holds before the step, by kind: parameters and buffers by (name, dtype),
    and tensors modules keep as plain attributes (kernel caches, a second qzeros copy), each
    storage counted once.

    On the H200 the build of Qwen2.5-1.5B at 8 bits left 61 MiB beyond its weights and adapters
    where the memory model's kernel-cache term says 43 and Llama-3.2-1B's left 1 against 32
    (bench/RESULTS.md, issue 15); on CUDA, ``allocated_before_mib`` minus this total is what
    no module tensor holds.
    """
    seen: set[int] = set()
    groups: collections.Counter[str] = collections.Counter()
    for kind, t in module_tensors(model):
        storage = t.untyped_storage()
        if storage.data_ptr() in seen or storage.nbytes() == 0:
            continue
        seen.add(storage.data_ptr())
        groups[f"{kind} {str(t.dtype).removeprefix('torch.')}"] += storage.nbytes()
    return {k: n / MiB for k, n in groups.most_common()}


def _model(args: argparse.Namespace, config: Config, trainable: bool):
    """``edgeqra.measure.build_model``: the model ``memory_truth.py`` measures, on any device."""
    from transformers import AutoConfig

    from edgeqra.measure import build_model

    if args.device == "cpu" and any(c.bits < 16 for c in config):
        sys.exit("peak_census: quantized configs need --device cuda (GPTQModel's kernels)")
    hf_config = AutoConfig.from_pretrained(args.arch)
    if args.layers:
        hf_config.num_hidden_layers = args.layers
    kernels = tuple(k for k in args.kernels.split(",") if k) or None
    model, _ = build_model(
        hf_config, config, trainable=trainable,
        work_dir=Path(args.work) / hashlib.sha256(str(config).encode()).hexdigest()[:12],
        device=args.device, kernels=kernels,
    )  # fmt: skip
    return hf_config, model


def _finetune(args, model, hf_config, spec, config):
    """One warm-up step, then ``--steps`` in one ``train`` call (``measure_finetune``)."""
    from edgeqra.tune import TrainBatches, TuneSettings, train

    g = torch.Generator().manual_seed(0)
    rows = args.micro_batch * (args.steps + 1)
    ids = torch.randint(0, hf_config.vocab_size, (rows, args.seq_len), generator=g)
    batches = TrainBatches(ids, ids.clone(), torch.ones_like(ids))

    def settings(steps: int) -> TuneSettings:
        return TuneSettings(
            steps=steps, batch_size=args.micro_batch,
            gradient_checkpointing=args.checkpointing, seed=0,
        )  # fmt: skip

    work = FinetuneWorkload(args.micro_batch, args.seq_len, args.checkpointing)
    predicted = estimate(spec, config, mode=BudgetMode.FINETUNE, finetune=work).components
    terms = ("activations", "dequant_buffers", "lora_grads", "optimizer_states")
    return (
        lambda: train(model, batches, settings(1)),
        lambda: train(model, batches, settings(args.steps)),
        [args.micro_batch, args.seq_len, args.checkpointing],
        predicted,
        terms,
    )


def _inference(args, model, hf_config, spec, config):
    """``generate`` of a (context − decode) prompt and ``--decode-tokens`` greedy tokens."""
    g = torch.Generator().manual_seed(0)
    prompt = max(args.context - args.decode_tokens, 1)
    ids = torch.randint(0, hf_config.vocab_size, (args.batch, prompt), generator=g)
    ids = ids.to(args.device)
    kwargs = dict(
        do_sample=False, pad_token_id=0, eos_token_id=None, attention_mask=torch.ones_like(ids)
    )

    def generate(tokens: int) -> None:
        with torch.no_grad():
            model.generate(input_ids=ids, max_new_tokens=tokens, min_new_tokens=tokens, **kwargs)

    work = InferenceWorkload(args.batch, args.context)
    predicted = estimate(spec, config, mode=BudgetMode.INFERENCE, inference=work).components
    return (
        lambda: generate(2),
        lambda: generate(args.decode_tokens),
        [args.batch, args.context],
        predicted,
        ("activations", "kv_cache", "logits"),
    )


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--arch", default="examples/architectures/smollm2-135m", help="HF config folder")
    p.add_argument("--config", default=None, help="bits/rank per layer (default 16/8 everywhere)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--phase", choices=("finetune", "inference"), default="finetune")
    p.add_argument("--kernels", default="triton,torch", help="GPTQModel kernels (quantized)")
    p.add_argument("--batch", type=int, default=1, help="inference batch")
    p.add_argument("--context", type=int, default=4096, help="inference prompt + decoded tokens")
    p.add_argument("--decode-tokens", type=int, default=4)
    p.add_argument("--micro-batch", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--steps", type=int, default=2, help="measured steps after one warm-up")
    p.add_argument("--checkpointing", action="store_true")
    p.add_argument("--layers", type=int, default=None, help="fewer decoder layers (a smoke run)")
    p.add_argument("--top", type=int, default=25)
    p.add_argument(
        "--work", default="peak-census-work", help="folder for the random GPTQ checkpoint"
    )
    p.add_argument(
        "--snapshot", action="store_true",
        help="CUDA: record the allocator's history and name, by allocating Python frame, the "
        "blocks no module tensor holds before the step and no census tensor holds at its peak",
    )  # fmt: skip
    p.add_argument("--snapshot-entries", type=int, default=3_000_000)
    p.add_argument("--out", type=Path, default=None, help="JSON of the census")
    args = p.parse_args(argv)

    from transformers import AutoConfig

    n_layers = args.layers or AutoConfig.from_pretrained(args.arch).num_hidden_layers
    config = Config.parse(args.config) if args.config else Config.uniform(n_layers, 16, 8)
    cuda = args.device.startswith("cuda")
    if cuda:
        # GPTQModel sets PYTORCH_ALLOC_CONF (expandable segments) when imported before CUDA
        # starts, as memory_truth.py runs. The census logs of 2026-12-04 lack its "Auto
        # setting" line that memory_truth's show, and without expandable segments a large
        # block keeps an unsplit tail of up to 1 MiB: the JSON now records the setting.
        import gptqmodel  # noqa: F401
    if args.snapshot:
        if not cuda:
            sys.exit(
                "peak_census: --snapshot reads the CUDA allocator's history; use --device cuda"
            )
        # From before the build, so the blocks the build leaves carry their allocation stack.
        torch.cuda.memory._record_memory_history(max_entries=args.snapshot_entries, stacks="python")
    hf_config, model = _model(args, config, trainable=args.phase == "finetune")
    spec = ModelSpec.from_config(hf_config)
    run = _finetune if args.phase == "finetune" else _inference
    warm_up, measured, workload, predicted, step_terms = run(args, model, hf_config, spec, config)
    warm_up()
    gc.collect()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated() if cuda else 0
    ignore = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    held = static_census(model)
    if args.snapshot:
        before_snap = torch.cuda.memory._snapshot()
        dev = torch.cuda.current_device()
        n_before = len(before_snap["device_traces"][dev])
    mode = LiveTensors(args.device, ignore)
    start = time.perf_counter()
    with mode:
        measured()
    seconds = time.perf_counter() - start

    report = {
        "arch": args.arch, "config": config.short(), "device": args.device,
        "alloc_conf": os.environ.get("PYTORCH_ALLOC_CONF"),
        "phase": args.phase, "workload": workload, "seconds": seconds, "ops": mode.ops,
        "predicted_mib": {k: predicted[k] / MiB for k in (*step_terms, "cublas_workspace")},
        "predicted_step_mib": sum(predicted[k] for k in step_terms) / MiB,
        "census_peak_mib": mode.peak / MiB, "census_peak_op": mode.peak_at,
        "census_peak_set": _groups(mode.peak_set, args.top),
        "static_mib": held, "static_total_mib": sum(held.values()),
    }  # fmt: skip
    if cuda:
        peak = mode.allocator_peak or {}
        high = torch.cuda.max_memory_allocated()
        report["allocated_before_mib"] = before / MiB
        report["before_held_by_no_module_tensor_mib"] = before / MiB - sum(held.values())
        report["allocator_peak"] = {
            "op": peak.get("op"),
            "max_allocated_mib": high / MiB,
            "above_before_mib": (high - before) / MiB,
            "live_tensors_mib": peak.get("live_tensors", 0) / MiB,
            "held_by_no_tensor_mib": (high - before - peak.get("live_tensors", 0)) / MiB,
            "live_set": _groups(peak.get("live_set", []), args.top),
        }
    if args.snapshot:
        after = torch.cuda.memory._snapshot()["device_traces"][dev]
        torch.cuda.memory._record_memory_history(enabled=None)
        owned = {t.untyped_storage().data_ptr() for _, t in module_tensors(model)}
        start_blocks = {
            b["address"]: b["size"]
            for seg in before_snap["segments"]
            for b in seg["blocks"]
            if b["state"] == "active_allocated"
        }
        complete = len(after) < args.snapshot_entries  # the ring buffer did not wrap
        report["snapshot"] = {
            "trace_complete": complete,
            "before_step_unowned": unowned_blocks(before_snap["segments"], owned, args.top),
            "step": trace_peak(
                start_blocks,
                after[n_before:] if complete else [],
                (mode.allocator_peak or {}).get("live_keys", set()),
                args.top,
            ),
        }
    text = json.dumps(report, indent=2)
    if args.out:
        args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
