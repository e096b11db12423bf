"""GPTQ at several bit-widths from one Hessian per linear: the bank's fast build.

GPTQModel's own loop (:func:`~edgeqra.gptq.quantize.quantize_to_checkpoint`) quantizes a
model at one width per run and feeds each layer the outputs of the layers it already quantized, so every width needs its own
forward passes and Hessians. With inputs taken from the unquantized model instead, a linear's
Hessian H = 2/n sum x x^T is the same for every width: collect it once, then quantize each
width from a copy. Everything numerical is GPTQModel's: ``GPTQ.add_batch -> quantize -> free``,
``adopt_hessian_from`` for the per-width copies, ``SharedHessianFactorCache`` for the damped
inverse-Hessian factor (one per group of linears reading the same input, for all widths),
``create_quant_module`` + ``pack_module`` for the checkpoint tensors. What is edgeqra's own is
only the calibration forward with hooks (which ``tests/test_gptq.py`` checks against
GPTQModel: layer 0's q/k/v, whose inputs both paths see unquantized, pack bit-identically).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from torch import nn

from edgeqra.errors import ConfigError, DataError
from edgeqra.gptq.format import PACKED_SUFFIXES, SUPPORTED_BITS, check_3bit_shapes
from edgeqra.gptq.runtime import import_gptqmodel, quiet_gptqmodel

__all__ = ["quantize_shared_hessian", "saved_quantize_config"]


@contextlib.contextmanager
def _threads(n: int) -> Iterator[None]:
    """torch's intra-op thread count set to ``n`` inside the block, restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(min(n, before))
    try:
        yield
    finally:
        torch.set_num_threads(before)


class _StopForward(Exception):
    """Raised by a pre-hook to end a calibration forward after the last layer that is needed."""


