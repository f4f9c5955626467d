"""unfuse.skiplayernorm on tiny graphs built inline: same outputs, and ORT no longer fuses."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest

from edgepipe.passes import PassContext, create

RNG = np.random.default_rng(0)
SHAPE = (2, 5, 8)  # ORT's SkipLayerNormFusion wants 3-D Add inputs: on [5, 8] it does not fuse at all


def _weights(model: onnx.ModelProto, *names: str) -> onnx.ModelProto:
    for name in names:
        model.graph.initializer.append(onnx.numpy_helper.from_array(RNG.standard_normal(8).astype(np.float32), name))
    for i, n in enumerate(model.graph.node):
        n.name = f"n{i}"
    return model


def _residual_ln(body: str = "s = Add (x, r)\n y = LayerNormalization <axis = -1, epsilon = 1e-5> (s, gamma, beta)",
                 outputs: str = "float[2, 5, 8] y") -> onnx.ModelProto:
    return _weights(onnx.parser.parse_model(f"""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[2, 5, 8] x, float[2, 5, 8] r) => ({outputs}) {{
        {body}
    }}"""), "gamma", "beta")


def _skip_ln(outputs: str, consumer: str, beta: bool = True, bias: bool = True) -> onnx.ModelProto:
    args = ["x", "r", "gamma", "beta" if beta else "", "bias" if bias else ""]
    while not args[-1]:
        args.pop()
    return _weights(onnx.parser.parse_model(f"""
    <ir_version: 8, opset_import: ["" : 17, "com.microsoft" : 1]>
    g (float[2, 5, 8] x, float[2, 5, 8] r) => (float[2, 5, 8] z) {{
        {outputs} = com.microsoft.SkipLayerNormalization <epsilon = 1e-5> ({", ".join(args)})
        {consumer}
    }}"""), *[a for a in ("gamma", "beta", "bias") if a in args])


def _feeds() -> dict[str, np.ndarray]:
    return {k: RNG.standard_normal(SHAPE).astype(np.float32) for k in ("x", "r")}


def _run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)


def _optimized_ops(model: onnx.ModelProto, tmp_path, stem: str) -> list[str]:
    """The op types ORT actually runs: its ORT_ENABLE_ALL graph, dumped."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.optimized_model_filepath = str(tmp_path / f"{stem}.onnx")
    options.log_severity_level = 3
    ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return [n.op_type for n in onnx.load(options.optimized_model_filepath).graph.node]


def _unfuse(model: onnx.ModelProto, tmp_path):
    result = create({"name": "unfuse.skiplayernorm"}, PassContext(workdir=tmp_path))(ir.from_proto(model))
    return result, ir.to_proto(result.model)


def test_residual_add_becomes_sum_and_ort_no_longer_fuses(tmp_path):
    model = _residual_ln()
    result, out = _unfuse(model, tmp_path)
    assert result.modified and result.stats["rewritten"] == 1 and result.stats["decomposed"] == 0
    assert [(n.op_type, n.name) for n in out.graph.node] == [("Sum", "n0"), ("LayerNormalization", "n1")]
    feeds = _feeds()
    np.testing.assert_allclose(_run(out, feeds)[0], _run(model, feeds)[0], rtol=1e-5, atol=1e-5)
    assert "SkipLayerNormalization" in _optimized_ops(model, tmp_path, "before")  # ORT does fuse the original
    assert _optimized_ops(out, tmp_path, "after") == ["Sum", "LayerNormalization"]
    again = create({"name": "unfuse.skiplayernorm"}, PassContext(workdir=tmp_path))(result.model)
    assert not again.modified and again.stats["rewritten"] == again.stats["decomposed"] == 0

def test_the_input_model_is_not_edited(tmp_path):
    model = ir.from_proto(_residual_ln())
    create({"name": "unfuse.skiplayernorm"}, PassContext(workdir=tmp_path))(model)
    assert [n.op_type for n in model.graph] == ["Add", "LayerNormalization"]


def test_only_the_add_feeding_the_norm_and_only_with_one_reader(tmp_path):
    bias_then_residual = _residual_ln("h = Add (x, bias)\n s = Add (h, r)\n"
                                      " y = LayerNormalization <axis = -1, epsilon = 1e-5> (s, gamma, beta)")
    bias_then_residual.graph.initializer.append(onnx.numpy_helper.from_array(np.ones(8, np.float32), "bias"))
    _, out = _unfuse(bias_then_residual, tmp_path)
    assert [n.op_type for n in out.graph.node] == ["Add", "Sum", "LayerNormalization"]

    shared = _residual_ln("s = Add (x, r)\n y = LayerNormalization <axis = -1, epsilon = 1e-5> (s, gamma, beta)\n"
                          " z = Relu (s)", "float[2, 5, 8] y, float[2, 5, 8] z")
    result, out = _unfuse(shared, tmp_path)
    assert not result.modified and out.graph.node[0].op_type == "Add"

    as_output = _residual_ln(outputs="float[2, 5, 8] y, float[2, 5, 8] s")
    assert not _unfuse(as_output, tmp_path)[0].modified


@pytest.mark.parametrize(("beta", "bias"), [(True, True), (True, False), (False, True)])
def test_skip_layer_norm_is_decomposed_with_equal_outputs(tmp_path, beta, bias):
    model = _skip_ln("y", "z = Relu (y)", beta=beta, bias=bias)
    result, out = _unfuse(model, tmp_path)
    assert result.modified and result.stats["decomposed"] == 1
    assert [n.op_type for n in out.graph.node] == ["Sum", "LayerNormalization", "Relu"]
    assert len(out.graph.node[0].input) == 2 + bias and len(out.graph.node[1].input) == 2 + beta
    assert "com.microsoft" not in {o.domain for o in out.opset_import}
    feeds = _feeds()
    np.testing.assert_allclose(_run(out, feeds)[0], _run(model, feeds)[0], rtol=1e-5, atol=1e-5)
    assert "SkipLayerNormalization" not in _optimized_ops(out, tmp_path, "after")
    assert not create({"name": "unfuse.skiplayernorm"}, PassContext(workdir=tmp_path))(result.model).modified


def test_skip_layer_norm_sum_output_is_kept_and_stats_outputs_block(tmp_path):
    model = _skip_ln("y, , , s", "z = Add (y, s)")  # output 3 (input + skip + bias) read downstream
    result, out = _unfuse(model, tmp_path)
    assert result.stats["decomposed"] == 1
    assert out.graph.node[0].op_type == "Sum" and list(out.graph.node[0].output) == ["s"]
    feeds = _feeds()
    np.testing.assert_allclose(_run(out, feeds)[0], _run(model, feeds)[0], rtol=1e-5, atol=1e-5)

    with_mean = _skip_ln("y, m", "z = Add (y, m)")  # mean has another shape than LayerNormalization's
    result, out = _unfuse(with_mean, tmp_path)
    assert not result.modified and out.graph.node[0].op_type == "SkipLayerNormalization"
    assert "mean/inv_std_var" in result.stats["summary"]


def test_old_opsets_are_left_alone(tmp_path):
    model = _skip_ln("y", "z = Relu (y)")
    model.opset_import[0].version = 16  # no LayerNormalization before opset 17
    result, out = _unfuse(model, tmp_path)
    assert not result.modified and "opset 16 < 17" in result.stats["summary"]
    assert out.graph.node[0].op_type == "SkipLayerNormalization"
