"""fuse.transformer's helpers and smoothquant, on tiny graphs built inline."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest

from edgepipe.core.errors import BadInput
from edgepipe.passes import PassContext, create
from edgepipe.passes.fuse import expected_fusions, shape_inference_failure

RNG = np.random.default_rng(0)


def _ffn_out(scale_value: float = 0.5) -> onnx.ModelProto:
    """GELU's tail (``h * 0.5``) feeding a MatMul with a constant weight, like BERT's FFN output."""
    model = onnx.parser.parse_model(f"""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[N, 8] x) => (float[N, 4] y) <float half = {{{scale_value}}}> {{
        h = Mul (x, half)
        y = MatMul (h, w)
    }}""")
    w = RNG.standard_normal((8, 4)).astype(np.float32)
    model.graph.initializer.append(onnx.numpy_helper.from_array(w, "w"))
    for i, n in enumerate(model.graph.node):
        n.name = f"n{i}"
    return model


def _run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


def test_smoothquant_moves_outlier_channels_into_the_weights_exactly(tmp_path):
    x = RNG.standard_normal((64, 8)).astype(np.float32)
    x[:, 3] *= 50  # an outlier channel
    model = _ffn_out()
    ctx = PassContext(workdir=tmp_path, calibration=lambda: iter([{"x": x[:32]}, {"x": x[32:]}]))
    result = create({"name": "smoothquant", "alpha": 0.5}, ctx)(ir.from_proto(model))
    out = ir.to_proto(result.model)
    assert result.modified and result.stats["smoothed"] == 1 and result.stats["nodes"] == ["n1"]
    assert [n.op_type for n in out.graph.node] == ["Mul", "MatMul"]  # folded: no node added
    np.testing.assert_allclose(_run(out, x), _run(model, x), rtol=1e-4, atol=1e-3)
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in out.graph.initializer}
    act = inits[out.graph.node[0].input[1]] * np.abs(x).max(0)  # what MatMul now sees, per channel
    assert act.max() / np.median(act) < np.abs(x).max(0).max() / np.median(np.abs(x).max(0))
    assert inits["half"].shape == ()  # the shared scalar is left alone


def test_smoothquant_skips_flat_inputs_and_needs_calibration(tmp_path):
    x = RNG.standard_normal((16, 8)).astype(np.float32)
    ctx = PassContext(workdir=tmp_path, calibration=lambda: iter([{"x": x}]))
    result = create({"name": "smoothquant", "min_ratio": 1000.0}, ctx)(ir.from_proto(_ffn_out()))
    assert not result.modified and result.stats["smoothed"] == 0
    with pytest.raises(BadInput, match="calibration"):
        create({"name": "smoothquant"}, PassContext(workdir=tmp_path))(ir.from_proto(_ffn_out()))


def test_shape_inference_failure_names_the_node():
    model = onnx.parser.parse_model("""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float x, int64[2] s) => (float y) {
        y = Expand (x, s)
    }""")
    model.graph.node[0].name = "/encoder/mask/Expand"
    failure = shape_inference_failure(model)
    assert failure.startswith("node '/encoder/mask/Expand' (Expand)")
    assert shape_inference_failure(_ffn_out()) is None


def test_expected_fusions_follow_the_graph():
    model = onnx.parser.parse_model("""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[2, 4] x) => (float[2, 4] y) {
        a = Softmax (x)
        b = Erf (a)
        y = Softmax (b)
    }""")
    assert expected_fusions(model) == {"Attention": 2, "SkipLayerNormalization": 4, "Gelu": 1}


def test_unknown_fuse_option_is_rejected(tmp_path):
    with pytest.raises(BadInput, match="'auto', 'always' or 'never'"):
        create({"name": "fuse.transformer", "keep": "maybe"}, PassContext(workdir=Path(tmp_path)))
    with pytest.raises(BadInput, match="unknown option 'bogus'"):
        create({"name": "fuse.transformer", "bogus": 1}, PassContext(workdir=Path(tmp_path)))


def _post_norm_block() -> onnx.ModelProto:
    """A LayerNorm output read by two MatMuls (like Q and K) and by a residual Add, as in post-LN BERT."""
    model = onnx.parser.parse_model("""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[N, 8] x) => (float[N, 4] q, float[N, 4] k, float[N, 8] r) {
        h = LayerNormalization (x, gamma, beta)
        q = MatMul (h, wq)
        k = MatMul (h, wk)
        r = Add (h, x)
    }""")
    gamma = np.ones(8, np.float32)
    gamma[5] = 40.0  # the outlier channel, as BERT's LayerNorm weight makes it
    for name, value in {"gamma": gamma, "beta": np.zeros(8, np.float32),
                        "wq": RNG.standard_normal((8, 4)).astype(np.float32),
                        "wk": RNG.standard_normal((8, 4)).astype(np.float32)}.items():
        model.graph.initializer.append(onnx.numpy_helper.from_array(value, name))
    for i, n in enumerate(model.graph.node):
        n.name = f"n{i}"
    return model


def test_smoothquant_insert_puts_one_mul_before_the_matmuls_and_leaves_the_residual(tmp_path):
    x = RNG.standard_normal((64, 8)).astype(np.float32)
    model = _post_norm_block()
    ctx = PassContext(workdir=tmp_path, calibration=lambda: iter([{"x": x}]))
    assert not create({"name": "smoothquant"}, ctx)(ir.from_proto(model)).modified  # nothing to fold into
    result = create({"name": "smoothquant", "insert": True}, ctx)(ir.from_proto(model))
    out = ir.to_proto(result.model)
    assert result.stats["smoothed"] == 2 and result.stats["inserted"] == 1
    muls = [n for n in out.graph.node if n.op_type == "Mul"]
    assert len(muls) == 1 and muls[0].input[0] == "h"
    readers = {n.op_type: n.input[0] for n in out.graph.node if n.op_type in ("MatMul", "Add")}
    assert readers["MatMul"] == muls[0].output[0] and readers["Add"] == "h"  # the residual reads the unscaled value
    session = ort.InferenceSession(out.SerializeToString(), providers=["CPUExecutionProvider"])
    reference = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    for got, want in zip(session.run(None, {"x": x}), reference.run(None, {"x": x}), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-3)
    probe = onnx.ModelProto()
    probe.CopyFrom(out)
    probe.graph.output.append(onnx.helper.make_empty_tensor_value_info(muls[0].output[0]))
    seen = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"]).run([muls[0].output[0]], {"x": x})[0]
    h = reference.run(None, {"x": x})[2] - x
    ratio = lambda a: np.abs(a).max(0).max() / np.median(np.abs(a).max(0))  # noqa: E731
    assert ratio(seen) < ratio(h) / 2


def _erf_gelu(x: str) -> str:
    """h = GELU(x) the way the exporter writes it (ORT fuses it only while the 0.5 stays a scalar)."""
    return f"d = Div ({x}, root2)\n e = Erf (d)\n a = Add (e, one)\n m = Mul ({x}, a)\n h = Mul (m, half)\n"


GELU_CONSTANTS = "<float root2 = {1.4142135}, float one = {1.0}, float half = {0.5}>"


def _gelu_ffn_out() -> onnx.ModelProto:
    """An Erf GELU feeding a MatMul."""
    model = onnx.parser.parse_model(f"""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[N, 8] x) => (float[N, 4] y) {GELU_CONSTANTS} {{
        {_erf_gelu("x")}
        y = MatMul (h, w)
    }}""")
    model.graph.initializer.append(onnx.numpy_helper.from_array(RNG.standard_normal((8, 4)).astype(np.float32), "w"))
    for i, n in enumerate(model.graph.node):
        n.name = f"n{i}"
    return model


def test_smoothquant_insert_keeps_the_gelu_pattern_fusable(tmp_path):
    x = RNG.standard_normal((64, 8)).astype(np.float32)
    x[:, 2] *= 30
    model = _gelu_ffn_out()
    ctx = PassContext(workdir=tmp_path, calibration=lambda: iter([{"x": x}]))
    folded = ir.to_proto(create({"name": "smoothquant"}, ctx)(ir.from_proto(model)).model)
    inserted = ir.to_proto(create({"name": "smoothquant", "insert": True}, ctx)(ir.from_proto(model)).model)
    assert [n.op_type for n in folded.graph.node] == [n.op_type for n in model.graph.node]  # folded into the 0.5
    assert [n.op_type for n in inserted.graph.node][-2:] == ["Mul", "MatMul"] and len(inserted.graph.node) == 7
    half = next(n for n in inserted.graph.node if n.name == "n4")
    assert half.input[1] == "half"  # the GELU's scalar is untouched
    for candidate in (folded, inserted):
        np.testing.assert_allclose(_run(candidate, x), _run(model, x), rtol=1e-4, atol=1e-3)
    assert "Gelu" in _ort_ops(inserted, tmp_path) and "Gelu" not in _ort_ops(folded, tmp_path)


def _ort_ops(model: onnx.ModelProto, tmp_path: Path) -> set[str]:
    """Op types of the graph ORT runs after its own session-time fusions."""
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "ort_optimized.onnx")
    ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return {n.op_type for n in onnx.load(options.optimized_model_filepath).graph.node}


def _ffn(outlier: float = 8.0, hidden: int = 256) -> onnx.ModelProto:
    """x → MatMul(w1) → Add(b1) → Erf GELU → MatMul(w2): BERT's FFN, one hidden channel made an outlier."""
    model = onnx.parser.parse_model(f"""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[N, T, 4] x) => (float[N, T, 4] y) {GELU_CONSTANTS} {{
        p = MatMul (x, w1)
        z = Add (p, b1)
        {_erf_gelu("z")}
        y = MatMul (h, w2)
    }}""")
    w1 = RNG.standard_normal((4, hidden)).astype(np.float32)
    b1 = RNG.standard_normal(hidden).astype(np.float32)
    w1[:, 5] *= outlier
    b1[5] = 4 * outlier
    for name, value in {"w1": w1, "b1": b1, "w2": RNG.standard_normal((hidden, 4)).astype(np.float32)}.items():
        model.graph.initializer.append(onnx.numpy_helper.from_array(value, name))
    for i, n in enumerate(model.graph.node):
        n.name = f"n{i}"
    return model