class _HessianCollector:
    """Forward hooks feeding each linear's inputs to its own GPTQModel ``GPTQ`` task.

    Lifecycle: construct (hooks on), ``forward`` per calibration batch, ``remove`` (hooks off);
    then ``tasks[name]`` holds the Hessian of every linear that leads a group, and
    ``leader_of[name]`` names the linear whose identical input tensor a follower shares
    (q/k/v read one normed hidden state; GPTQModel's processor dedups them the same way).
    """

    def __init__(
        self,
        model: nn.Module,
        layers: Sequence[tuple[str, Sequence[str]]],
        qcfg: object,
        *,
        stop_at: str | None,
    ) -> None:
        import_gptqmodel()
        from gptqmodel.quantization.gptq import GPTQ

        self.model = model
        self.tasks: dict[str, GPTQ] = {}
        self.leader_of: dict[str, str] = {}
        self._seen: list[tuple[torch.Tensor, str]] = []  # this layer's inputs, kept alive
        self._hooks = []
        for layer, names in layers:
            module = model.get_submodule(layer)
            self._hooks.append(module.register_forward_pre_hook(self._new_layer))
            for name in names:
                linear = model.get_submodule(name)
                self.tasks[name] = GPTQ(linear, qcfg)
                self._hooks.append(linear.register_forward_hook(self._hook(name)))
        if stop_at is not None:  # the layers after this chunk need not run
            self._hooks.append(model.get_submodule(stop_at).register_forward_pre_hook(self._stop))

    def _new_layer(self, *_: object) -> None:
        """Inputs are compared within one decoder layer only (and freed after it)."""
        self._seen.clear()

    @staticmethod
    def _stop(*_: object) -> None:
        """End the forward pass: nothing after the chunk is needed."""
        raise _StopForward

    def _hook(self, name: str):
        """The forward hook of linear ``name``: add its input to its Hessian, unless shared."""

        def collect(module: nn.Module, inp: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
            x = inp[0]  # (batch, seq, d_in)
            for other, owner in self._seen:
                if other is x:  # the very tensor an earlier linear of this layer read
                    self.leader_of[name] = owner
                    return
            self._seen.append((x, name))
            self.tasks[name].add_batch(x, out)

        return collect

    def forward(self, ids: torch.Tensor) -> None:
        """One calibration batch (batch, seq) through the model, up to the chunk's end."""
        try:
            self.model(ids, use_cache=False)
        except _StopForward:
            pass
        self._seen.clear()

    def remove(self) -> None:
        """Take the hooks off the model."""
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()


def _chunks(units: Sequence[Sequence[tuple[str, int]]], budget: int) -> list[list[int]]:
    """Consecutive unit indices whose Hessians (d_in^2 fp32 per linear) fit ``budget`` bytes."""
    chunks: list[list[int]] = []
    used = budget + 1
    for index, linears in enumerate(units):
        need = sum(4 * d_in * d_in for _, d_in in linears)
        if used + need > budget:
            chunks.append([])
            used = 0
        chunks[-1].append(index)
        used += need
    return chunks


def saved_quantize_config(qcfg: object, *, shared_hessian: bool = True) -> dict:
    """``qcfg`` as GPTQModel's ``save_quantized`` writes quantize_config.json (the same meta).

    ``shared_hessian`` records in ``meta`` that every layer saw unquantized inputs.
    """
    import_gptqmodel()
    import gptqmodel
    from gptqmodel.quantization import config as gc

    qcfg = copy.deepcopy(qcfg)
    qcfg.meta_set_versionable(gc.META_FIELD_QUANTIZER, [f"gptqmodel:{gptqmodel.__version__}"])
    qcfg.meta_set(gc.META_FIELD_URI, gc.META_VALUE_URI)
    for key in ("damp_percent", "damp_auto_increment", "static_groups", "mse", "act_group_aware"):
        qcfg.meta_set(key, getattr(qcfg, key, None))
    qcfg.meta_set(gc.META_FIELD_TRUE_SEQUENTIAL, not shared_hessian and qcfg.true_sequential)
    qcfg.meta_set(gc.META_FIELD_GPTAQ_ENABLED, None)
    qcfg.meta_set(gc.META_FIELD_FOEM_ENABLED, None)
    if shared_hessian:
        qcfg.meta_set("edgeqra_inputs", "unquantized")  # see quantize_shared_hessian
    saved = json.loads(json.dumps(qcfg.to_dict()))
    saved.get("meta", {}).pop("offload_to_disk_path", None)  # a temp folder, gone after the build
    return saved


@functools.cache
def _kernel(bits: int, group_size: int, desc_act: bool, sym: bool, pack_dtype: torch.dtype):
    """GPTQModel's packing kernel for these settings (TorchLinear), chosen once."""
    import_gptqmodel()
    from gptqmodel import BACKEND
    from gptqmodel.utils.importer import select_quant_linear

    return select_quant_linear(
        bits=bits,
        group_size=group_size,
        desc_act=desc_act,
        sym=sym,
        device=None,
        backend=BACKEND.TORCH,
        pack=True,
        pack_dtype=pack_dtype,
    )


def _pack(name: str, linear: nn.Linear, q_weight, scale, zero, g_idx, qcfg) -> dict:
    """GPTQModel's own packer (TorchLinear + v2->v1) on one GPTQ result; tensors by checkpoint key."""
    import_gptqmodel()
    from gptqmodel.utils.model import create_quant_module, pack_module

    kernel = _kernel(qcfg.bits, qcfg.group_size, qcfg.desc_act, qcfg.sym, qcfg.pack_dtype)
    dense = nn.Linear(linear.in_features, linear.out_features, bias=linear.bias is not None)
    dense.weight.data = q_weight.to("cpu", torch.float32)  # GPTQ's Q: on the grid already
    if linear.bias is not None:
        dense.bias.data = linear.bias.detach().to("cpu", torch.float32)
    holder = nn.Module()
    holder.add_module("m", dense)
    create_quant_module(
        name="m",
        linear_cls=kernel,
        bits=qcfg.bits,
        desc_act=qcfg.desc_act,
        dynamic=None,
        group_size=qcfg.group_size,
        module=holder,
        submodule=dense,
        sym=qcfg.sym,
        device=qcfg.device,
        lm_head_name="lm_head",
        pack_dtype=qcfg.pack_dtype,
        register_buffers=False,
    )
    packed = holder.get_submodule("m")
    pack_module(
        name="m",
        qModules={"m": packed},
        q_scales=scale.to("cpu"),
        q_zeros=zero.to("cpu"),
        q_g_idx=g_idx.to("cpu"),
        layers={"m": dense},
        quant_linear_cls=kernel,
        lock=None,
        quantize_config=qcfg,
    )
    return {
        f"{name}.{suffix}": getattr(packed, suffix).detach().clone()
        for suffix in PACKED_SUFFIXES
        if getattr(packed, suffix, None) is not None
    }


def _quantize_layer(
    model: nn.Module,
    names: Sequence[str],
    collector: _HessianCollector,
    base: dict[int, object],
    tokens: int,
) -> dict[int, dict[str, torch.Tensor]]:
    """Every width of one layer's linears from their collected Hessians, packed; frees them."""
    import_gptqmodel()
    from gptqmodel.looper.gptq_processor import clone_gptq_config_for_module
    from gptqmodel.quantization.gptq import GPTQ, SharedHessianFactorCache

    caches: dict[str, SharedHessianFactorCache] = {}
    out: dict[int, dict[str, torch.Tensor]] = {b: {} for b in base}
    for name in names:
        leader = collector.leader_of.get(name, name)
        cache = caches.setdefault(leader, SharedHessianFactorCache(0, leader))
        linear = model.get_submodule(name)
        for b in base:
            qcfg = clone_gptq_config_for_module(base[b], name)
            task = GPTQ(linear, qcfg)
            task.quantizer.configure(perchannel=True)  # as GPTQProcessor.preprocess does
            task.fallback = qcfg.fallback
            task.expected_nsamples = tokens
            task.adopt_hessian_from(collector.tasks[leader])  # a private copy of H
            task.attach_shared_hessian_cache(cache)  # one damped factor per H, every width
            q_weight, scale, zero, g_idx, *_ = task.quantize()
            task.free()
            out[b].update(_pack(name, linear, q_weight, scale, zero, g_idx, qcfg))
    for name in names:
        collector.tasks.pop(name).free()
    return out


@torch.no_grad()
def quantize_shared_hessian(
    model_dir: Path,
    calibration: torch.LongTensor,
    units: Sequence[tuple[str, Sequence[str]]],
    *,
    bits: Sequence[int],
    group_size: int,
    desc_act: bool = False,
    sym: bool = True,
    seed: int = 0,
    batch_size: int = 16,
    device: str = "cpu",
    hessian_bytes: int = 2 << 30,
) -> Iterator[tuple[int, dict[int, dict[str, torch.Tensor]]]]:
    """GPTQ at every width in ``bits`` from one Hessian per linear; yields packed units in order.

    Each linear's Hessian H = 2/n sum x x^T is collected once, with GPTQModel's ``GPTQ.add_batch``,
    over forwards of the *unquantized* model; then for every width a ``GPTQ`` task adopts a copy
    (``adopt_hessian_from``), quantizes and is freed. Linears reading the same input tensor
    (q/k/v, gate/up) share one Hessian, and one ``SharedHessianFactorCache`` per such group
    computes the damped inverse-Hessian factor once for all its linears and widths (the factor
    does not depend on the width). Packing is GPTQModel's (``create_quant_module`` +
    ``pack_module``), so the tensors are the checkpoint's. GPTQModel's own loop instead feeds
    each layer the outputs of the already-quantized layers, so its Hessians differ per width;
    that costs one pass per width (the bank's ``hessian="sequential"``).

    Args:
        model_dir: dense HF folder (config.json + safetensors).
        calibration: (n, seq) token ids.
        units: per decoder layer, in order: (its module name, the full names of its linears).
        bits: widths to quantize every linear at (2, 3, 4, 8).
        group_size, desc_act, sym: GPTQ options, as in :func:`quantize_to_checkpoint`.
        seed: torch seed set before quantizing.
        batch_size: calibration rows per forward.
        device: where the forwards and GPTQ run.
        hessian_bytes: cap on the Hessians held at once; layers beyond it take another
            (truncated) forward pass over the calibration rows.

    Yields:
        (unit index, {bits: {"{module}.qweight" / .qzeros / .scales / .g_idx / .bias: tensor}})
    """
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")
    import_gptqmodel()
    from gptqmodel import QuantizeConfig
    from transformers import AutoModelForCausalLM

    bad = [b for b in bits if b not in SUPPORTED_BITS]
    if bad or not bits:
        raise ConfigError(f"`bits`={list(bits)} must be a non-empty subset of {SUPPORTED_BITS}")
    rows = calibration
    if not isinstance(rows, torch.Tensor) or rows.ndim != 2:
        raise DataError("`calibration` must be a (n, seq) LongTensor for the shared-Hessian build")
    for b in bits:
        check_3bit_shapes(Path(model_dir), b, b)
    # GPTQModel's default offload dir is a /tmp folder it leaves behind; nothing is offloaded
    # here, but give it one of ours.
    offload = tempfile.mkdtemp(prefix="edgeqra-gptq-offload-")
    base = {
        b: QuantizeConfig(
            bits=b,
            group_size=group_size,
            desc_act=desc_act,
            sym=sym,
            offload_to_disk_path=offload,
        )
        for b in bits
    }
    torch.manual_seed(seed)
    with quiet_gptqmodel():
        model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    model.to(device).eval()
    layer_names = [layer for layer, _ in units]
    linears = [list(names) for _, names in units]
    shapes = [[(n, model.get_submodule(n).in_features) for n in names] for names in linears]
    tokens = rows.numel()
    for chunk in _chunks(shapes, hessian_bytes):
        after = layer_names[chunk[-1] + 1] if chunk[-1] + 1 < len(units) else None
        collector = _HessianCollector(
            model, [(layer_names[i], linears[i]) for i in chunk], base[bits[0]], stop_at=after
        )
        try:
            for start in range(0, rows.shape[0], batch_size):
                collector.forward(rows[start : start + batch_size].to(device))  # (batch, seq)
        finally:
            collector.remove()
        for index in chunk:
            # GPTQModel logs every kernel choice and pack to stdout. Its CPU column loop is
            # thousands of ops too small to gain from a second thread, and on a busy 2-core
            # machine two threads wait on each other: 0.65 s vs 3.5-15 s for one 1536x576
            # linear at load 5 (bench/bank_speed.py; the forward keeps every thread).
            with quiet_gptqmodel(), _threads(1):
                out = _quantize_layer(model, linears[index], collector, base, tokens)
            yield index, out
    del model
    shutil.rmtree(offload, ignore_errors=True)
