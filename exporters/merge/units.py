"""The merge of every unit: per layer, onto the bank's grid, with the threshold's choices.

A unit over ``threshold`` is kept unmerged, merged anyway (flagged), or merged at the next
width up if the bank has it and the budget allows (``MergeSettings.over_threshold``); every
layer's record (:class:`LayerMerge`) goes into the manifest.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from edgeqra.exporters.merge.grid import GridLayout, gptq_on_grid, output_error, round_on_grid
from edgeqra.exporters.merge.settings import MergeSettings, OverThreshold

from edgeqra.errors import ConfigError
from edgeqra.models import Unit
from edgeqra.space import FP16_BITS, Choice, Config

__all__ = ["LayerMerge", "merge_units"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LayerMerge:
    """What the merge did to one unit, and what it cost on the unit's outputs."""

    unit: int
    name: str
    bits: int  # the run's width for the unit
    rank: int
    bits_written: int  # the width in the package (``bits``, or higher after ``upbits``)
    action: str  # merged | unmerged | merged_upbits | no_adapter | dense
    lost: float  # ‖X(W'−W*)‖ / ‖X(W*−W_hat)‖ over the unit's linears (0 when no adapter;
    # for ``unmerged`` what merging would have lost: the package keeps the adapter exactly)
    lost_rtn: float  # the same for round-to-nearest on the grid (no error feedback)
    output_error: float  # ‖X(W'−W*)‖ / ‖X W*‖: the merged unit's relative output error
    adapter_effect: float  # ‖X(W*−W_hat)‖ / ‖X W*‖: how much the adapter moves the outputs
    codes_changed: float  # fraction of codes that differ from the bank's
    flagged: bool  # lost > threshold at the width finally written

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class _Try:
    """One merge attempt of a unit at one width."""

    bits: int
    tensors: dict[str, torch.Tensor]  # checkpoint tensors (qweight new, the rest the bank's)
    lost: float
    lost_rtn: float
    output_error: float
    adapter_effect: float
    codes_changed: float
    weights: dict[str, torch.Tensor]  # {module: (d_out, d_in) W' the package computes with}


def _merge_unit(
    unit: Unit,
    bits: int,
    packed: Mapping[str, torch.Tensor],
    v1: bool,
    target: Mapping[str, torch.Tensor],
    w_hat: Mapping[str, torch.Tensor],
    hessians: Mapping[str, torch.Tensor],
    settings: MergeSettings,
    device: str = "cpu",
) -> _Try:
    """GPTQ-on-grid every linear of ``unit`` at ``bits`` (on ``device``); the unit's errors."""
    tensors = dict(packed)
    err2 = rtn2 = eff2 = ref2 = 0.0
    changed = total = 0
    weights: dict[str, torch.Tensor] = {}
    for lin in unit.linears:
        grid = GridLayout.from_packed(packed, lin.name, bits, v1)
        s = grid.scales[grid.g_idx].t().to(device)  # (d_out, d_in)
        z = grid.zeros[grid.g_idx].t().to(device)
        w_star = target[lin.name].float().to(device)  # (d_out, d_in)
        h = hessians[lin.name].to(device)
        codes = gptq_on_grid(
            w_star, h, s, z, maxq=grid.maxq, damp=settings.damp, block_size=settings.block_size
        )
        err2 += output_error(s * (codes - z) - w_star, h) ** 2
        rtn = round_on_grid(w_star, s, z, grid.maxq)
        rtn2 += output_error(s * (rtn - z) - w_star, h) ** 2
        eff2 += output_error(w_star - w_hat[lin.name].float().to(device), h) ** 2
        ref2 += output_error(w_star, h) ** 2
        codes = codes.cpu()
        tensors[f"{lin.name}.qweight"] = grid.pack(codes)
        weights[lin.name] = grid.dequantize(codes)
        changed += int((grid.codes_of(packed, lin.name) != codes).sum())  # vs the bank's codes
        total += codes.numel()
    eff = math.sqrt(eff2)
    return _Try(
        bits=bits,
        tensors=tensors,
        lost=math.sqrt(err2) / eff if eff > 0 else 0.0,
        lost_rtn=math.sqrt(rtn2) / eff if eff > 0 else 0.0,
        output_error=math.sqrt(err2 / ref2) if ref2 > 0 else 0.0,
        adapter_effect=eff / math.sqrt(ref2) if ref2 > 0 else 0.0,
        codes_changed=changed / total if total else 0.0,
        weights=weights,
    )


