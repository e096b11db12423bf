"""Torch-Pruning's DepGraph as :mod:`edgeqra.prune` uses it: trace once, read each layer's
coupled channels, prune them by index (used by edgeqra.prune only; its module docstring of edgeqra.prune says why
the trace runs with RoPE as the identity and eager attention).

An *item* is ``(dep, idxs, root_idxs)``: one coupled nn.Linear side of a group, with its own
indices and the root layer's numbering of the same channels.
"""

from __future__ import annotations

import contextlib
import sys
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from edgeqra.prune_settings import PruneError, PruneTarget

__all__ = [
    "Item",
    "Layer",
    "check_layer",
    "couple",
    "dependency_graph",
    "find_layers",
    "prune_items",
    "subgroup",
    "traceable",
]

Item = tuple[Any, list[int], list[int]]  # (dependency, idxs, root_idxs)


@dataclass(frozen=True)
class Layer:
    """The linears of one decoder layer that pruning touches."""

    name: str
    q: nn.Linear
    k: nn.Linear
    v: nn.Linear
    o: nn.Linear
    gate: nn.Linear
    up: nn.Linear
    down: nn.Linear
    attention: nn.Module
    mlp: nn.Module


def find_layers(model: nn.Module) -> list[Layer]:
    """Each decoder layer's q/k/v/o and gate/up/down linears, or a PruneError naming what lacks."""
    from edgeqra.models import find_units

    names = dict(model.named_modules())
    out = []
    for unit in find_units(model):
        layer = names[unit.name]
        attn = getattr(layer, "self_attn", None)
        mlp = getattr(layer, "mlp", None)
        parts = {
            "q": getattr(attn, "q_proj", None),
            "k": getattr(attn, "k_proj", None),
            "v": getattr(attn, "v_proj", None),
            "o": getattr(attn, "o_proj", None),
            "gate": getattr(mlp, "gate_proj", None),
            "up": getattr(mlp, "up_proj", None),
            "down": getattr(mlp, "down_proj", None),
        }
        missing = [k for k, m in parts.items() if not isinstance(m, nn.Linear)]
        if missing:
            raise PruneError(
                f"cannot prune `{type(model).__name__}`: decoder layer `{unit.name}` has no "
                f"nn.Linear {', '.join(missing)} (self_attn.q/k/v/o_proj and "
                "mlp.gate/up/down_proj, as in Llama, Qwen2, Gemma3); fused or other layouts "
                "are not supported"
            )
        out.append(Layer(unit.name, attention=attn, mlp=mlp, **parts))  # type: ignore[arg-type]
    return out


class _RunawayTrace(Exception):
    """DepGraph kept adding dependencies: its index mapping loops (Torch-Pruning#527)."""


@contextlib.contextmanager
def _bounded_groups(limit: int) -> Iterator[None]:
    """Raise :class:`_RunawayTrace` once a group grows past ``limit`` dependencies."""
    from torch_pruning.dependency.group import Group

    original = Group.add_dep

    def add_dep(self, dep, idxs):  # noqa: ANN001 - Torch-Pruning's signature
        if len(self._group) >= limit:
            raise _RunawayTrace
        original(self, dep, idxs)

    Group.add_dep = add_dep
    try:
        yield
    finally:
        Group.add_dep = original


@contextlib.contextmanager
def traceable(model: nn.Module, layers: list[Layer]) -> Iterator[None]:
    """Eager attention and RoPE as the identity while DepGraph traces (module docstring).

    The RoPE patch is process-wide (the modelling module's global) for the one traced forward
    pass; nothing else runs a model of that class meanwhile (pruning precedes every search).
    """
    patched = []
    for mod in {sys.modules[type(layer.attention).__module__] for layer in layers}:
        rope = getattr(mod, "apply_rotary_pos_emb", None)
        if callable(rope):
            patched.append((mod, rope))
            mod.apply_rotary_pos_emb = lambda q, k, *args, **kwargs: (q, k)
    previous = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        yield
    finally:
        for mod, rope in patched:
            mod.apply_rotary_pos_emb = rope
        if previous is not None:
            model.set_attn_implementation(previous)


