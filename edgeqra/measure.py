"""Measured peak memory of a config on a CUDA GPU, next to the memory model's prediction.

Issue 4: a device profile is a hard budget, so the memory model's error is a measured figure.
A config is built with random weights of the right shapes (``edgeqra.gptq.write_random_checkpoint``
loaded through ``GPTQModel.load``, or a dense random model for all-16-bit configs): memory does
not depend on weight values. Then, on the profile's workloads:

* inference: ``generate`` over ``batch`` prompts filling ``context`` tokens (prefill plus
  ``decode_tokens`` greedy steps with the KV cache), adapters unmerged in the compute dtype
  (the exact form ``memory.estimate(merged_adapters=False)`` counts), GPTQModel's AUTO kernels;
* fine-tuning: ``tune.train`` steps (AdamW, the loss edgeqra trains with) on ``micro_batch`` ×
  ``seq_len`` tokens with and without gradient checkpointing, trainable kernels. One step
  warms up (kernel compilation, first allocations); the measured run's second step has the
  optimizer states, gradients and activations alive together, as the model assumes.

Three readings per phase: PyTorch's peak allocated bytes (compare with the prediction without
the runtime reserve), its peak reserved bytes, and the process peak = peak reserved + what the
process holds outside PyTorch's allocator (CUDA context, library workspaces), read from NVML
(or ``torch.cuda.mem_get_info``) after the phase (compare with the prediction with reserve).
Error % = (predicted − measured) / measured: positive means the model over-estimates (safe).
"""

from __future__ import annotations

import gc
import logging
import os
import re
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from torch import nn

from edgeqra.memory import ModelSpec, QuantizedBackward, estimate
from edgeqra.models import find_units
from edgeqra.profiles import BudgetMode, DeviceProfile, FinetuneWorkload, InferenceWorkload
from edgeqra.space import FP16_BITS, Config

__all__ = [
    "CapResult",
    "Reading",
    "build_model",
    "capped_run",
    "cuda_context_bytes",
    "dry_run",
    "measure_config",
    "measure_finetune",
    "measure_inference",
    "percent_error",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Reading:
    """Peak memory of one measured phase, in bytes."""

    peak_allocated: int  # torch.cuda.max_memory_allocated over the phase
    peak_reserved: int  # torch.cuda.max_memory_reserved over the phase
    process_peak: int  # peak_reserved + the process's memory outside the allocator
    start_allocated: int  # allocated when the phase began (weights, adapters)
    seconds: float
    source: str  # where the outside-the-allocator figure came from: "nvml" or "mem_get_info"


def percent_error(predicted: int, measured: int) -> float:
    """(predicted − measured) / measured in percent; positive = over-estimate."""
    return 100.0 * (predicted - measured) / measured


def _process_used(device: torch.device) -> tuple[int, str]:
    """Bytes this process holds on the GPU: NVML's per-process figure, else device-wide use."""
    try:
        import pynvml

        pynvml.nvmlInit()
        index = device.index if device.index is not None else torch.cuda.current_device()
        handle = pynvml.nvmlDeviceGetHandleByIndex(index)
        for proc in pynvml.nvmlDeviceGetComputeRunningProcesses(handle):
            if proc.pid == os.getpid() and proc.usedGpuMemory:
                return int(proc.usedGpuMemory), "nvml"
    except Exception:  # noqa: BLE001 - NVML missing or pid namespaces hide us: fall back
        log.debug("NVML per-process memory unavailable", exc_info=True)
    free, total = torch.cuda.mem_get_info(device)
    return int(total - free), "mem_get_info"


def cuda_context_bytes(device: torch.device | str = "cuda") -> int:
    """What the process holds on the GPU outside PyTorch's allocator (CUDA context and co.)."""
    device = torch.device(device)
    torch.cuda.init()
    torch.empty(1, device=device)  # make sure the context exists
    used, _ = _process_used(device)
    return used - torch.cuda.memory_reserved(device)


@contextmanager
def _phase(device: torch.device, out: list[Reading]) -> Iterator[None]:
    """Reset the peak counters, run the body, append its Reading."""
    gc.collect()
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()  # an earlier phase's cached blocks are not this phase's
    torch.cuda.reset_peak_memory_stats(device)
    start = torch.cuda.memory_allocated(device)
    t0 = time.perf_counter()
    yield
    torch.cuda.synchronize(device)
    seconds = time.perf_counter() - t0
    used, source = _process_used(device)
    outside = used - torch.cuda.memory_reserved(device)
    peak_reserved = torch.cuda.max_memory_reserved(device)
    out.append(
        Reading(
            torch.cuda.max_memory_allocated(device),
            peak_reserved,
            peak_reserved + outside,
            start,
            seconds,
            source,
        )
    )


def _device(model: nn.Module) -> torch.device:
    """The model's first parameter's device."""
    return next(model.parameters()).device


def measure_inference(
    model: nn.Module, work: InferenceWorkload, *, decode_tokens: int = 4, seed: int = 0
) -> Reading:
    """Peak memory of ``generate``: batch × (context − decode_tokens) prompt, greedy decode."""
    device = _device(model)
    vocab = model.config.get_text_config().vocab_size
    prompt = max(work.context - decode_tokens, 1)
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (work.batch, prompt), generator=g).to(device)
    kwargs = dict(
        do_sample=False, pad_token_id=0, eos_token_id=None, attention_mask=torch.ones_like(ids)
    )
    with torch.no_grad():
        # Warm-up at the measured shapes: Triton compiles and autotunes per shape, and that
        # stays out of the measured phase.
        model.generate(input_ids=ids, max_new_tokens=2, min_new_tokens=2, **kwargs)
        readings: list[Reading] = []
        with _phase(device, readings):
            model.generate(
                input_ids=ids,
                max_new_tokens=decode_tokens,
                min_new_tokens=decode_tokens,
                **kwargs,
            )
    return readings[0]


