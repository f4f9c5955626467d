"""Metrics, budgets, Polygraphy-style comparison and build warnings, on small arrays built inline."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

from edgepipe.core.errors import BadInput
from edgepipe.pipeline.checks import data_warnings, speed_note, speed_warning
from edgepipe.recipe import AccuracySpec
from edgepipe.sources.accuracy import (
    BUILTIN,
    budget_met,
    compare,
    compare_outputs,
    cosine_per_sample,
    measure,
    reference_value,
    resolve_metric,
)

RNG = np.random.default_rng(0)
REF = RNG.standard_normal((40, 10)).astype(np.float32)


def _noisy(scale: float) -> np.ndarray:
    return REF + scale * RNG.standard_normal(REF.shape).astype(np.float32)


def test_cosine_mean_and_min_and_nan():
    cand = REF.copy()
    cand[3] = -REF[3]  # one sample flipped
    assert BUILTIN["cosine"].fn(cand, REF, None) == pytest.approx(38 / 40, abs=1e-6)
    assert BUILTIN["cosine_min"].fn(cand, REF, None) == pytest.approx(-1.0, abs=1e-6)
    cand[5, 0] = np.nan
    assert cosine_per_sample(cand, REF)[5] == -1.0  # NaN never passes


def test_top1_and_top5_with_and_without_labels():
    labels = REF.argmax(1)
    cand = REF.copy()
    cand[:10] = np.roll(REF[:10], 1, axis=1)  # moves the argmax: top-1 breaks, top-5 mostly survives
    assert BUILTIN["top1"].fn(cand, REF, labels) == pytest.approx(0.75)
    assert BUILTIN["top1"].fn(cand, REF, None) == pytest.approx(0.75)
    assert BUILTIN["top5"].fn(cand, REF, labels) >= 0.75 and BUILTIN["top5"].fn(REF, REF, labels) == 1.0
    assert BUILTIN["top5"].fn(-REF, REF, labels) < 0.2


def test_rel_l2_max_abs_and_knn10():
    small, large = _noisy(0.01), _noisy(0.5)
    assert BUILTIN["rel_l2"].fn(small, REF, None) < BUILTIN["rel_l2"].fn(large, REF, None)
    assert BUILTIN["max_abs"].fn(small, REF, None) < 0.1 < BUILTIN["max_abs"].fn(large, REF, None)
    assert BUILTIN["knn10"].fn(REF, REF, None) == 1.0
    assert BUILTIN["knn10"].fn(small, REF, None) > BUILTIN["knn10"].fn(large, REF, None)
    assert BUILTIN["knn10"].fn(np.full_like(REF, np.nan), REF, None) == 0.0


def test_custom_metric_from_a_python_file(tmp_path):
    (tmp_path / "m.py").write_text("def score(c, r, y):\n    return float((c.argmax(1) == r.argmax(1)).mean())\n")
    metric = resolve_metric("m.py:score", tmp_path)
    assert metric.fn(REF, REF, None) == 1.0 and metric.higher_is_better


@pytest.mark.parametrize(
    ("budget", "value", "ok"),
    [
        ({"max_drop": 0.02}, 0.97, False),
        ({"max_drop": 0.02}, 0.985, True),
        ({"percent_max_drop": 1.0}, 0.979, False),  # 1% of 0.99 is 0.0099
        ({"percent_max_drop": 1.0}, 0.981, True),
        ({"min_value": 0.98}, 0.979, False),
        ({"min_value": 0.98}, 0.98, True),
        ({"max_drop": 0.5, "min_value": 0.98}, 0.97, False),  # every budget must hold
    ],
)
def test_budgets_in_olives_vocabulary(budget, value, ok):
    spec = AccuracySpec(metric="top1", **budget)
    ref = 0.99 if "percent_max_drop" in budget else 1.0
    assert budget_met(spec, BUILTIN["top1"], ref, value) is ok


def test_lower_is_better_budget_and_min_value_rejected():
    spec = AccuracySpec(metric="rel_l2", max_drop=0.05)
    assert budget_met(spec, BUILTIN["rel_l2"], 0.0, 0.04) and not budget_met(spec, BUILTIN["rel_l2"], 0.0, 0.06)
    with pytest.raises(BadInput, match="min_value does not apply"):
        budget_met(AccuracySpec(metric="rel_l2", min_value=0.1), BUILTIN["rel_l2"], 0.0, 0.0)


def test_measure_with_nan_output_fails_and_reference_value_uses_labels():
    spec = AccuracySpec(metric="cosine", min_value=0.5, output="y")
    cand = {"y": _noisy(0.01)}
    cand["y"][0, 0] = np.inf
    result = measure(spec, BUILTIN["cosine"], cand, {"y": REF}, None)
    assert not result.passed and result.value == -np.inf
    labels = (REF.argmax(1) + 1) % 10  # labels the reference mostly gets wrong
    assert reference_value(AccuracySpec(metric="top1"), BUILTIN["top1"], {"y": REF}, labels) == 0.0


def test_compare_fails_an_element_only_when_both_tolerances_break():
    ref = np.array([1.0, 100.0, 0.0])
    assert compare(ref + [0.5, 0.0, 0.0], ref, atol=0.1, rtol=0.6)["passed"]  # breaks atol only
    assert compare(ref + [0.0, 5.0, 0.0], ref, atol=10, rtol=0.01)["passed"]  # breaks rtol only
    assert not compare(ref + [0.0, 5.0, 0.0], ref, atol=1, rtol=0.01)["passed"]
    assert not compare(np.array([1.0, np.nan, 0.0]), ref, atol=1e9, rtol=1e9)["passed"]  # NaN never passes


def test_compare_statistics_and_per_output_tolerances():
    ref = np.zeros(100)
    cand = ref.copy()
    cand[0] = 1.0  # one outlier
    assert not compare(cand, ref, atol=0.1, rtol=0.1)["passed"]
    assert compare(cand, ref, atol=0.1, rtol=0.1, stat="mean")["passed"]
    assert compare(cand, ref, atol=0.1, rtol=0.1, stat="median")["passed"]
    assert not compare(cand, ref, atol=0.1, rtol=0.1, stat="max")["passed"]
    assert compare(cand, ref, atol=0.1, rtol=0.1, stat="quantile", quantile=0.95)["passed"]
    with pytest.raises(BadInput, match="error statistic"):
        compare(cand, ref, 0.1, 0.1, stat="p99")
    result = compare_outputs({"a": cand, "b": cand}, {"a": ref, "b": ref}, (0.1, 0.1), {"b": (2.0, 0.1)})
    assert not result["a"]["passed"] and result["b"]["passed"]
    with pytest.raises(BadInput, match="'c'"):
        compare_outputs({"a": cand}, {"a": ref}, (0.1, 0.1), {"c": (1, 1)})


def test_data_warnings_for_synthetic_and_scarce_calibration():
    few = lambda: iter([{"x": np.zeros((8, 2))}] * 2)  # noqa: E731
    plenty = lambda: iter([{"x": np.zeros((64, 2))}] * 2)  # noqa: E731
    assert any("synthetic" in w for w in data_warnings("synthetic", None, True))
    assert any("only 16 calibration samples" in w for w in data_warnings("eval", few, True))
    assert data_warnings("eval", plenty, True) == []


def test_speed_warning_names_the_quantization_nodes(tmp_path):
    model = onnx.parser.parse_model("""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[1, 4] x) => (float[1, 4] y) <int8[4, 4] w = {1,0,0,0,0,1,0,0,0,0,1,0,0,0,0,1}, float s = {0.5}, int8 z = {0}> {
        wf = DequantizeLinear (w, s, z)
        y = MatMul (x, wf)
    }""")
    onnx.save(model, tmp_path / "m.onnx")
    assert speed_warning(tmp_path / "m.onnx", 1.0, 2.0) is None
    warning = speed_warning(tmp_path / "m.onnx", 2.0, 1.0)
    assert "not faster than float32" in warning and "1 DequantizeLinear" in warning and "MatMul" in warning
    assert "0 int8 kernels" in warning
    # Built for TensorRT, timed on ORT's CPU provider (emulated Q/DQ): slower is expected, so no warning, a note.
    trt = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    assert speed_warning(tmp_path / "m.onnx", 2.0, 1.0, trt, ["CPUExecutionProvider"]) is None
    assert speed_note(trt, ["CPUExecutionProvider"], 2.0, 1.0) is not None
    assert speed_note(["CPUExecutionProvider"], ["CPUExecutionProvider"], 2.0, 1.0) is None
    assert speed_warning(tmp_path / "m.onnx", 2.0, 1.0, trt, ["TensorrtExecutionProvider"]) is not None  # on TensorRT itself: a warning


def test_gpu_int8_timed_on_cpu_is_a_note_not_a_warning(digits_build):
    manifest = json.loads((digits_build / "gpu" / "manifest.json").read_text())
    (int8,) = [m for m in manifest["models"] if m["model_file"] == "model.int8.qdq.onnx"]
    assert int8["runtime"]["providers"][0] == "CPUExecutionProvider"  # no TensorRT here
    assert not [w for w in manifest["warnings"] if w.startswith("model.int8.qdq.onnx")]
    assert int8["latency"].get("note") and int8["latency"]["float_p50_ms"] > 0