def dependency_graph(model: nn.Module, layers: list[Layer]) -> Any:
    """Torch-Pruning's DependencyGraph of the whole model (one short trace)."""
    import torch_pruning as tp

    vocab = int(model.config.get_text_config().vocab_size)
    ids = torch.arange(8, device=next(model.parameters()).device).remainder(vocab)[None]
    with traceable(model, layers), torch.enable_grad(), warnings.catch_warnings():
        # Norm weights are "unwrapped parameters" to DepGraph; no group here ever prunes them.
        warnings.filterwarnings("ignore", message="Unwrapped parameters detected")
        try:
            return tp.DependencyGraph().build_dependency(
                model, example_inputs=ids, output_transform=lambda out: out.logits
            )
        except (RuntimeError, TypeError, AttributeError) as exc:
            raise PruneError(
                f"Torch-Pruning cannot trace `{type(model).__name__}` ({exc}); edgeqra prunes "
                "decoder-only models such as Llama, Qwen2 and Gemma3"
            ) from exc


def group_of(dg: Any, module: nn.Module, idxs: list[int], what: str, limit: int) -> Any:
    """DepGraph's group of ``module``'s output channels ``idxs`` (a PruneError if it runs away)."""
    import torch_pruning as tp

    try:
        with _bounded_groups(limit):
            return dg.get_pruning_group(module, tp.prune_linear_out_channels, idxs=idxs)
    except _RunawayTrace:
        raise PruneError(
            f"Torch-Pruning cannot trace `{what}`: its dependency graph does not close (more "
            f"than {limit} coupled operations; Torch-Pruning#527); this architecture is not "
            "supported"
        ) from None


def linear_items(dg: Any, group: Any) -> dict[tuple[int, str], Item]:
    """The group's nn.Linear targets: (id(module), "in"/"out") -> (dep, idxs, root_idxs)."""
    out = {}
    for item in group:
        module = item.dep.target.module
        if isinstance(module, nn.Linear):
            side = "out" if dg.is_out_channel_pruning_fn(item.dep.handler) else "in"
            out[(id(module), side)] = (item.dep, list(item.idxs), list(item.root_idxs))
    return out


def subgroup(dg: Any, items: list[Item]) -> Any:
    """A Torch-Pruning Group of just these (dep, idxs, root_idxs) items."""
    from torch_pruning.dependency.group import Group

    group = Group()
    group._DG = dg
    for dep, idxs, root in items:
        group.add_dep(dep, idxs)
        group[len(group) - 1].root_idxs = root
    return group


def unexpected(dg: Any, group: Any, allowed: set[int], names: dict[int, str]) -> list[str]:
    """Parametric targets of ``group`` outside ``allowed`` (head-dim norms are expected)."""
    bad = []
    for item in group:
        module = item.dep.target.module
        if isinstance(module, nn.Parameter):
            continue  # q_norm / k_norm weights over head_dim: whole heads never shrink them
        if isinstance(module, nn.Module) and any(True for _ in module.parameters(recurse=False)):
            if id(module) not in allowed:
                bad.append(names.get(id(module), type(module).__name__))
    return bad