def measure_finetune(
    model: nn.Module,
    work: FinetuneWorkload,
    *,
    steps: int = 2,
    seed: int = 0,
) -> Reading:
    """Peak memory of ``steps`` LoRA steps (after one warm-up step) at micro_batch × seq_len."""
    from edgeqra.tune import TrainBatches, TuneSettings, train

    device = _device(model)
    vocab = model.config.get_text_config().vocab_size if hasattr(model, "config") else None
    g = torch.Generator().manual_seed(seed)
    rows = work.micro_batch * (steps + 1)
    ids = torch.randint(0, vocab, (rows, work.seq_len), generator=g)  # (rows, seq)
    batches = TrainBatches(ids, ids.clone(), torch.ones_like(ids))
    settings = TuneSettings(
        steps=1,
        batch_size=work.micro_batch,
        gradient_checkpointing=work.gradient_checkpointing,
        seed=seed,
    )
    train(model, batches, settings)  # warm-up: compiled kernels, cuBLAS handles
    readings: list[Reading] = []
    with _phase(device, readings):
        train(model, batches, replace(settings, steps=steps))
    return readings[0]


def build_model(
    hf_config: object,
    config: Config,
    *,
    trainable: bool,
    work_dir: Path,
    device: str = "cuda",
    dtype: torch.dtype = torch.bfloat16,
    group_size: int = 64,
    kernels: Sequence[str] | None = None,
    seed: int = 0,
    quantized_backward: QuantizedBackward | str = QuantizedBackward.RECOMPUTE,
) -> tuple[nn.Module, dict[int, str]]:
    """Random-weight model of ``config`` with its adapters; returns it and its kernels by bits.

    All-16-bit: a dense random model built on the device. Otherwise a random GPTQ checkpoint
    (written once into ``work_dir``/checkpoint, reused) loaded through GPTQModel with the
    trainable (``trainable``) or inference kernels; a trainable one gets edgeqra's recompute
    backward (``edgeqra.qlinear``) unless ``quantized_backward`` is ``saved`` (GPTQModel's own
    path, for comparison). Inference adapters are cast to ``dtype``.
    """
    from edgeqra.gptq import kernels_by_bits, load_gptq, meta_model, write_random_checkpoint
    from edgeqra.tune import TuneSettings, attach_lora

    if all(c.bits >= FP16_BITS for c in config):
        from transformers import AutoModelForCausalLM

        torch.manual_seed(seed)
        with torch.device(device):
            base = AutoModelForCausalLM.from_config(hf_config, dtype=dtype)
        base.eval()
        chosen: dict[int, str] = {}
    else:
        checkpoint = Path(work_dir) / "checkpoint"
        if not checkpoint.exists():
            write_random_checkpoint(
                hf_config, config, checkpoint, group_size=group_size, dtype=dtype, seed=seed
            )
        base = load_gptq(
            checkpoint, device=device, dtype=dtype, trainable=trainable, kernels=kernels
        )
        chosen = kernels_by_bits(base)
        if trainable and QuantizedBackward(quantized_backward) is QuantizedBackward.RECOMPUTE:
            from edgeqra.qlinear import enable_recompute_backward

            enable_recompute_backward(base)
    # Units from the architecture: a GPTQ model's linears are QuantLinear, not nn.Linear.
    units = find_units(meta_model(hf_config))
    model = attach_lora(base, units, config, TuneSettings(steps=0, seed=seed))
    if not trainable:
        _cast_adapters(model, dtype)
    return model, chosen


