"""quantize.static's bias_correction: per-channel mean of the int8 error moved into the bias (Conv / Gemm)."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from passes_util import check_contract, make_model, node, run, same, tensor

from edgepipe.passes import PassContext
from edgepipe.passes.quantize import QuantizeStatic

RNG = np.random.default_rng(0)


def _gemm() -> tuple[ir.Model, np.ndarray]:
    """One Gemm whose per-tensor int8 weights are coarse (one large weight sets the scale) on inputs with a large
    mean: each output's rounding error is mostly a constant, (Wq − W)ᵀ E[x]."""
    w = (RNG.standard_normal((32, 16)) * 0.05).astype(np.float32)
    w[0, 0] = 4.0
    model = make_model([node("Gemm", ["x", "w", "b"], ["y"])], {"w": w, "b": np.zeros(16, np.float32)},
                       [tensor("x", ["n", 32])], [tensor("y", ["n", 16])])
    return model, (3 + 0.3 * RNG.standard_normal((256, 32))).astype(np.float32)


def _cnn() -> tuple[ir.Model, np.ndarray]:
    """Conv → Relu → depthwise Conv → Relu → Conv: the inverted-residual shape of the zoo's MobileNets."""
    w1 = (RNG.standard_normal((16, 3, 3, 3)) * 0.3).astype(np.float32)
    dw = (RNG.standard_normal((16, 1, 3, 3)) * 0.3).astype(np.float32)
    dw[0] *= 20  # one wide depthwise channel: per-tensor weights round the others coarsely
    w3 = (RNG.standard_normal((8, 16, 1, 1)) * 0.3).astype(np.float32)
    nodes = [node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1]), node("Relu", ["c1"], ["r1"]),
             node("Conv", ["r1", "dw", "b2"], ["c2"], pads=[1, 1, 1, 1], group=16), node("Relu", ["c2"], ["r2"]),
             node("Conv", ["r2", "w3", "b3"], ["y"])]
    inits = {"w1": w1, "b1": np.full(16, 0.2, np.float32), "dw": dw, "b2": np.full(16, 0.1, np.float32),
             "w3": w3, "b3": np.zeros(8, np.float32)}
    model = make_model(nodes, inits, [tensor("x", ["n", 3, 8, 8])], [tensor("y", ["n", 8, 8, 8])])
    return model, (1 + 0.5 * RNG.standard_normal((64, 3, 8, 8))).astype(np.float32)


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.reshape(len(a), -1), b.reshape(len(b), -1)
    return float(np.mean((a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)))


def _quantize(model: ir.Model, x: np.ndarray, tmp_path, **options) -> ir.Model:
    half = len(x) // 2
    context = PassContext(workdir=tmp_path, calibration=lambda: iter([{"x": x[:half]}, {"x": x[half:]}]))
    return QuantizeStatic(QuantizeStatic.Config(per_channel=False, **options), context)(model)


def test_bias_correction_removes_the_mean_error_of_coarse_int8_weights(tmp_path):
    for make in (_gemm, _cnn):
        model, x = make()
        ref = run(model, {"x": x})[0]
        plain = _quantize(model, x, tmp_path)
        corrected = _quantize(model, x, tmp_path, bias_correction=True)
        assert corrected.stats["bias_corrected"] == sum(n.op_type in ("Conv", "Gemm") for n in model.graph)
        error = 1 - _cosine(run(plain.model, {"x": x})[0], ref)
        fixed = 1 - _cosine(run(corrected.model, {"x": x})[0], ref)
        assert fixed < error / 2, (make.__name__, error, fixed)
        # only bias values change: the same graph, the same scales
        assert [n.op_type for n in corrected.model.graph] == [n.op_type for n in plain.model.graph]


def test_bias_correction_keeps_the_pass_contract(tmp_path):
    model, x = _cnn()
    before = ir.to_proto(model).SerializeToString(deterministic=True)
    result = _quantize(model, x, tmp_path, bias_correction=True)
    check_contract(result.model)
    assert ir.to_proto(model).SerializeToString(deterministic=True) == before
    again = _quantize(result.model, x, tmp_path, bias_correction=True)
    assert not again.modified and same(again.model, result.model)


def test_the_option_at_its_default_is_not_in_the_manifest_params(tmp_path):
    """An option added after artifacts were published: a recipe that doesn't use it keeps its manifest params (and so
    its content_sha256); one that turns it on records it."""
    from edgepipe.pipeline.build import run_passes

    model, x = _gemm()
    context = PassContext(workdir=tmp_path, calibration=lambda: iter([{"x": x}]))
    params = [run_passes([{"name": "quantize.static", **extra}], context, model)[1][0]["params"]
              for extra in ({}, {"bias_correction": False}, {"bias_correction": True})]
    assert "bias_correction" not in params[0] and params[0] == params[1]
    assert params[2] == {**params[0], "bias_correction": True}