def kv_groups(
    dg: Any, layer: Layer, heads: int, kv: int, d: int, limit: int
) -> list[tuple[int, ...]]:
    """Query heads per key-value head, as DepGraph couples q rows with k/v rows (GQA check).

    HF's ``repeat_kv`` gives query head h the key-value head h // (heads / kv); the traced
    coupling must say the same for k and v, else pruning would cut heads from wrong groups.
    """
    group = heads // kv
    for h in range(heads):
        traced = linear_items(
            dg, group_of(dg, layer.q, list(range(h * d, (h + 1) * d)), layer.name, limit)
        )
        for proj in (layer.k, layer.v):
            rows = traced.get((id(proj), "out"), (None, [], []))[1]
            owners = sorted({r // d for r in rows})
            if owners != [h // group]:
                raise PruneError(
                    f"Torch-Pruning couples query head {h} of `{layer.name}` with key-value "
                    f"heads {owners}, not [{h // group}] as repeat_kv does; the GQA groups "
                    "cannot be kept consistent"
                )
    return [tuple(range(j * group, (j + 1) * group)) for j in range(kv)]


def prune_items(dg: Any, items: list[Item], root_idxs: list[int]) -> None:
    """Prune ``root_idxs`` (root numbering) from every item, each through its own mapping."""
    mapped = []
    for dep, idxs, root in items:
        position = {r: i for r, i in zip(root, idxs, strict=True)}
        mapped.append((dep, sorted(position[r] for r in root_idxs), root_idxs))
    group = subgroup(dg, mapped)
    if not dg.check_pruning_group(group):
        raise PruneError("internal: the pruning group would remove every channel")
    group.prune()


def check_layer(layer: Layer, target: PruneTarget) -> None:
    """The pruned shapes are the target's (a Torch-Pruning slip fails loudly here)."""
    h, kv, d, i = (
        target.num_attention_heads,
        target.num_key_value_heads,
        target.head_dim,
        target.intermediate_size,
    )
    got = {
        "q_proj rows": (layer.q.out_features, h * d),
        "k_proj rows": (layer.k.out_features, kv * d),
        "v_proj rows": (layer.v.out_features, kv * d),
        "o_proj columns": (layer.o.in_features, h * d),
        "gate_proj rows": (layer.gate.out_features, i),
        "up_proj rows": (layer.up.out_features, i),
        "down_proj columns": (layer.down.in_features, i),
    }
    wrong = {k: v for k, v in got.items() if v[0] != v[1]}
    if wrong:
        raise RuntimeError(f"pruning left `{layer.name}` with wrong shapes (got, want): {wrong}")


def couple(
    dg: Any, layer: Layer, target: PruneTarget, limit: int, names: dict[int, str]
) -> tuple[list[Item], list[Item], list[tuple[int, ...]]]:
    """One layer's MLP items (gate/up rows, down columns), attention items (q rows, o columns;
    k/v rows too without GQA) and query heads per key-value head, checked against the trace.

    Raises:
        PruneError: DepGraph coupled other parameters, missed one, or maps GQA groups wrongly.
    """
    inter, heads, kv = target.before
    d = target.head_dim
    mlp = group_of(dg, layer.gate, list(range(inter)), f"{layer.name}.mlp", limit)
    found = linear_items(dg, mlp)
    need = [(layer.gate, "out"), (layer.up, "out"), (layer.down, "in")]
    bad = unexpected(dg, mlp, {id(m) for m, _ in need}, names)
    if bad or any((id(m), s) not in found for m, s in need):
        raise PruneError(
            f"Torch-Pruning traced `{layer.name}.mlp` unexpectedly (coupled with "
            f"{bad or 'too little'}); this architecture is not supported"
        )
    mlp_items = [found[(id(m), s)] for m, s in need]

    attn = group_of(dg, layer.q, list(range(heads * d)), f"{layer.name}.self_attn", limit)
    found = linear_items(dg, attn)
    need = [(layer.q, "out"), (layer.o, "in")]
    extra = [(layer.k, "out"), (layer.v, "out")]
    bad = unexpected(dg, attn, {id(m) for m, _ in need + extra}, names)
    if bad or any((id(m), s) not in found for m, s in need + extra):
        raise PruneError(
            f"Torch-Pruning traced `{layer.name}.self_attn` unexpectedly (coupled with "
            f"{bad or 'too little'}); this architecture is not supported"
        )
    groups = kv_groups(dg, layer, heads, kv, d, limit)
    # With GQA the key-value heads stay whole (each serves several query heads).
    attn_items = [found[(id(m), s)] for m, s in (need + extra if kv == heads else need)]
    return mlp_items, attn_items, groups