_INFERENCE_ONLY = frozenset({"marlin", "machete", "exllama_v2"})  # SUPPORTS_TRAINING = False


def _cast_adapters(model: nn.Module, dtype: torch.dtype) -> None:
    """Put every LoRA tensor in ``dtype`` (values do not matter for memory)."""
    for name, param in model.named_parameters():
        if ".lora_" in name and param.dtype != dtype:
            param.data = param.data.to(dtype)


def _release() -> None:
    """Give freed memory back to the driver before the next build (callers drop refs first).

    cuBLAS workspaces too (one per thread that ran a matmul, never freed otherwise), so that
    a phase holds only the handles it uses itself, as in a fresh process.
    """
    gc.collect()
    clear = getattr(torch._C, "_cuda_clearCublasWorkspaces", None)
    if clear is not None:
        clear()
    torch.cuda.empty_cache()


def _log_failure(exc: BaseException, what: str, *args: object) -> None:
    """Log a failed build or measurement; an out-of-memory error is a result, not an error.

    Under ``plan --measure --cap`` (and in a grid's largest rows) running out of memory is the
    expected outcome: it is recorded in the phase (``oom``) and reported in one line by the
    caller, so its traceback goes to DEBUG (``--verbose``). Anything else is logged at ERROR
    with its traceback.
    """
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        log.debug(what + " ran out of memory", *args, exc_info=exc)
    else:
        log.error(what + " failed", *args, exc_info=exc)