@pytest.mark.parametrize("insert", [True, False])
def test_smoothquant_split_copies_outlier_channels_exactly(tmp_path, insert):
    x = RNG.standard_normal((4, 6, 4)).astype(np.float32)
    model = _ffn()
    ctx = PassContext(workdir=tmp_path, calibration=lambda: iter([{"x": x}]))
    result = create({"name": "smoothquant", "insert": insert, "split": 1.5, "min_ratio": 2.0}, ctx)(ir.from_proto(model))
    out = ir.to_proto(result.model)
    extra = result.stats["split_channels"]["n7"]
    assert extra >= 1 and result.stats["inserted"] == int(insert)
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in out.graph.initializer}
    first, last = (next(n for n in out.graph.node if n.name == k) for k in ("n0", "n7"))
    assert inits[first.input[1]].shape == (4, 256 + extra) and inits[last.input[1]].shape == (256 + extra, 4)
    assert not {"w1", "b1", "w2"} & set(inits)  # no narrower copy left behind in the file
    assert {i.name: tuple(i.dims) for i in model.graph.initializer}["w1"] == (4, 256)  # the input is untouched
    np.testing.assert_allclose(_run(out, x), _run(model, x), rtol=1e-4, atol=1e-3)
    # what the second MatMul now reads: no channel over 1.5x the 99th percentile of the original maxima
    before = np.abs(_hidden(model, x)).reshape(-1, 256).max(0)
    probe = onnx.ModelProto()
    probe.CopyFrom(out)
    probe.graph.output.append(onnx.helper.make_empty_tensor_value_info(last.input[0]))
    seen = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"]).run([last.input[0]], {"x": x})[0]
    peak = np.abs(seen).reshape(-1, seen.shape[-1]).max(0)
    assert before.max() > 3 * np.percentile(before, 99) and peak.max() <= 1.5 * np.percentile(before, 99) * 1.001
    if insert:
        assert {"Gelu", "BiasGelu"} & _ort_ops(out, tmp_path)  # the scalar 0.5 stays, so ORT still fuses the GELU