def merge_units(
    bank: Any,
    units: Sequence[Unit],
    config: Config,
    target: Mapping[str, torch.Tensor],
    w_hat: Mapping[str, torch.Tensor],
    hessians: Mapping[str, torch.Tensor] | Callable[[Unit], Mapping[str, torch.Tensor]],
    settings: MergeSettings,
    *,
    fits: Callable[[Config], bool] | None = None,
    device: str = "cpu",
    on_unit: Callable[[Unit, Mapping[str, torch.Tensor]], None] | None = None,
) -> tuple[dict[int, tuple[int, dict[str, torch.Tensor]]], list[LayerMerge]]:
    """Merge every quantized, adapted unit onto the bank's grid; apply ``over_threshold``.

    Args:
        bank: the run's :class:`edgeqra.bank.Bank` (``packed``, ``quantize_config``).
        units: the model's units, in config order.
        config: the run's (bits, rank) per unit.
        target: {module: (d_out, d_in) W*}: the merged dense weights (tuned model).
        w_hat: {module: (d_out, d_in) W_hat}: the bank's dequantized weights the run tuned on.
        hessians: {module: (d_in, d_in) H} (:func:`collect_hessians` on the tuned model), or
            a function of the unit giving them (:class:`LayerInputs`: GPTQ's sequential
            order, each layer's inputs through the layers merged before it).
        settings: threshold and what to do above it.
        fits: whether a config (after raising one unit's bits) fits the run's budget;
            ``upbits`` is refused for a unit where it says no (None: anything fits).
        device: where the GPTQ loops run (a GPU is much faster; float32 either way).
        on_unit: called after each unit, in order, with {module: the weight the package
            computes with} (W' where merged; W* where dense or kept unmerged).

    Returns:
        ({unit index: (bits written, checkpoint tensors)} for quantized units, per-unit report);
        16-bit units are absent from the first (their dense W* is written) and ``unmerged``
        units hold the bank's own tensors.
    """
    written: dict[int, tuple[int, dict[str, torch.Tensor]]] = {}
    report: list[LayerMerge] = []
    current = list(config)  # the config as written so far (``upbits`` raises entries)
    for pos, (unit, choice) in enumerate(zip(units, config, strict=True)):
        common = {"unit": unit.index, "name": unit.name, "bits": choice.bits, "rank": choice.rank}
        computes_with = {lin.name: target[lin.name] for lin in unit.linears}  # W*
        if choice.bits >= FP16_BITS:  # dense: W* itself is written
            report.append(LayerMerge(**common, **_EXACT, bits_written=choice.bits, action="dense"))
        elif choice.rank == 0:  # W* is W_hat: the bank's codes are the exact merge
            written[unit.index] = (choice.bits, bank.packed(unit.index, choice.bits))
            report.append(
                LayerMerge(**common, **_EXACT, bits_written=choice.bits, action="no_adapter")
            )
        else:
            h = hessians(unit) if callable(hessians) else hessians
            attempt, action = _merge_adapted(
                bank, unit, pos, choice, current, target, w_hat, h, settings, fits, device
            )
            if action == "unmerged":
                written[unit.index] = (choice.bits, bank.packed(unit.index, choice.bits))
                log.info("%s: merge would lose %.2f of the adapter; kept unmerged (base + "
                         "adapter)", unit.name, attempt.lost)  # fmt: skip
            else:
                written[unit.index] = (attempt.bits, attempt.tensors)
                computes_with = attempt.weights
            report.append(
                LayerMerge(
                    **common,
                    bits_written=attempt.bits,
                    action=action,
                    lost=attempt.lost,
                    lost_rtn=attempt.lost_rtn,
                    output_error=0.0 if action == "unmerged" else attempt.output_error,
                    adapter_effect=attempt.adapter_effect,
                    codes_changed=0.0 if action == "unmerged" else attempt.codes_changed,
                    flagged=action != "unmerged" and attempt.lost > settings.threshold,
                )
            )
        if on_unit is not None:
            on_unit(unit, computes_with)
    return written, report


_EXACT = {"lost": 0.0, "lost_rtn": 0.0, "output_error": 0.0, "adapter_effect": 0.0,
          "codes_changed": 0.0, "flagged": False}  # fmt: skip


def _merge_adapted(
    bank: Any,
    unit: Unit,
    pos: int,
    choice: Choice,
    current: list[Choice],
    target: Mapping[str, torch.Tensor],
    w_hat: Mapping[str, torch.Tensor],
    hessians: Mapping[str, torch.Tensor],
    settings: MergeSettings,
    fits: Callable[[Config], bool] | None,
    device: str,
) -> tuple[_Try, str]:
    """Merge one adapted unit; apply ``over_threshold``. Returns (attempt, action);
    ``current[pos]`` is raised in place when ``upbits`` writes a higher width."""
    v1 = _is_v1(bank.quantize_config(choice.bits))
    packed = bank.packed(unit.index, choice.bits)
    attempt = _merge_unit(unit, choice.bits, packed, v1, target, w_hat, hessians, settings, device)
    if attempt.lost <= settings.threshold or settings.over_threshold is OverThreshold.REPORT:
        return attempt, "merged"
    if settings.over_threshold is OverThreshold.UNMERGED:
        return attempt, "unmerged"
    action = "merged"
    for up in sorted(b for b in bank.spec.bits if b > choice.bits and bank.done(b)):
        trial = list(current)
        trial[pos] = Choice(up, choice.rank)
        if fits is not None and not fits(Config(tuple(trial))):
            log.info("%s: a %d-bit merge would not fit the budget", unit.name, up)
            break
        attempt = _merge_unit(
            unit, up, bank.packed(unit.index, up), _is_v1(bank.quantize_config(up)),
            target, w_hat, hessians, settings, device,
        )  # fmt: skip
        current[pos], action = trial[pos], "merged_upbits"
        if attempt.lost <= settings.threshold:
            break
    return attempt, action


def _is_v1(qcfg: Mapping[str, Any]) -> bool:
    """Whether a GPTQModel config's checkpoint stores ``zero - 1`` (GPTQ v1)."""
    fmt = str(qcfg.get("checkpoint_format") or qcfg.get("format") or "gptq").lower()
    if fmt not in {"gptq", "gptq_v2"}:
        raise ConfigError(f"bank checkpoint format {fmt!r} is not gptq/gptq_v2; rebuild the bank")
    return fmt == "gptq"
