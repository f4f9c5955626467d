"""fp16 pass: float16 weights, float32 I/O, measured overflow kept in float32 with reasons."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest

from edgepipe.passes.base import PassContext, save
from edgepipe.passes.fp16 import Fp16, Fp16Config

# y = (x @ I) * 30000 * 4 / 100000: z = 1.2e5 * x overflows float16 (65504) for |x| near 1.
OVERFLOW = """<ir_version: 10, opset_import: ["" : 17]>
agraph (float[N, 4] x) => (float[N, 4] y)
<float[4,4] w = {1.0,0,0,0, 0,1.0,0,0, 0,0,1.0,0, 0,0,0,1.0}, float big = {30000.0}, float four = {4.0}, float down = {0.00001}> {
  m = MatMul(x, w)
  h = Mul(m, big)
  z = Mul(h, four)
  y = Mul(z, down)
}"""


def _calibration():
    rng = np.random.default_rng(0)
    batches = [{"x": rng.uniform(-1, 1, (16, 4)).astype(np.float32)} for _ in range(2)]
    return lambda: iter(batches)


def _run(model: ir.Model, tmp_path, x: np.ndarray) -> tuple[np.ndarray, ort.InferenceSession]:
    path = save(model, tmp_path / "m.onnx")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0], session


def test_overflowing_nodes_stay_float32_with_reasons(tmp_path):
    model = ir.from_onnx_text(OVERFLOW)
    result = Fp16(Fp16Config(headroom=1.0), PassContext(tmp_path, calibration=_calibration()))(model)
    kept = {k["op"]: k["reason"] for k in result.stats["kept_float32"]}
    assert len(result.stats["kept_float32"]) == 2  # the Mul that makes z and the Mul that reads it
    assert all("max |x| 1.2e+05 > 65504" in r for r in kept.values())
    assert result.stats["finite_check"].startswith("no NaN/Inf in any tensor")
    x = np.full((3, 4), 0.99, np.float32)
    y, session = _run(result.model, tmp_path, x)
    assert np.all(np.isfinite(y)) and np.allclose(y, 0.99 * 1.2, rtol=2e-3)
    assert session.get_inputs()[0].type == "tensor(float)" and session.get_outputs()[0].type == "tensor(float)"
    # The matmul weight is float16: only the overflow path stays float32.
    weights = {i.name: i.data_type for i in ir.to_proto(result.model).graph.initializer}
    assert weights["w"] == onnx.TensorProto.FLOAT16


def test_headroom_blocks_earlier(tmp_path):
    # With the default headroom 4 the limit is 16376: h (3e4) is already too close to the edge.
    result = Fp16(Fp16Config(), PassContext(tmp_path, calibration=_calibration()))(ir.from_onnx_text(OVERFLOW))
    reasons = " ".join(k["reason"] for k in result.stats["kept_float32"])
    assert "h: max |x| 3e+04 > 16376" in reasons


def test_fixture_really_overflows_without_the_block_list(tmp_path):
    """ORT's converter alone stores z as float16, where it is Inf: the block list is what saves it.

    (ORT's CPU provider computes float16 ops it has no kernel for in float32, so the final output
    can look fine on CPU; CUDA computes in float16 and would not.)
    """
    from onnxruntime.transformers.float16 import convert_float_to_float16

    from edgepipe.passes.probe import probe

    naive = ir.from_proto(convert_float_to_float16(ir.to_proto(ir.from_onnx_text(OVERFLOW)), keep_io_types=True))
    seen = probe(naive, _calibration()(), 64, tmp_path, infer=False)
    assert "z" in seen.nonfinite


def test_no_calibration_blocks_overflow_prone_ops(tmp_path):
    text = """<ir_version: 10, opset_import: ["" : 17]>
    agraph (float[N, 4] x) => (float[N, 4] y) { e = Exp(x)  y = Relu(e) }"""
    result = Fp16(Fp16Config(), PassContext(tmp_path))(ir.from_onnx_text(text))
    assert [k["op"] for k in result.stats["kept_float32"]] == ["Exp"]
    assert "no calibration data" in result.stats["kept_float32"][0]["reason"]
    assert result.stats["finite_check"].startswith("not run")


def test_idempotent(tmp_path):
    once = Fp16(Fp16Config(), PassContext(tmp_path, calibration=_calibration()))(ir.from_onnx_text(OVERFLOW))
    twice = Fp16(Fp16Config(), PassContext(tmp_path, calibration=_calibration()))(once.model)
    assert not twice.modified and "already float16" in twice.stats["skipped"]


def test_recipe_rejects_bad_option():
    from edgepipe.passes import validate_spec

    with pytest.raises(ValueError, match="unknown option 'headrom'"):
        validate_spec({"name": "fp16", "headrom": 2})


def test_digits_fp16_artifact_has_half_weights_and_float_io(digits_build):
    model = onnx.load(str(digits_build / "gpu" / "model.onnx"))
    types = {i.data_type for i in model.graph.initializer} - {onnx.TensorProto.INT64}  # Reshape's shape
    assert types == {onnx.TensorProto.FLOAT16}
    assert [i.type.tensor_type.elem_type for i in model.graph.input] == [onnx.TensorProto.FLOAT]
    assert [o.type.tensor_type.elem_type for o in model.graph.output] == [onnx.TensorProto.FLOAT]


def test_repair_blocks_what_still_overflows_in_float16(tmp_path):
    """The NaN/Inf check on the converted model: starting from a plain conversion, it finds z, blocks the
    node that makes it, then the consumer behind the converter's Cast, until no tensor overflows."""
    from edgepipe.passes.fp16 import DEFAULT_OP_BLOCK_LIST, _convert
    from edgepipe.passes.probe import probe

    ctx = PassContext(tmp_path, calibration=_calibration())
    fp16 = Fp16(Fp16Config(headroom=1.0), ctx)
    named = ir.from_onnx_text(OVERFLOW)
    ir.passes.common.NameFixPass()(named)
    fp32 = probe(named, _calibration()(), 64, tmp_path)
    ops, reasons = sorted(DEFAULT_OP_BLOCK_LIST), {}
    result, verdict = fp16._repair(named, _convert(named, ops, reasons), ops, reasons, fp32)
    assert verdict.startswith("no NaN/Inf")
    assert sorted(op for op, _ in reasons.values()) == ["Mul", "Mul"]
    assert all("NaN/Inf in float16" in why for _, why in reasons.values())
    y, _ = _run(result, tmp_path, np.full((2, 4), 0.99, np.float32))
    assert np.allclose(y, 0.99 * 1.2, rtol=2e-3)


def test_infinities_the_float_model_has_are_not_errors(tmp_path):
    # log(relu(x)) is -inf for x <= 0 in float32 already; exp brings it back. Not an fp16 problem.
    text = """<ir_version: 10, opset_import: ["" : 17]>
    agraph (float[N, 4] x) => (float[N, 4] y) { r = Relu(x)  l = Log(r)  y = Exp(l) }"""
    result = Fp16(Fp16Config(), PassContext(tmp_path, calibration=_calibration()))(ir.from_onnx_text(text))
    assert result.stats["finite_check"].startswith("no NaN/Inf")
    y, _ = _run(result.model, tmp_path, np.array([[-1, 0.5, 2, -3]], np.float32))
    assert np.allclose(y, [[0, 0.5, 2, 0]], atol=1e-3)
