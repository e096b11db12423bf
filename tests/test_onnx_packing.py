"""ONNX packing without a model (issue 6): GPTQ integers -> MatMulNBits initializers and the
embedding table's storage, each read back through onnxruntime; split from
tests/test_export_onnx.py, whose tests share one quantized tiny Llama."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from edgeqra.exporters.onnx import pack_matmul_nbits
from onnx import helper


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_packing_round_trip_with_a_partial_last_group(bits):
    rng = np.random.default_rng(bits)
    k, n, group = 80, 24, 32  # 3 groups (the last one half full) -> 3 blocks of 32
    codes = rng.integers(0, 2**bits, size=(k, n))
    zeros = rng.integers(0, 2**bits, size=(-(-k // group), n))
    scales = rng.random((zeros.shape[0], n)).astype(np.float16).astype(np.float32)
    p = pack_matmul_nbits("m", codes, zeros, scales, bits=bits, group_size=group)
    g = np.arange(k) // group
    expected = (scales[g] * (codes - zeros[g]).astype(np.float32)).T  # (N, K)
    np.testing.assert_array_equal(p.dequantized(), expected)
    assert p.b.shape == (n, 3, 32 * p.bits_stored // 8)
    assert p.zero_points.shape == (n, -(-3 * p.bits_stored // 8))
    # Per-channel (one group over all of K, here not a power of two): one block of 128.
    per_channel = pack_matmul_nbits("m", codes, zeros[:1], scales[:1], bits=bits, group_size=k)
    assert per_channel.block_size == 128 and per_channel.scales.shape == (n, 1)
    expected = (scales[:1] * (codes - zeros[:1]).astype(np.float32)).T
    np.testing.assert_array_equal(per_channel.dequantized(), expected)


def _ort_weight(parts, k: int, n: int) -> np.ndarray:
    """(K, N) that onnxruntime computes for A = I through MatMulNBits part(s), summed by Add."""
    import onnxruntime as ort
    from onnx import numpy_helper

    nodes, inits, outs = [], [], []
    for i, p in enumerate(parts):
        names = [f"B{i}", f"S{i}", f"Z{i}"]
        inits += [numpy_helper.from_array(a, nm) for a, nm in zip((p.b, p.scales, p.zero_points), names, strict=True)]  # fmt: skip
        nodes.append(helper.make_node("MatMulNBits", ["A", *names], [f"Y{i}"], domain="com.microsoft",
                                      K=k, N=n, bits=p.bits_stored, block_size=p.block_size))  # fmt: skip
        outs.append(f"Y{i}")
    if len(outs) == 2:
        nodes.append(helper.make_node("Add", outs, ["Y"]))
    else:
        nodes.append(helper.make_node("Identity", outs, ["Y"]))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("A", 1, [k, k])],
                              [helper.make_tensor_value_info("Y", 1, [k, n])], initializer=inits)  # fmt: skip
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 20), helper.make_opsetid("com.microsoft", 1)]
    )
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {"A": np.eye(k, dtype=np.float32)})[0]


@pytest.mark.parametrize("bits", [2, 8])
def test_fast_storage_dequantizes_to_the_same_weights(bits):
    """2-bit codes in the 4-bit kernel and 8-bit split into two 4-bit nodes: the GPTQ weights,
    bit for bit, through onnxruntime's own kernels (and the native width agrees)."""
    from edgeqra.exporters.onnx import EightBit, plan_linear

    rng = np.random.default_rng(10 + bits)
    k, n, group = 128, 48, 64
    codes = rng.integers(0, 2**bits, size=(k, n))
    zeros = rng.integers(0, 2**bits, size=(k // group, n))
    scales = (rng.random((k // group, n)) * 0.05).astype(np.float16).astype(np.float32)
    g = np.arange(k) // group
    expected = scales[g] * (codes - zeros[g]).astype(np.float32)  # (K, N)
    fast = plan_linear("m", codes, zeros, scales, bits=bits, group_size=group)
    native = pack_matmul_nbits("m", codes, zeros, scales, bits=bits, group_size=group,
                               stored_bits=bits)  # fmt: skip
    assert {p.bits_stored for p in fast.parts} == {4} and native.bits_stored == bits
    assert fast.storage == ("split" if bits == 8 else "nbits")
    np.testing.assert_array_equal(fast.dequantized(), expected.T)
    np.testing.assert_array_equal(native.dequantized(), expected.T)
    np.testing.assert_array_equal(_ort_weight(fast.parts, k, n), expected)
    np.testing.assert_array_equal(_ort_weight([native], k, n), expected)
    # What each choice costs, as the export reports it (B + float32 scales + zero points).
    alts = fast.alternatives()
    assert (
        alts[f"nbits{bits}"] == native.b.nbytes + native.scales.nbytes + native.zero_points.nbytes
    )
    assert fast.bytes == sum(
        p.b.nbytes + p.scales.nbytes + p.zero_points.nbytes for p in fast.parts
    )
    if bits == 8:
        assert alts["float32"] == k * n * 4 and alts["split"] == fast.bytes
        flt = plan_linear("m", codes, zeros, scales, bits=8, group_size=group,
                          eight_bit=EightBit.FLOAT32)  # fmt: skip
        assert flt.parts == () and flt.bytes == k * n * 4 and flt.dequantized() is None
    else:
        assert fast.bytes == alts["nbits4"] > alts["nbits2"]


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "int8"])
def test_embedding_storage_reads_back_in_onnxruntime(dtype):
    """The stored table, through the node the export puts after it (Cast / DequantizeLinear),
    is the table the parity reference holds; int8 rounds within half a step per row."""
    import onnxruntime as ort
    from edgeqra.exporters.onnx import embedding_storage
    from onnx import numpy_helper

    rng = np.random.default_rng(7)
    table = (rng.standard_normal((64, 48)) * 0.05).astype(np.float32)
    arrays, back = embedding_storage(table, dtype)
    inits = [numpy_helper.from_array(np.asarray(a), f"t.{k}") for k, a in arrays.items()]
    if dtype == "int8":
        node = helper.make_node("DequantizeLinear", [i.name for i in inits], ["Y"], axis=0)
        step = np.abs(table).max(1, keepdims=True) / 127
        assert np.all(np.abs(back - table) <= step / 2 + 1e-9)
        assert sum(a.nbytes for a in arrays.values()) == 64 * 48 + 64 * 4
    else:
        node = helper.make_node("Cast", [inits[0].name], ["Y"], to=onnx.TensorProto.FLOAT)
        assert arrays["table"].nbytes == 64 * 48 * 2
    graph = helper.make_graph([node], "g", [], [helper.make_tensor_value_info("Y", 1, [64, 48])],
                              initializer=inits)  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    np.testing.assert_array_equal(sess.run(None, {})[0], back)
