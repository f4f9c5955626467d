"""Every graph output is checked (shape, dtype, NaN/Inf, closeness), not only the one the metric reads."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort

from edgepipe.cli import main
from edgepipe.pipeline.outputs import check_outputs, measure_every_output
from edgepipe.recipe import AccuracySpec
from edgepipe.sources.accuracy import resolve_metric

HEADER = '<ir_version: 10, opset_import: ["" : 17]>'
# y1 is what the metric reads; y2 is a second output (a Relu feature map, as in the audit's case).
GOOD = HEADER + """
two (float[N, 4] x) => (float[N, 3] y1, float[N, 5] y2) {
    w1 = Constant <value = float[4, 3] {0.5, -1.0, 2.0, 1.5, 0.25, -0.5, -2.0, 1.0, 0.75, 1.0, -1.5, 0.5}> ()
    w2 = Constant <value = float[4, 5] {1.0, 0.0, -1.0, 2.0, 0.5, -0.5, 1.5, 0.25, 1.0, -1.0, 2.0, -2.0, 0.5, 0.0, 1.0, 0.25, 1.0, -0.75, 1.5, 0.5}> ()
    y1 = MatMul (x, w1)
    h = MatMul (x, w2)
    y2 = Relu (h)
}
"""
# The same model whose second output was widened by a channel (what a bad channel split does).
WIDE = GOOD.replace("float[N, 5] y2", "float[N, 6] y2").replace(
    "    y2 = Relu (h)", "    r = Relu (h)\n    extra = Slice (r, s0, s1, ax)\n    y2 = Concat <axis = 1> (r, extra)"
).replace("    y1 = MatMul", "    s0 = Constant <value = int64[1] {0}> ()\n    s1 = Constant <value = int64[1] {1}> ()\n"
          "    ax = Constant <value = int64[1] {1}> ()\n    y1 = MatMul")
# ... or whose second output went NaN (log of a Relu output that is 0 somewhere, times 0).
NAN = GOOD.replace("    y2 = Relu (h)", "    r = Relu (h)\n    l = Log (r)\n    z = Constant <value = float {0.0}> ()\n    y2 = Mul (l, z)")


def _run(text: str, x: np.ndarray) -> dict[str, np.ndarray]:
    sess = ort.InferenceSession(ir.to_proto(ir.from_onnx_text(text)).SerializeToString(), providers=["CPUExecutionProvider"])
    return dict(zip([o.name for o in sess.get_outputs()], sess.run(None, {"x": x}), strict=True))


X = np.random.default_rng(0).standard_normal((16, 4)).astype(np.float32)
SPEC = AccuracySpec(metric="cosine", max_drop=0.01)  # reads y1 only


def _measure(candidate: dict[str, np.ndarray]):
    reference = _run(GOOD, X)
    return measure_every_output(SPEC, resolve_metric("cosine", None), candidate, reference, None)


def test_a_correct_artifact_passes_every_output():
    acc = _measure(_run(GOOD, X))
    assert acc.passed and set(acc.outputs) == {"y1", "y2"} and all(c["passed"] for c in acc.outputs.values())
    assert acc.outputs["y2"]["cosine"] == 1.0 and acc.outputs["y2"]["shape"] == [16, 5]


def test_a_widened_second_output_fails_though_the_metric_output_is_exact():
    acc = _measure(_run(WIDE, X))
    assert acc.value == 1.0  # the budget alone would pass
    assert not acc.passed and acc.outputs["y1"]["passed"] and not acc.outputs["y2"]["passed"]
    assert acc.outputs["y2"]["shape"] == [16, 6]


def test_nan_in_the_second_output_fails():
    cand = _run(NAN, X)
    assert np.isnan(cand["y2"]).any() and np.isfinite(cand["y1"]).all()
    acc = _measure(cand)
    assert not acc.passed and acc.outputs["y1"]["passed"] and acc.outputs["y2"]["finite"] is False


def test_dtype_missing_extra_and_far_outputs_fail():
    good = _run(GOOD, X)
    checks = check_outputs({**good, "y2": good["y2"].astype(np.float16)}, good, 0.99)
    assert not checks["y2"]["passed"] and checks["y1"]["passed"]
    assert not check_outputs({"y1": good["y1"]}, good, 0.99)["y2"]["passed"]
    assert not check_outputs({**good, "y3": good["y1"]}, good, 0.99)["y3"]["passed"]
    noisy = good["y2"] + np.random.default_rng(1).standard_normal(good["y2"].shape).astype(np.float32) * 3
    assert not check_outputs({**good, "y2": noisy}, good, 0.95)["y2"]["passed"]
    assert check_outputs({**good, "y2": noisy}, good, -1.0)["y2"]["passed"]  # the recipe can loosen it
    zeros = {"y1": np.zeros((2, 3), np.float32)}
    assert check_outputs(zeros, zeros, 0.99)["y1"]["passed"]  # all-zero rows on both sides agree
    ints = {"y1": np.arange(6).reshape(2, 3)}
    assert not check_outputs({"y1": ints["y1"][::-1].copy()}, ints, 0.99)["y1"]["passed"]


# y2's weight holds one huge value whose input is scaled down: per-tensor int8 (step 1e4/127) rounds every
# other weight to 0, so y2 drifts far from the reference while y1, the metric's output, stays exact.
SKEWED = HEADER + """
skewed (float[N, 4] x) => (float[N, 4] y1, float[N, 5] y2)
   <float[4] s = {0.0001, 1.0, 1.0, 1.0}, float[4, 5] w = {10000.0, 0.5, -1.0, 2.0, 1.5, 0.25, -0.5, -2.0, 1.0, 0.75,
                                                           1.0, -1.5, 0.5, 1.0, -1.0, 0.5, 2.0, -0.75, 1.25, -2.0}> {
    y1 = Sigmoid (x)
    xs = Mul (x, s)
    y2 = MatMul (xs, w)
}
"""


def test_build_fails_naming_the_output_that_drifted(tmp_path, capsys):
    onnx.save(ir.to_proto(ir.from_onnx_text(SKEWED)), str(tmp_path / "big.onnx"))
    np.savez(tmp_path / "eval.npz", x=X)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        "name: big\nmodel: {onnx: big.onnx}\ninputs: [{name: x, shape: [batch, 4]}]\ndata: {eval: eval.npz}\n"
        "accuracy: {metric: cosine, max_drop: 0.01, output: y1}\n"
        "targets: {cpu: {passes: [{name: quantize.dynamic, per_channel: false}]}}\n"
    )
    assert main(["build", str(recipe), "-o", str(tmp_path / "out"), "--json"]) == 1
    (target,) = json.loads(capsys.readouterr().out)["units"]
    assert not target["passed"] and target["folder"] is None and not (tmp_path / "out" / "big" / "cpu").exists()
    assert "'y2'" in target["error"] and "'y1'" not in target["error"]
    outputs = target["accuracy"]["outputs"]
    assert outputs["y1"]["passed"] and not outputs["y2"]["passed"] and outputs["y2"]["cosine"] < 0.9
    assert target["accuracy"]["value"] > 0.99  # the budget metric itself passed
