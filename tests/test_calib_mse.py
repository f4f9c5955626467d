"""calibration: mse (passes/calib_mse.py): per-tensor error-minimizing activation ranges, and the budget fallback's
choice among the re-calibrations."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnxruntime.quantization.calibrate import HistogramCollector
from onnxruntime.quantization.quant_utils import compute_scale_zp
from passes_util import make_model, node, run, tensor

from edgepipe.passes import PassContext
from edgepipe.passes.calib_mse import expected_error, mse_range
from edgepipe.passes.quantize import QuantizeStatic
from edgepipe.pipeline import fallback
from edgepipe.recipe import TargetSpec


def _histogram(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, float, float]:
    """The histogram ORT's own (unsymmetric percentile) collector makes of ``x``, fed in four batches."""
    collector = HistogramCollector("percentile", symmetric=False, num_bins=2048, num_quantized_bins=128,
                                   percentile=99.999, scenario="same")
    for part in np.array_split(x, 4):
        collector.collect({"t": [part]})
    counts, edges, low, high, _ = collector.histogram_dict["t"]
    return counts, edges, float(low), float(high)


def _error(x: np.ndarray, rmin: float, rmax: float) -> float:
    """The real uint8 quantize-dequantize squared error of ``x`` with ORT's scale and zero point for [rmin, rmax]."""
    zero, scale = compute_scale_zp(np.float32(rmin), np.float32(rmax), np.uint8(0), np.uint8(255))
    q = np.clip(np.round(x / scale) + zero, 0, 255)
    return float((((q - zero) * scale - x.astype(np.float64)) ** 2).sum())


def _brute_force(x: np.ndarray, low: float, high: float) -> float:
    """The least real error over a 48 × 48 grid of ranges inside [low, high]."""
    grid = np.linspace(0.02, 1, 48)
    lows = low * grid if low < 0 else [0.0]
    return min(_error(x, a, b) for a in lows for b in high * grid)


def test_expected_error_is_the_real_quantization_error():
    x = np.random.default_rng(0).normal(0.3, 1.0, 100_000).astype(np.float32)
    counts, edges, _, _ = _histogram(x)
    for rmin, rmax in [(-4.0, 4.5), (-1.0, 2.5), (0.0, 3.0), (-2.0, 1.0)]:
        predicted = expected_error(counts, edges, np.array([rmin]), np.array([rmax]))[0]
        assert abs(predicted - _error(x, rmin, rmax)) <= 0.01 * _error(x, rmin, rmax)


def test_outliers_are_clipped_where_the_error_is_least():
    """200 000 ReLU-like values and three outliers (30, 40, 50): MinMax stretches the uint8 steps to 50; the least
    error (rounding of them all against clipping of the few) is near 40. The MSE range clips there, and its real
    error is the brute-force minimum's (within 2 %), well under MinMax's."""
    rng = np.random.default_rng(1)
    x = np.abs(rng.normal(size=200_000))
    x[:3] = [30.0, 40.0, 50.0]
    x = x.astype(np.float32)
    counts, edges, low, high = _histogram(x)
    rmin, rmax = mse_range(counts, edges, low, high)
    assert rmin == 0.0 and 30 < rmax < 45  # clipped
    best = _brute_force(x, low, high)
    assert _error(x, rmin, rmax) <= 1.02 * best
    assert _error(x, rmin, rmax) < 0.85 * _error(x, 0.0, float(x.max()))


def test_uniform_values_keep_their_full_range():
    """Nothing to clip: every value is as likely as the extremes, so the range is MinMax's."""
    x = np.random.default_rng(2).uniform(-1.0, 3.0, 200_000).astype(np.float32)
    counts, edges, low, high = _histogram(x)
    rmin, rmax = mse_range(counts, edges, low, high)
    assert rmin <= 0.99 * low and rmax >= 0.99 * high
    assert _error(x, rmin, rmax) <= 1.02 * _brute_force(x, low, high)