def _hidden(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    probe.graph.output.append(onnx.helper.make_empty_tensor_value_info("h"))
    return ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"]).run(["h"], {"x": x})[0]


def test_smoothquant_split_needs_a_channelwise_path(tmp_path):
    """A LayerNorm between the MatMuls mixes channels: no split, plain smoothing instead."""
    x = RNG.standard_normal((64, 8)).astype(np.float32)
    ctx = PassContext(workdir=tmp_path, calibration=lambda: iter([{"x": x}]))
    result = create({"name": "smoothquant", "insert": True, "split": 1.5}, ctx)(ir.from_proto(_post_norm_block()))
    assert "split_channels" not in result.stats and result.stats["inserted"] == 1


def _ffn_with_second_reader() -> onnx.ModelProto:
    """The FFN above whose GELU output ``h`` is also read by a Relu that is a graph output."""
    model = _ffn()
    h_info = onnx.helper.make_tensor_value_info("r", onnx.TensorProto.FLOAT, ["N", "T", 256])
    model.graph.node.append(onnx.helper.make_node("Relu", ["h"], ["r"], name="relu_reader"))
    model.graph.output.append(h_info)
    return model


def test_smoothquant_split_leaves_other_readers_of_the_activation_alone(tmp_path):
    x = RNG.standard_normal((4, 6, 4)).astype(np.float32)
    model = _ffn_with_second_reader()
    ctx = PassContext(workdir=tmp_path, calibration=lambda: iter([{"x": x}]))
    out = ir.to_proto(create({"name": "smoothquant", "insert": True, "split": 1.5}, ctx)(ir.from_proto(model)).model)
    onnx.checker.check_model(out, full_check=True)
    session = ort.InferenceSession(out.SerializeToString(), providers=["CPUExecutionProvider"])
    reference = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    got, want = session.run(None, {"x": x}), reference.run(None, {"x": x})
    assert [g.shape for g in got] == [w.shape for w in want] == [(4, 6, 4), (4, 6, 256)]
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-3)


