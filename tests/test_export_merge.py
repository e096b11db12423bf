"""The on-grid merge core (exporters/merge/, issue 21) on seeded tensors: no model, no run.

Claims, with their tolerances:
* GPTQ on a fixed grid returns integer codes in [0, maxq]; given W* already on the grid it
  returns exactly its codes (no rounding error: the merge of a rank-0 unit is the bank's).
* With error feedback over H it beats round-to-nearest onto the same grid on the layer's
  outputs, ‖X(W* − Q)‖, on seeded correlated inputs (GPTQ's claim, STYLE.md rule 10), and
  keeps part of a low-rank change smaller than the grid step (lost < 1).
* ``GridLayout.pack`` writes the ``qweight`` that GPTQModel's own unpacking reads back.
* ``collect_hessians`` equals 2·XᵀX/n of the inputs a hook sees, shared by q/k/v.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import tiny_model
from edgeqra.exporters.merge import (
    GridLayout,
    MergeSettings,
    collect_hessians,
    gptq_on_grid,
    output_error,
    round_on_grid,
)

from edgeqra.errors import ConfigError

D_OUT, D_IN, GROUP, N = 48, 128, 32, 1024


def _case(bits: int, seed: int = 0):
    """A grid fitted (min-max, per group) to random W, its W_hat, a sub-step low-rank change,
    and H of correlated inputs."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(D_OUT, D_IN, generator=g)
    maxq = (1 << bits) - 1
    groups = w.view(D_OUT, D_IN // GROUP, GROUP)  # (d_out, groups, group)
    lo, hi = groups.amin(-1), groups.amax(-1)
    scale = ((hi - lo) / maxq).half().float()  # (d_out, groups), fp16 as the checkpoint
    zero = torch.round(-lo / scale).clamp(0, maxq)
    s = scale.repeat_interleave(GROUP, 1)  # (d_out, d_in)
    z = zero.repeat_interleave(GROUP, 1)
    codes = round_on_grid(w, s, z, maxq)
    w_hat = s * (codes - z)
    delta = (
        0.4 * s.mean() * (torch.randn(D_OUT, 2, generator=g) @ torch.randn(2, D_IN, generator=g))
    )
    mix = torch.randn(D_IN, D_IN, generator=g) / math.sqrt(D_IN)
    x = torch.randn(N, D_IN, generator=g) @ (torch.eye(D_IN) + 2 * mix)  # correlated inputs
    h = 2 * x.t() @ x / N
    return w_hat, w_hat + delta, s, z, codes, h, maxq


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_gptq_on_grid_keeps_the_adapter_better_than_rounding(bits):
    w_hat, w_star, s, z, _, h, maxq = _case(bits)
    q = gptq_on_grid(w_star, h, s, z, maxq=maxq, block_size=32)
    assert q.dtype == torch.int64 and int(q.min()) >= 0 and int(q.max()) <= maxq
    gptq = output_error(s * (q - z) - w_star, h)
    rtn = output_error(s * (round_on_grid(w_star, s, z, maxq) - z) - w_star, h)
    dropped = output_error(w_hat - w_star, h)  # the adapter's whole effect
    print(f"{bits}-bit: lost gptq {gptq / dropped:.3f}, rtn {rtn / dropped:.3f}")
    assert gptq < rtn
    assert gptq < dropped  # part of the sub-step change survives


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_a_weight_on_the_grid_keeps_its_codes_exactly(bits):
    w_hat, _, s, z, codes, h, maxq = _case(bits, seed=1)
    assert torch.equal(gptq_on_grid(w_hat, h, s, z, maxq=maxq), codes)


def test_block_size_changes_speed_only():
    _, w_star, s, z, _, h, maxq = _case(4, seed=2)
    a = gptq_on_grid(w_star, h, s, z, maxq=maxq, block_size=16)
    b = gptq_on_grid(w_star, h, s, z, maxq=maxq, block_size=D_IN)
    assert (a != b).float().mean() < 1e-3  # float64 summation order only


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_pack_is_what_gptqmodel_unpacks(bits):
    from gptqmodel.utils.model_dequant import unpack_rows

    codes = torch.randint(0, 1 << bits, (D_OUT, D_IN), generator=torch.Generator().manual_seed(3))
    layout = GridLayout(bits, torch.ones(4, D_OUT), torch.zeros(4, D_OUT, dtype=torch.long),
                        torch.arange(D_IN) // GROUP, v1=True)  # fmt: skip
    qweight = layout.pack(codes)
    assert qweight.dtype == torch.int32 and qweight.shape == (D_IN * bits // 32, D_OUT)
    assert torch.equal(unpack_rows(qweight, bits)[:D_IN].t().long(), codes)
    assert torch.equal(layout.codes_of({"m.qweight": qweight}, "m"), codes)


def test_hessians_are_the_inputs_gram_shared_by_siblings():
    model = tiny_model("llama")
    names = [f"model.layers.0.self_attn.{p}_proj" for p in "qkvo"] + [
        "model.layers.1.mlp.down_proj"
    ]
    rows = torch.randint(
        0, model.config.vocab_size, (3, 12), generator=torch.Generator().manual_seed(4)
    )
    seen: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    hooks = [
        model.get_submodule(n).register_forward_pre_hook(
            lambda _m, args, n=n: seen[n].append(args[0].detach().reshape(-1, args[0].shape[-1]))
        )
        for n in names
    ]
    hessians = collect_hessians(model, names, rows, batch_size=2)
    for h in hooks:
        h.remove()
    for n in names:
        x = torch.cat(seen[n]).double()  # (tokens, d_in) over the same forward passes
        torch.testing.assert_close(
            hessians[n].double(), 2 * x.t() @ x / x.shape[0], rtol=1e-5, atol=1e-6
        )
    q, k, v, o = (hessians[n] for n in names[:4])
    assert q is k is v and o is not q  # one matrix for the three projections of one input


def test_merge_settings_name_bad_values():
    with pytest.raises(ConfigError, match="`over_threshold` 'drop'"):
        MergeSettings(over_threshold="drop")
    with pytest.raises(ConfigError, match="`method` 'gguf'"):
        MergeSettings(method="gguf")
    with pytest.raises(ConfigError, match="`threshold` -1"):
        MergeSettings(threshold=-1)
    assert MergeSettings(method="requantize").to_json()["method"] == "requantize"


def test_layer_inputs_replay_the_model_layer_by_layer():
    """Unchanged weights: the sequential pass sees exactly the inputs of one full forward;
    a changed layer changes the next layer's inputs (the feedback GPTQ's order gives)."""
    from edgeqra.exporters.merge import LayerInputs

    from edgeqra.models import find_units

    model = tiny_model("llama")
    units = find_units(model)
    rows = torch.randint(
        0, model.config.vocab_size, (3, 12), generator=torch.Generator().manual_seed(5)
    )
    names = [lin.name for u in units for lin in u.linears]
    once = collect_hessians(model, names, rows, batch_size=2)
    seq = LayerInputs(model, [u.name for u in units], rows, batch_size=2).capture()
    for unit in units:
        got = seq.hessians(unit)
        for lin in unit.linears:
            torch.testing.assert_close(got[lin.name], once[lin.name], rtol=1e-5, atol=1e-6)
        seq.advance(unit)
    seq.free()
    seq = LayerInputs(model, [u.name for u in units], rows, batch_size=2).capture()
    seq.hessians(units[0])
    with torch.no_grad():
        model.get_submodule(units[0].linears[0].name).weight.mul_(0.5)
    seq.advance(units[0])
    moved = seq.hessians(units[1])[units[1].linears[0].name]
    assert not torch.allclose(moved, once[units[1].linears[0].name], rtol=1e-3)