def _tiny_model(hidden: int = 256) -> ir.Model:
    """x → MatMul → Relu → MatMul → y."""
    rng = np.random.default_rng(3)
    w1 = rng.normal(0, 0.3, (16, hidden)).astype(np.float32)
    w2 = rng.normal(0, 0.3 * np.sqrt(16 / hidden), (hidden, 8)).astype(np.float32)
    return make_model([node("MatMul", ["x", "w1"], ["h"]), node("Relu", ["h"], ["r"]), node("MatMul", ["r", "w2"], ["y"])],
                      {"w1": w1, "w2": w2}, [tensor("x", ["n", 16])], [tensor("y", ["n", 8])])


def test_mse_calibration_beats_minmax_on_a_tiny_model(tmp_path):
    """Heavy-tailed inputs (Student t, 4 degrees of freedom): MinMax ranges reach the rarest values, the MSE ranges
    stop where the error is least; on the calibration data (what both ranges are chosen on) the int8 outputs are
    closer to float's (measured 0.0022 against 0.0025 mean squared error)."""
    model = _tiny_model()
    cal = np.random.default_rng(4).standard_t(4.0, (2048, 16)).astype(np.float32)
    context = PassContext(workdir=tmp_path, calibration=lambda: iter([{"x": cal[:1024]}, {"x": cal[1024:]}]))
    (want,) = run(model, {"x": cal})
    errors = {}
    for calibration in ("minmax", "mse"):
        result = QuantizeStatic(QuantizeStatic.Config(calibration=calibration, max_samples=2048), context)(model)
        (got,) = run(result.model, {"x": cal})
        errors[calibration] = float(((got - want) ** 2).mean())
    assert result.stats["mse_ranges"] >= 3 and result.stats["calibration_samples"] == 2048
    assert errors["mse"] < 0.95 * errors["minmax"]


def _fake_build(scores: dict[str, float], budget: float):
    """A fallback run where a quantize step's score depends only on its calibration (models are step lists)."""
    def run(chain, pctx, model):
        model = [*model, *chain]
        return model, [{"name": step["name"], "params": step, "stats": {}} for step in chain]

    def evaluate(model):
        step = model[-1]
        if step["name"] == "quantize.auto":
            return scores["auto"]
        return scores[step.get("calibration", "minmax")]

    return run, PassContext(workdir=None, evaluate=evaluate, accept=lambda s: s >= budget)


def test_the_fallback_takes_mse_ranges_when_percentile_misses():
    chain = [{"name": "cleanup"}, {"name": "quantize.static"}]
    run, pctx = _fake_build({"minmax": 0.973, "percentile": 0.9798, "mse": 0.9823, "auto": 0.99}, 0.98)
    model, log = fallback.run_with_fallback("cpu", TargetSpec(), chain, pctx, [], run)
    assert model[-1] == {"name": "quantize.static", "calibration": "mse", "extra_options": {}}
    tried = log[-1]["stats"]["fallback_from"]["calibrations"]
    assert [t["calibration"] for t in tried] == ["minmax", "percentile 99.999", "mse"]


def test_the_fallback_stops_at_percentile_when_it_meets_the_budget():
    chain = [{"name": "cleanup"}, {"name": "quantize.static"}]
    run, pctx = _fake_build({"minmax": 0.973, "percentile": 0.9835, "mse": 0.999, "auto": 0.99}, 0.98)
    model, log = fallback.run_with_fallback("cpu", TargetSpec(), chain, pctx, [], run)
    assert model[-1]["calibration"] == "percentile" and not any(s.get("calibration") == "mse" for s in model)


def test_quantize_auto_starts_from_the_best_calibration():
    chain = [{"name": "cleanup"}, {"name": "quantize.static"}]
    for best, scores in (("mse", {"percentile": 0.95, "mse": 0.96}), ("percentile", {"percentile": 0.96, "mse": 0.95})):
        run, pctx = _fake_build({"minmax": 0.94, **scores, "auto": 0.99}, 0.98)
        model, log = fallback.run_with_fallback("cpu", TargetSpec(), chain, pctx, [], run)
        auto = model[-1]
        assert auto["name"] == "quantize.auto" and auto["options"]["calibration"] == best
        assert log[-1]["stats"]["fallback_from"]["chosen"].startswith(best)