def test_smoothquant_copies_a_weight_another_matmul_shares(tmp_path):
    """Two activations read by MatMuls with one weight: scaling it for the first must not change the second."""
    model = onnx.parser.parse_model("""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[N, 8] x, float[N, 8] z) => (float[N, 4] y, float[N, 4] v) <float half = {0.5}, float third = {0.3}> {
        h = Mul (x, half)
        y = MatMul (h, w)
        g = Mul (z, third)
        v = MatMul (g, w)
    }""")
    model.graph.initializer.append(onnx.numpy_helper.from_array(RNG.standard_normal((8, 4)).astype(np.float32), "w"))
    for i, n in enumerate(model.graph.node):
        n.name = f"n{i}"
    x = RNG.standard_normal((64, 8)).astype(np.float32)
    x[:, 3] *= 50  # only x has an outlier channel; z is flat and stays unsmoothed
    z = RNG.standard_normal((64, 8)).astype(np.float32)
    ctx = PassContext(workdir=tmp_path, calibration=lambda: iter([{"x": x, "z": z}]))
    result = create({"name": "smoothquant", "alpha": 0.5}, ctx)(ir.from_proto(model))
    out = ir.to_proto(result.model)
    assert result.stats["nodes"] == ["n1"]
    feed = {"x": x, "z": z}
    got = ort.InferenceSession(out.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feed)
    want = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feed)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-3)