def measure_config(
    hf_config: object,
    config: Config,
    profile: DeviceProfile,
    *,
    work_dir: Path,
    modes: Sequence[str] = ("inference", "finetune"),
    checkpointing: Sequence[bool] = (False, True),
    group_size: int = 64,
    kernels: Sequence[str] | None = None,
    decode_tokens: int = 4,
    finetune_steps: int = 2,
    seed: int = 0,
    device: str = "cuda",
    quantized_backward: QuantizedBackward | str = QuantizedBackward.RECOMPUTE,
) -> dict[str, object]:
    """Predicted and measured memory of one config on the profile's workloads (JSON-ready).

    ``phases`` holds one entry per measured phase: its workload, the predicted components
    (the total with and without the profile's reserve) and the Reading, or ``error`` when the
    phase failed (out of memory: ``oom`` true; a kernel that does not run). Predictions use
    this GPU's compute capability (its cuBLAS workspace size) and ``quantized_backward``,
    the path the fine-tuning phases run.
    """
    spec = ModelSpec.from_config(hf_config)
    backward = QuantizedBackward(quantized_backward)
    capability = torch.cuda.get_device_capability(device)
    record: dict[str, object] = {
        "config": config.short(),
        "average_bits": round(config.average_bits(spec.unit_params), 4),
        "kernels": {},
        "phases": [],
    }
    phases: list[dict[str, object]] = record["phases"]  # type: ignore[assignment]
    # Without inference-only kernels both phases get the same modules: load once.
    share = kernels is not None and not set(kernels) & _INFERENCE_ONLY
    model = None
    for mode in modes:
        trainable = mode == "finetune"
        t0 = time.perf_counter()
        if model is None or not share:
            try:
                model, chosen = build_model(
                    hf_config,
                    config,
                    trainable=trainable or share,
                    work_dir=work_dir,
                    device=device,
                    group_size=group_size,
                    kernels=kernels,
                    seed=seed,
                    quantized_backward=backward,
                )
            except Exception as exc:  # noqa: BLE001 - record and go on with the grid
                _log_failure(exc, "building %s for %s", config.short(), mode)
                phases.append(
                    {
                        "mode": mode,
                        "error": f"build: {type(exc).__name__}: {exc}",
                        "oom": isinstance(exc, torch.cuda.OutOfMemoryError),
                    }
                )
                model = None
                _release()
                continue
        # Adapters: fp32 to train (PEFT's default), the compute dtype for inference.
        _cast_adapters(model, torch.float32 if trainable else torch.bfloat16)
        record["kernels"][mode] = {str(b): k for b, k in chosen.items()}  # type: ignore[index]
        record[f"allocated_after_build_{mode}"] = torch.cuda.memory_allocated(device)
        record[f"build_seconds_{mode}"] = round(time.perf_counter() - t0, 2)
        works: list[InferenceWorkload | FinetuneWorkload]
        if trainable:
            works = [replace(profile.finetune, gradient_checkpointing=c) for c in checkpointing]
        else:
            works = [profile.inference]
        for work in works:
            bmode = BudgetMode.FINETUNE if trainable else BudgetMode.INFERENCE
            predicted = estimate(
                spec,
                config,
                mode=bmode,
                inference=work if not trainable else None,
                finetune=work if trainable else None,
                reserve_bytes=profile.reserve_bytes,
                group_size=group_size,
                compute_capability=capability,
                quantized_backward=backward,
            )
            entry: dict[str, object] = {
                "mode": mode,
                "workload": asdict(work),
                "quantized_backward": backward.value,
                "predicted": predicted.components,
                "predicted_total": predicted.total,
                "predicted_without_reserve": predicted.total - profile.reserve_bytes,
            }
            try:
                if trainable:
                    reading = measure_finetune(model, work, steps=finetune_steps, seed=seed)
                else:
                    reading = measure_inference(model, work, decode_tokens=decode_tokens, seed=seed)
            except Exception as exc:  # noqa: BLE001 - an OOM or kernel failure is a result too
                _log_failure(exc, "measuring %s %s", config.short(), mode)
                entry["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
                entry["oom"] = isinstance(exc, torch.cuda.OutOfMemoryError)
                gc.collect()
                torch.cuda.empty_cache()
            else:
                entry["measured"] = asdict(reading)
                entry["error_allocated_pct"] = round(
                    percent_error(entry["predicted_without_reserve"], reading.peak_allocated), 2
                )
                entry["error_process_pct"] = round(
                    percent_error(predicted.total, reading.process_peak), 2
                )
            phases.append(entry)
        if not share:
            model = None
            _release()
    model = None
    _release()
    return record


@dataclass(frozen=True)
class CapResult:
    """A config run under the profile's budget as a hard per-process GPU memory cap."""

    config: str
    budget_bytes: int  # the profile's budget (memory_gib - os_reserved_gib)
    outside_bytes: int  # what the process holds outside PyTorch's allocator (CUDA context)
    cap_bytes: int  # what the allocator may use: budget - outside
    record: dict  # measure_config's record (phases, predictions, readings or errors)
    overrun: str | None  # one line naming the phase that ran out of the cap, or None

    @property
    def fits(self) -> bool:
        """Whether every phase ran inside the cap."""
        return self.overrun is None


def _gib(n: float) -> str:
    return f"{n / (1 << 30):.2f} GiB"


def capped_run(
    hf_config: object,
    config: Config,
    profile: DeviceProfile,
    *,
    work_dir: Path,
    group_size: int = 64,
    finetune_steps: int = 2,
    device: str = "cuda",
) -> CapResult:
    """Run ``config``'s inference and a few LoRA steps inside the profile's budget (issue 15).

    ``torch.cuda.set_per_process_memory_fraction`` caps PyTorch's allocator at the budget
    less what the process already holds outside it (CUDA context, libraries), so a big GPU
    behaves like the device: a config that fits runs, one that does not hits an out-of-memory
    error in the phase that overruns. The profile's workloads and kernels are used, and
    cuBLAS gets the profile's device's default workspace size; the cap is lifted afterwards.

    Raises:
        ModelError: no CUDA GPU, or this GPU has less memory than the budget to emulate.
        BudgetError: the CUDA context alone leaves nothing of the budget.
    """
    from edgeqra.errors import BudgetError, ModelError

    if not torch.cuda.is_available():
        raise ModelError(
            "`plan --measure --cap` needs a CUDA GPU and none is visible; run it on a GPU with "
            f"at least the profile's {_gib(profile.budget_bytes)}"
        )
    dev = torch.device(device)
    if dev.index is None:  # the allocator's cap needs an index: "cuda" means the current one
        dev = torch.device("cuda", torch.cuda.current_device())
    total = torch.cuda.get_device_properties(dev).total_memory
    if profile.budget_bytes > total:
        raise ModelError(
            f"this GPU has {_gib(total)}, less than profile `{profile.name}`'s budget of "
            f"{_gib(profile.budget_bytes)}: the cap cannot be emulated here; use a larger GPU"
        )
    # cuBLAS sizes its workspace per GPU (32 MiB on sm_90, 8.125 MiB elsewhere): give this
    # one the profile's device's default, as the memory model assumes, unless the user chose.
    if "CUBLAS_WORKSPACE_CONFIG" not in os.environ:
        sm90 = profile.compute_capability_tuple == (9, 0)
        os.environ["CUBLAS_WORKSPACE_CONFIG"] = ":4096:8" if sm90 else ":4096:2:16:8"
    _release()
    outside = max(cuda_context_bytes(dev), 0)
    cap = profile.budget_bytes - outside - torch.cuda.memory_reserved(dev)
    if cap <= 0:
        raise BudgetError(
            f"the CUDA context ({_gib(outside)}) fills profile `{profile.name}`'s budget of "
            f"{_gib(profile.budget_bytes)}; nothing can run on it"
        )
    modes = ["inference", "finetune"] if profile.mode is BudgetMode.BOTH else [profile.mode.value]
    torch.cuda.set_per_process_memory_fraction((cap + torch.cuda.memory_reserved(dev)) / total, dev)
    try:
        record = measure_config(
            hf_config,
            config,
            profile,
            work_dir=work_dir,
            modes=modes,
            checkpointing=(profile.finetune.gradient_checkpointing,),
            group_size=group_size,
            kernels=profile.kernels,
            finetune_steps=finetune_steps,
            device=device,
        )
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, dev)
        _release()
    overrun = None
    for ph in record["phases"]:
        if "error" not in ph:
            continue
        name = ph["mode"]
        if ph.get("workload", {}).get("gradient_checkpointing"):
            name += " (gradient checkpointing)"
        first_line = str(ph["error"]).splitlines()[0][:160]
        if not ph.get("oom"):
            raise RuntimeError(f"{name} of {config.short()} failed, not for memory: {first_line}")
        first_line = _oom_summary(str(ph["error"]))
        predicted = ph.get("predicted_total")
        overrun = (
            f"{name} of {config.short()} needs more than profile `{profile.name}`'s budget of "
            f"{_gib(profile.budget_bytes)} ({_gib(cap)} for PyTorch after {_gib(outside)} "
            f"outside it)"
            + (f"; predicted {_gib(predicted)}" if predicted is not None else "")
            + f": {first_line}"
        )
        break
    return CapResult(config.short(), profile.budget_bytes, outside, cap, record, overrun)


