"""Merge LoRA adapters onto the bank's GPTQ grid (issue 21): W' on the stored scales and zeros.

The old merge (``MergeMethod.REQUANTIZE``, :func:`edgeqra.exporters.gptq.write_merged_checkpoint`)
runs GPTQModel again on W* = Dequant(Q(W)) + (alpha/r)·B·A: GPTQModel re-fits scales and zero
points to W*, so every weight is rounded a second time on a fresh grid, and the tuned model's
score drops (bench/RESULTS.md, exporters: 0.325 -> 0.225 on SmolLM2). ``MergeMethod.GRID``
keeps the grid the search tuned on: the bank's scales, zero points and groups for that unit
and width, and only chooses new integer codes for W*, with GPTQ's error feedback over the
layer's Hessian H = 2·XᵀX (inputs of the tuned model on calibration rows), so that what the
adapter changed in the layer's *outputs* survives the rounding. A unit whose adapter barely
moves any weight by half a step keeps nearly the bank's codes, and the error the rounding
leaves is measured on the outputs, per layer, in the manifest.

Per unit (a decoder layer), the merge error is ``lost = ‖X(W' − W*)‖ / ‖X(W* − W_hat)‖``
summed over the unit's linears: the fraction of the adapter's effect on the outputs that the
merge loses (0: all kept; 1: as if the adapter were dropped). Above ``threshold`` the
settings choose: ``unmerged`` (the default: keep the bank's codes and ship that unit's adapter
unmerged, so the package loads as base + adapter), ``report`` (merge anyway, flagged), or
``upbits`` (merge onto the bank's grid of the next width up, if the bank has it and the budget
allows). ``unmerged`` is the default because on SmolLM2 a 32-step adapter moves weights by less
than a grid step: merged on the grid, 0.96-0.98 of its effect is lost and the package scores
9-14 points below the adapter form on 570 ARC-Easy items, while the unmerged package scores
what the adapter form does (H200, bench/RESULTS.md, issue 21).

Modules: ``settings`` (:class:`MergeSettings`), ``grid`` (one linear onto its fixed grid,
pure tensors), ``hessians`` (each layer's inputs and Hessians from the tuned model),
``units`` (every unit, with the threshold's choices). Their public names are re-exported
here; ``exporters.package`` drives them for a run.
"""

from __future__ import annotations

from edgeqra.exporters.merge.grid import GridLayout, gptq_on_grid, output_error, round_on_grid
from edgeqra.exporters.merge.hessians import LayerInputs, collect_hessians
from edgeqra.exporters.merge.settings import MergeMethod, MergeSettings, OverThreshold
from edgeqra.exporters.merge.units import LayerMerge, merge_units

__all__ = [
    "GridLayout",
    "LayerInputs",
    "LayerMerge",
    "MergeMethod",
    "MergeSettings",
    "OverThreshold",
    "collect_hessians",
    "gptq_on_grid",
    "merge_units",
    "output_error",
    "round_on_grid",
]
