"""What is alive at a LoRA step's memory peak: a census of every tensor ATen returns.

    # CPU (the FP16 LoRA model; seconds to minutes):
    python bench/peak_census.py --arch examples/architectures/smollm2-135m --device cpu
    # GPU (issue 15: which bytes the memory model misses; a quantized config needs GPTQModel):
    python bench/peak_census.py --arch examples/architectures/smollm2-135m --device cuda \\
        --config 16/8x30 --out $OUT/census.json

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
import json
import sys
import time
import weakref
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from edgeqra.memory import ModelSpec, estimate
from edgeqra.profiles import BudgetMode, FinetuneWorkload
from edgeqra.space import Config

MiB = 2**20


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
                }
        return out


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


def _model(args: argparse.Namespace, config: Config):
    from transformers import AutoConfig

    hf_config = AutoConfig.from_pretrained(args.arch)
    if args.layers:
        hf_config.num_hidden_layers = args.layers
    if all(c.bits >= 16 for c in config) or args.device == "cpu":
        from transformers import AutoModelForCausalLM

        from edgeqra.models import find_units
        from edgeqra.tune import TuneSettings, attach_lora

        if any(c.bits < 16 for c in config):
            sys.exit("peak_census: quantized configs need --device cuda (GPTQModel's kernels)")
        torch.manual_seed(0)
        with torch.device(args.device):
            base = AutoModelForCausalLM.from_config(hf_config, dtype=torch.bfloat16)
        base.eval()
        model = attach_lora(base, find_units(base), config, TuneSettings(steps=0, seed=0))
    else:
        from edgeqra.measure import build_model

        model, _ = build_model(
            hf_config, config, trainable=True, work_dir=Path(args.work), device=args.device
        )
    return hf_config, model


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--arch", default="examples/architectures/smollm2-135m", help="HF config folder")
    p.add_argument("--config", default=None, help="bits/rank per layer (default 16/8 everywhere)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--micro-batch", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--steps", type=int, default=2, help="measured steps after one warm-up")
    p.add_argument("--checkpointing", action="store_true")
    p.add_argument("--layers", type=int, default=None, help="fewer decoder layers (a smoke run)")
    p.add_argument("--top", type=int, default=25)
    p.add_argument(
        "--work", default="peak-census-work", help="folder for the random GPTQ checkpoint"
    )
    p.add_argument("--out", type=Path, default=None, help="JSON of the census")
    args = p.parse_args(argv)

    from transformers import AutoConfig

    n_layers = args.layers or AutoConfig.from_pretrained(args.arch).num_hidden_layers
    config = Config.parse(args.config) if args.config else Config.uniform(n_layers, 16, 8)
    hf_config, model = _model(args, config)
    spec = ModelSpec.from_config(hf_config)

    from edgeqra.tune import TrainBatches, TuneSettings, train

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(
        0, hf_config.vocab_size, (args.micro_batch * (args.steps + 1), args.seq_len), generator=g
    )
    batches = TrainBatches(ids, ids.clone(), torch.ones_like(ids))
    settings = TuneSettings(
        steps=1, batch_size=args.micro_batch, gradient_checkpointing=args.checkpointing, seed=0
    )
    train(model, batches, settings)  # warm-up: kernels, cuBLAS handles
    gc.collect()
    cuda = args.device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated() if cuda else 0
    ignore = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    mode = LiveTensors(args.device, ignore)
    start = time.perf_counter()
    with mode:
        train(model, batches, TuneSettings(
            steps=args.steps, batch_size=args.micro_batch,
            gradient_checkpointing=args.checkpointing, seed=0,
        ))  # fmt: skip
    seconds = time.perf_counter() - start

    work = FinetuneWorkload(args.micro_batch, args.seq_len, args.checkpointing)
    predicted = estimate(spec, config, mode=BudgetMode.FINETUNE, finetune=work).components
    step_terms = ("activations", "dequant_buffers", "lora_grads", "optimizer_states")
    report = {
        "arch": args.arch, "config": config.short(), "device": args.device,
        "workload": [args.micro_batch, args.seq_len, args.checkpointing],
        "seconds": seconds, "ops": mode.ops,
        "predicted_mib": {k: predicted[k] / MiB for k in (*step_terms, "cublas_workspace")},
        "predicted_step_mib": sum(predicted[k] for k in step_terms) / MiB,
        "census_peak_mib": mode.peak / MiB, "census_peak_op": mode.peak_at,
        "census_peak_set": _groups(mode.peak_set, args.top),
    }  # fmt: skip
    if cuda:
        peak = mode.allocator_peak or {}
        report["allocated_before_mib"] = before / MiB
        report["allocator_peak"] = {
            "op": peak.get("op"),
            "max_allocated_mib": torch.cuda.max_memory_allocated() / MiB,
            "above_before_mib": (torch.cuda.max_memory_allocated() - before) / MiB,
            "live_tensors_mib": peak.get("live_tensors", 0) / MiB,
            "held_by_no_tensor_mib": (
                torch.cuda.max_memory_allocated() - before - peak.get("live_tensors", 0)
            ) / MiB,
            "live_set": _groups(peak.get("live_set", []), args.top),
        }  # fmt: skip
    text = json.dumps(report, indent=2)
    if args.out:
        args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