def _oom_summary(error: str) -> str:
    """torch's out-of-memory message, cut to what the user needs: where and how much.

    The full message runs on for a paragraph about this big GPU's free memory and the
    allocator's settings, which say nothing about the emulated device (the H200 cap run of
    2026-12-04 printed it cut mid-word).
    """
    where = "while building the model" if error.startswith("build:") else "in the run"
    asked = re.search(r"Tried to allocate ([\d.]+ [KMGT]?i?B)", error)
    return f"out of memory {where}" + (f" (tried to allocate {asked.group(1)})" if asked else "")


def dry_run(
    hf_config: object,
    config: Config,
    *,
    work_dir: Path | None = None,
    group_size: int = 64,
    seed: int = 0,
) -> dict[str, int]:
    """CPU check of the weight term: predicted bytes vs the checkpoint's and the built model's.

    Always: the tensors a GPTQ checkpoint of ``config`` holds (``gptq.checkpoint_plan``,
    no data). With ``work_dir``: the checkpoint is written and loaded through GPTQModel
    (torch kernel, bf16) and the loaded modules' bytes are counted (``gptq.module_bytes``).
    """
    from edgeqra.gptq import checkpoint_plan, load_gptq, module_bytes, write_random_checkpoint

    spec = ModelSpec.from_config(hf_config)
    work = InferenceWorkload(batch=1, context=1)
    predicted = estimate(
        spec, config, mode=BudgetMode.INFERENCE, inference=work, group_size=group_size
    ).components
    out = {
        "predicted_quantized": predicted["quantized_weights"],
        "predicted_dense": predicted["unquantized_weights"],
    }
    if all(c.bits >= FP16_BITS for c in config):
        out["plan_quantized"] = 0
        out["plan_dense"] = 2 * (sum(spec.unit_params) + spec.other_numel) + 2 * sum(
            lin.d_out for u in spec.units for lin in u.linears if lin.bias
        )
    else:
        plan = checkpoint_plan(hf_config, config, group_size=group_size)
        quantized = {n.rpartition(".")[0] for n in plan if n.endswith(".qweight")}
        out["plan_quantized"] = sum(
            t.nbytes for n, t in plan.items() if n.rpartition(".")[0] in quantized
        )
        out["plan_dense"] = sum(
            t.nbytes for n, t in plan.items() if n.rpartition(".")[0] not in quantized
        )
    if work_dir is None:
        return out
    if all(c.bits >= FP16_BITS for c in config):
        from transformers import AutoModelForCausalLM

        with torch.device("cpu"):
            model = AutoModelForCausalLM.from_config(hf_config, dtype=torch.bfloat16)
    else:
        path = write_random_checkpoint(
            hf_config, config, Path(work_dir) / "checkpoint", group_size=group_size, seed=seed
        )
        model = load_gptq(path, device="cpu", dtype=torch.bfloat16)
    built = module_bytes(model)
    out.update(
        built_quantized=built["quantized"],
        built_dense=built["dense"],
        built_other=built["other"],
    )
    del model
    gc.collect()
    return out
