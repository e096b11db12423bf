"""The GPTQ bank on a tiny random Llama: cache hit/miss, resume, assemble, vs GPTQModel.

Both builds: ``sequential`` (one GPTQModel run per width, checkpoints kept) and ``shared``
(one Hessian per linear for every width, ``edgeqra.gptq.shared_hessian``), checked against it.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import tiny_model

import edgeqra.gptq
import edgeqra.gptq.shared_hessian
from edgeqra.bank import Bank, BankSpec, HessianSource, bank_key, build_bank
from edgeqra.errors import ConfigError
from edgeqra.models import find_units
from edgeqra.space import Config

SPEC = BankSpec(bits=(2, 3, 4, 8), group_size=32, hessian="sequential")
SHARED = BankSpec(bits=(2, 3, 4, 8), group_size=32)


def _calibration() -> torch.Tensor:
    """(24, 64) token ids from a skewed unigram: correlated activations, as real text gives."""
    g = torch.Generator().manual_seed(1)
    probs = torch.linspace(1.0, 0.01, 256) ** 3
    return torch.multinomial(probs, 24 * 64, replacement=True, generator=g).view(24, 64)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """A tiny Llama saved to disk and its bank, built once (with GPTQModel checkpoints kept)."""
    root = tmp_path_factory.mktemp("bank")
    model = tiny_model("llama")
    model.save_pretrained(root / "model")
    units = find_units(model)
    calls = []
    bank = build_bank(
        root / "model",
        units,
        _calibration(),
        SPEC,
        cache_root=root / "cache",
        keep_checkpoints=True,
        progress=False,
        on_bits_done=lambda bits, s: calls.append(bits),
    )
    return root, model, units, bank, calls


def _count_quantize_calls(monkeypatch):
    calls = []
    real = edgeqra.gptq.quantize_to_checkpoint

    def counting(*args, **kwargs):
        calls.append(kwargs["bits"])
        return real(*args, **kwargs)

    monkeypatch.setattr(edgeqra.gptq, "quantize_to_checkpoint", counting)
    return calls


def test_first_build_runs_every_bit_width(built):
    _, _, _, bank, calls = built
    assert calls == [2, 3, 4, 8]
    assert bank.complete


def test_second_build_is_a_cache_hit(built, monkeypatch):
    root, _, units, bank, _ = built
    calls = _count_quantize_calls(monkeypatch)
    again = build_bank(
        root / "model", units, _calibration(), SPEC, cache_root=root / "cache", progress=False
    )
    assert calls == [] and again.root == bank.root


def test_other_calibration_or_group_size_is_a_miss(built):
    from edgeqra.bank import bank_key

    root, _, _, bank, _ = built
    assert bank_key(root / "model", _calibration(), SPEC) == bank.root.name
    assert bank_key(root / "model", _calibration()[:-1], SPEC) != bank.root.name
    assert (
        bank_key(root / "model", _calibration(), BankSpec(bits=SPEC.bits, group_size=64))
        != bank.root.name
    )
    # The bit set is not part of the key: a {4}-bit bank is a subset of the full one.
    assert (
        bank_key(root / "model", _calibration(), dataclasses.replace(SPEC, bits=(4,)))
        == bank.root.name
    )


def test_interrupted_build_resumes_only_the_missing_width(built, monkeypatch):
    root, _, units, bank, _ = built
    (bank.root / "b4" / "DONE").unlink()  # as if killed while writing the 4-bit entries
    calls = _count_quantize_calls(monkeypatch)
    resumed = build_bank(
        root / "model",
        units,
        _calibration(),
        SPEC,
        cache_root=root / "cache",
        keep_checkpoints=True,
        progress=False,
    )
    assert calls == [4] and resumed.complete


def test_assemble_copies_the_bank_entries_unit_by_unit(built):
    _, model, units, bank, _ = built
    work = tiny_model("llama")
    bank.remember_originals(work)
    original = {n: p.detach().clone() for n, p in work.named_parameters()}
    config = Config.from_pairs([(2, 8), (16, 4), (8, 0)])
    bank.assemble(work, config)
    for unit, choice in zip(units, config, strict=True):
        for lin in unit.linears:
            got = work.get_submodule(lin.name).weight
            want = (
                original[f"{lin.name}.weight"]
                if choice.bits == 16
                else bank.entry(unit.index, choice.bits)[lin.name]
            )
            assert torch.equal(got, want), lin.name
    # Quantized units really changed; everything outside the units is untouched.
    assert not torch.equal(
        work.model.layers[0].self_attn.q_proj.weight,
        original["model.layers.0.self_attn.q_proj.weight"],
    )
    assert torch.equal(work.model.embed_tokens.weight, original["model.embed_tokens.weight"])
    # Re-assembling another config overwrites every unit (no leftovers).
    bank.assemble(work, Config.uniform(3, 16, 0))
    for name, value in original.items():
        assert torch.equal(dict(work.named_parameters())[name], value), name


def test_more_bits_means_smaller_weight_error(built):
    _, model, units, bank, _ = built
    name = units[1].linears[0].name
    w = model.get_submodule(name).weight
    errors = [torch.linalg.norm(bank.entry(1, b)[name] - w).item() for b in (2, 3, 4, 8)]
    assert errors == sorted(errors, reverse=True)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_uniform_assemble_matches_gptqmodel_loaded_model(built, bits):
    """Assembled uniform b-bit == the checkpoint GPTQModel loads with its torch kernel."""
    _, _, _, bank, _ = built
    reference = edgeqra.gptq.load_quantized(bank.root / f"checkpoint-b{bits}")
    work = tiny_model("llama")
    bank.assemble(work, Config.uniform(3, bits, 0))
    ids = _calibration()[:4, :32]
    with torch.no_grad():
        delta = (work(ids).logits - reference(ids).logits).abs().max().item()
    assert delta < 1e-4, delta
    prompt = ids[:1, :8]
    kwargs = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert torch.equal(work.generate(prompt, **kwargs), reference.generate(prompt, **kwargs))


def test_bits_outside_the_bank_are_refused(built):
    _, _, units, bank, _ = built
    small = Bank(bank.root, units, BankSpec(bits=(4,), group_size=32))
    with pytest.raises(ConfigError, match="not in this bank"):
        small.assemble(tiny_model("llama"), Config.uniform(3, 2, 0))
    with pytest.raises(ConfigError, match="remember_originals"):
        Bank(bank.root, units, SPEC).assemble(tiny_model("llama"), Config.uniform(3, 16, 0))


# ------------------------------------------------------------------ shared-Hessian build


@pytest.fixture(scope="module")
def shared(built):
    """The same model and calibration as ``built``, banked with shared Hessians."""
    root, model, units, _, _ = built
    calls = []
    bank = build_bank(
        root / "model",
        units,
        _calibration(),
        SHARED,
        cache_root=root / "cache",
        keep_checkpoints=True,
        progress=False,
        on_bits_done=lambda bits, s: calls.append(bits),
    )
    return bank, calls


def _count_shared_passes(monkeypatch):
    calls = []
    real = edgeqra.gptq.shared_hessian.quantize_shared_hessian

    def counting(*args, **kwargs):
        calls.append(list(kwargs["bits"]))
        return real(*args, **kwargs)

    monkeypatch.setattr(edgeqra.gptq.shared_hessian, "quantize_shared_hessian", counting)
    return calls


def test_shared_is_the_default_and_has_its_own_key(built, shared):
    root, _, _, sequential, _ = built
    bank, calls = shared
    assert BankSpec().hessian is HessianSource.SHARED
    assert calls == [2, 3, 4, 8] and bank.complete
    assert bank.root != sequential.root
    assert bank_key(root / "model", _calibration(), SHARED) == bank.root.name
    with pytest.raises(ConfigError, match="hessian"):
        BankSpec(hessian="greedy")


def test_hessian_default_comes_from_the_environment(monkeypatch):
    monkeypatch.setenv("EDGEQRA_BANK_HESSIAN", "sequential")
    assert BankSpec().hessian is HessianSource.SEQUENTIAL
    assert BankSpec(hessian="shared").hessian is HessianSource.SHARED  # explicit wins
    monkeypatch.setenv("EDGEQRA_BANK_HESSIAN", "parallel")
    with pytest.raises(ConfigError, match="EDGEQRA_BANK_HESSIAN"):
        BankSpec()


def test_shared_build_is_one_pass_then_a_cache_hit(built, shared, monkeypatch):
    root, _, units, _, _ = built
    bank, _ = shared
    passes = _count_shared_passes(monkeypatch)
    runs = _count_quantize_calls(monkeypatch)
    again = build_bank(
        root / "model", units, _calibration(), SHARED, cache_root=root / "cache", progress=False
    )
    assert passes == [] and runs == [] and again.root == bank.root
    (bank.root / "b3" / "DONE").unlink()  # as if killed while writing the 3-bit entries
    resumed = build_bank(
        root / "model", units, _calibration(), SHARED, cache_root=root / "cache", progress=False
    )
    assert passes == [[3]] and runs == [] and resumed.complete


def test_a_second_builder_waits_for_the_first_and_reuses_its_bank(
    built, shared, tmp_path, monkeypatch
):
    """Two searches asking for one bank: the second blocks on the bank's lock and, once the
    first has written it, builds nothing (issue 20: eight workers built the same banks)."""
    import shutil
    import threading

    from filelock import FileLock

    root, _, units, _, _ = built
    bank, _ = shared
    cache = tmp_path / "cache"
    target = cache / bank.root.name
    passes = _count_shared_passes(monkeypatch)
    result = {}
    target.mkdir(parents=True)
    holder = FileLock(target / ".lock")
    with holder:  # "the first process", building
        waiter = threading.Thread(
            target=lambda: result.setdefault(
                "bank",
                build_bank(
                    root / "model", units, _calibration(), SHARED, cache_root=cache, progress=False
                ),  # fmt: skip
            )
        )
        waiter.start()
        waiter.join(timeout=2.0)
        assert waiter.is_alive()  # blocked on the lock, nothing built
        shutil.copytree(  # the first one's bank lands
            bank.root, target, dirs_exist_ok=True, ignore=shutil.ignore_patterns(".lock")
        )
    waiter.join(timeout=60)
    assert not waiter.is_alive()
    assert passes == [] and result["bank"].complete and result["bank"].root == target


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_shared_first_layer_qkv_pack_exactly_as_gptqmodel(built, shared, bits):
    """Layer 0's q/k/v see unquantized inputs in both builds: GPTQModel's packed tensors, bit
    for bit; later linears differ (GPTQModel fed them already-quantized outputs)."""
    _, _, units, sequential, _ = built
    bank, _ = shared
    mine, ref = bank.packed(0, bits), sequential.packed(0, bits)
    assert set(mine) == set(ref)
    first = [k for k in ref if any(p in k for p in ("q_proj", "k_proj", "v_proj"))]
    assert len(first) == 12  # qweight, qzeros, scales, g_idx of three linears
    for key in first:
        assert torch.equal(mine[key], ref[key]), key
    later = units[0].linears[-1].name  # down_proj: its input went through quantized layers
    assert not torch.equal(mine[f"{later}.qweight"], ref[f"{later}.qweight"])
    for key in ref:
        assert mine[key].shape == ref[key].shape and mine[key].dtype == ref[key].dtype, key


@pytest.mark.parametrize("bits", [2, 8])
def test_shared_quantize_config_is_gptqmodels_save(built, shared, bits):
    _, _, _, sequential, _ = built
    bank, _ = shared
    mine, ref = bank.quantize_config(bits), sequential.quantize_config(bits)
    meta_mine, meta_ref = mine.pop("meta"), ref.pop("meta")
    assert mine == ref
    assert meta_mine.pop("edgeqra_inputs") == "unquantized"
    assert meta_mine.pop("true_sequential") is False and meta_ref.pop("true_sequential") is True
    assert meta_mine == meta_ref


@pytest.mark.parametrize("bits", [3, 4])
def test_shared_bank_loads_in_gptqmodel_as_assembled(shared, bits):
    """Its packed tensors + quantize_config (the kept checkpoint) load in GPTQModel and equal
    the assembled W_hat."""
    bank, _ = shared
    reference = edgeqra.gptq.load_quantized(bank.root / f"checkpoint-b{bits}")
    work = tiny_model("llama")
    bank.assemble(work, Config.uniform(3, bits, 0))
    ids = _calibration()[:4, :32]
    with torch.no_grad():
        delta = (work(ids).logits - reference(ids).logits).abs().max().item()
    assert delta < 1e-4, delta


def test_shared_more_bits_means_smaller_weight_error(built, shared):
    _, model, units, _, _ = built
    bank, _ = shared
    name = units[1].linears[0].name
    w = model.get_submodule(name).weight
    errors = [torch.linalg.norm(bank.entry(1, b)[name] - w).item() for b in (2, 3, 4, 8)]
    assert errors == sorted(errors, reverse=True)


def test_shared_hessian_chunks_give_the_same_tensors(built, shared):
    """A Hessian cap of one layer per forward (truncated, repeated passes) changes nothing."""
    root, _, units, _, _ = built
    bank, _ = shared
    layers = [(u.name, [lin.name for lin in u.linears]) for u in units]
    small = dict(
        edgeqra.gptq.shared_hessian.quantize_shared_hessian(
            root / "model", _calibration(), layers, bits=(4,), group_size=32, hessian_bytes=1
        )
    )
    assert sorted(small) == [0, 1, 2]
    for unit in units:
        want = bank.packed(unit.index, 4)
        assert set(small[unit.index][4]) == set(want)
        for key, value in want.items():
            assert torch.equal(small[unit.index][4][key], value), key
