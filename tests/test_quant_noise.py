"""quantize.auto's probe ranking: one run of the int8 graph ranks the nodes; the search evaluates a handful of candidates."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
import torch
from user_factories import outlier_mlp

from edgepipe.passes import PassContext, create
from edgepipe.passes.autoquant import keep_float, quantized_nodes
from edgepipe.passes.quant_noise import noise
from edgepipe.passes.quantize import QuantizeStatic


def _data(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 8)).astype(np.float32)


@pytest.fixture(scope="module")
def mlp(tmp_path_factory) -> ir.Model:
    path = tmp_path_factory.mktemp("mlp") / "mlp.onnx"
    torch.onnx.export(outlier_mlp(), (torch.from_numpy(_data(1, 0)),), str(path), input_names=["x"], output_names=["y"],
                      dynamic_axes={"x": {0: "batch"}}, dynamo=False)
    return ir.load(path)


def _outputs(model: ir.Model | onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    proto = model if isinstance(model, onnx.ModelProto) else ir.to_proto(model)
    return ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


def _context(tmp_path, mlp: ir.Model, calls: list[int]) -> PassContext:
    x = _data(32, 2)
    ref = _outputs(mlp, x)

    def evaluate(model, samples: int | None = None) -> float:  # mean cosine to the float model's outputs
        calls.append(1)
        y, r = _outputs(model, x[:samples]), ref[:samples]
        return float(np.mean(np.sum(y * r, 1) / (np.linalg.norm(y, axis=1) * np.linalg.norm(r, axis=1))))

    return PassContext(workdir=tmp_path, calibration=lambda: iter([{"x": _data(16, 1)}]), evaluate=evaluate, accept=lambda s: s >= 0.999)


def test_the_node_reading_the_outlier_activation_is_the_noisiest(tmp_path, mlp):
    ctx = _context(tmp_path, mlp, [])
    fproto = ir.to_proto(mlp)
    qproto = ir.to_proto(QuantizeStatic(QuantizeStatic.Config(extra_options={"QDQKeepRemovableActivations": True}), ctx)(mlp).model)
    nodes = quantized_nodes(fproto, qproto, None)
    found = noise(fproto, qproto, nodes, ctx.calibration(), 16, tmp_path)
    errors = sorted(zip(found, [n.op_type for n in nodes], range(len(nodes)), strict=True), reverse=True)
    # the hidden activation has one channel 300x the rest: per-tensor int8 of it loses the other channels, and the
    # second Gemm (which reads that channel with a 1/300 weight) is where that error shows; the node ranks first
    (top, op, index), second = errors[0], errors[1][0]
    assert op == "Gemm" and index == [n.op_type for n in nodes].index("Relu") + 1 and top > 5 * second


def test_probe_ranking_searches_with_a_few_evaluations(tmp_path, mlp):
    calls: list[int] = []
    spec = {"name": "quantize.auto", "method": "static", "candidate_ops": None, "max_float": 1.0, "ranking": "probe"}
    result = create(spec, _context(tmp_path, mlp, calls))(mlp)
    stats = result.stats
    assert stats["initial_metric"] < 0.999 <= stats["final_metric"] and stats["passed"]
    assert all("noise" in r for r in stats["sensitivity"])  # ranked by the probe, not one evaluation per node
    assert len(calls) == len(stats["steps"]) < len(stats["sensitivity"]) + 1
    assert 0 < len(stats["kept_float"]) < len(stats["sensitivity"])
    assert _outputs(result.model, _data(4, 7)).shape == (4, 4)


def test_keep_float_of_every_node_is_the_float_model(tmp_path, mlp):
    """Restored nodes read float weights, biases included (ORT names a bias's DequantizeLinear output as the bias)."""
    ctx = _context(tmp_path, mlp, [])
    fproto = ir.to_proto(mlp)
    qproto = ir.to_proto(QuantizeStatic(QuantizeStatic.Config(extra_options={"QDQKeepRemovableActivations": True}), ctx)(mlp).model)
    restored = keep_float(qproto, fproto, [n.name for n in quantized_nodes(fproto, qproto, None)])
    x = _data(8, 3)
    np.testing.assert_array_equal(_outputs(restored, x), _outputs(mlp, x))


def test_unnamed_nodes_are_ranked_and_kept_float_by_the_quantizers_names(tmp_path, mlp):
    """An exported graph may leave nodes unnamed (seen: MobileNetV3-Small, 'two nodes with same node name')."""
    proto = ir.to_proto(mlp)
    for node in proto.graph.node:
        node.name = ""
    unnamed = ir.from_proto(proto)
    spec = {"name": "quantize.auto", "method": "static", "candidate_ops": None, "max_float": 1.0, "ranking": "probe"}
    result = create(spec, _context(tmp_path, unnamed, []))(unnamed)
    assert result.stats["passed"] and all(r["node"] for r in result.stats["sensitivity"])
    assert len({r["node"] for r in result.stats["sensitivity"]}) == len(result.stats["sensitivity"])
    assert _outputs(result.model, _data(4, 7)).shape == (4, 4)
