"""Error-minimizing activation ranges (the "MSE" calibration of TensorRT / OpenVINO / NNCF, which ORT's quantizer
lacks): per tensor, the [rmin, rmax] whose uint8 quantize-dequantize has the least expected squared error over the
tensor's calibration histogram.

The histograms are ORT's own (its percentile calibrator, asymmetric: signed values, 2048 bins over ±max|x|); the
ranges go back to ``quantize_static`` as a calibration cache (``calibration_cache_path``), so ORT computes scales and
zero points from them exactly as from its own calibrators' ranges (zero stays exactly representable).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np
from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod
from onnxruntime.quantization.calibrate import TensorData, TensorsData, create_calibrator, save_tensors_data

from edgepipe.core.logs import quiet

QMAX = 255  # uint8 activations: q in [0, 255]
STEPS = 128  # candidate range ends per side: max·i/STEPS (i = 1 … STEPS; i = STEPS is MinMax's end)
ROUNDS = 3  # coordinate-descent rounds for signed tensors (rmax given rmin, then rmin given rmax)
BINS = 2048
SEARCH_BINS = 512  # the search's histogram: ORT's 2048 bins merged down to at most this many across the data's span


def _sawtooth(u: np.ndarray, power: float) -> np.ndarray:
    """∫ from -1/2 to u of |t - round(t)|^power dt: the rounding error's integral on a unit grid."""
    v = u + 0.5
    n = np.floor(v)
    y = v - n - 0.5
    half = 0.5 ** (power + 1)
    return (2 * half * n + np.sign(y) * np.abs(y) ** (power + 1) + half) / (power + 1)


def expected_error(counts: np.ndarray, edges: np.ndarray, rmin: np.ndarray, rmax: np.ndarray,
                   power: float = 2.0) -> np.ndarray:
    """Expected squared uint8 quantize-dequantize error, summed over the histogram, for each candidate range.

    ``rmin``/``rmax`` are 1-D arrays of candidates (rmin <= 0 <= rmax). Values are spread evenly inside their bin;
    the grid is the one ORT makes from the range (scale (rmax - rmin)/255, zero point round(-rmin/scale)), so the
    representable range is [-z·s, (255 - z)·s], with values outside it clipped to its ends.
    """
    return _error(counts, edges[:-1], edges[1:], rmin, rmax, power)


def _error(counts: np.ndarray, lo: np.ndarray, hi: np.ndarray, rmin: np.ndarray, rmax: np.ndarray,
           power: float) -> np.ndarray:
    """expected_error over bins [lo[i], hi[i]) holding counts[i] values."""
    lo, hi = np.asarray(lo, np.float64)[None, :], np.asarray(hi, np.float64)[None, :]
    rmin, rmax = np.asarray(rmin, np.float64)[:, None], np.asarray(rmax, np.float64)[:, None]
    s = np.maximum((rmax - rmin) / QMAX, np.finfo(np.float64).tiny)
    z = np.clip(np.round(-rmin / s), 0, QMAX)
    a, b = -z * s, (QMAX - z) * s
    p1 = power + 1
    below = ((a - np.minimum(lo, a)) ** p1 - (a - np.minimum(hi, a)) ** p1) / p1
    above = ((np.maximum(hi, b) - b) ** p1 - (np.maximum(lo, b) - b) ** p1) / p1
    inner_lo, inner_hi = np.clip(lo, a, b), np.clip(hi, a, b)
    inside = s**p1 * (_sawtooth(inner_hi / s, power) - _sawtooth(inner_lo / s, power))
    width = np.maximum(hi - lo, np.finfo(np.float64).tiny)
    return ((below + above + inside) / width * counts[None, :]).sum(axis=1)


def mse_range(counts: np.ndarray, edges: np.ndarray, low: float, high: float, power: float = 2.0) -> tuple[float, float]:
    """The [rmin, rmax] (rmin <= 0 <= rmax, inside [low, high]) with the least expected error over the histogram.

    ``power``: the error's exponent (2: squared, what calibration: mse uses; 3 and 4 clip less and did no better on
    the zoo's CNNs, benchmarks/RESULTS.md).
    """
    counts, edges = _coarsen(np.asarray(counts), np.asarray(edges))
    keep = counts > 0  # empty bins add nothing: dropped
    counts, lo_edges, hi_edges = counts[keep].astype(np.float64), edges[:-1][keep], edges[1:][keep]
    if not counts.size:
        return min(low, 0.0), max(high, 0.0)
    steps = np.arange(1, STEPS + 1) / STEPS
    low, high = min(float(low), 0.0), max(float(high), 0.0)

    def best(rmins: np.ndarray, rmaxs: np.ndarray) -> tuple[float, float]:
        err = _error(counts, lo_edges, hi_edges, rmins, rmaxs, power)
        i = int(np.argmin(err))
        return float(rmins[i]), float(rmaxs[i])

    rmin, rmax = low, high
    for _ in range(ROUNDS if low < 0 < high else 1):
        if high > 0:
            rmin, rmax = best(np.full(STEPS, rmin), high * steps)
        if low < 0:
            rmin, rmax = best(low * steps, np.full(STEPS, rmax))
    return rmin, rmax


def _coarsen(counts: np.ndarray, edges: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Adjacent bins merged so the span holding data has at most SEARCH_BINS bins (a bin stays much narrower than
    a uint8 step unless the range is clipped to a tiny part of it, and the error is integrated inside bins anyway)."""
    full = np.flatnonzero(counts)
    if not full.size:
        return counts, edges
    first, last = full[0], full[-1] + 1
    factor = -(-(last - first) // SEARCH_BINS)
    if factor <= 1:
        return counts, edges
    last = first + -(-(last - first) // factor) * factor
    if last > counts.size:  # pad with empty bins of the same width
        width = edges[1] - edges[0]
        extra = last - counts.size
        counts = np.concatenate([counts, np.zeros(extra, counts.dtype)])
        edges = np.concatenate([edges, edges[-1] + width * np.arange(1, extra + 1)])
    merged = counts[first:last].reshape(-1, factor).sum(axis=1)
    return merged, edges[first:last + 1:factor]


def calibrate(model_path: Path, reader: CalibrationDataReader, op_types: list[str] | None, folder: Path,
              large: bool) -> tuple[Path, int]:
    """Histograms of every tensor ORT would calibrate (its percentile calibrator, unsymmetric), the error-minimizing
    range of each, written as an ORT calibration cache for ``quantize_static``'s Percentile method.

    Returns (cache path, number of tensors).
    """
    with quiet():
        calibrator = create_calibrator(
            model_path, op_types, augmented_model_path=str(folder / "mse_augmented.onnx"),
            calibrate_method=CalibrationMethod.Percentile, use_external_data_format=large,
            extra_options={"symmetric": False, "num_bins": BINS},
        )
        for batch in _one_at_a_time(reader):  # one batch per collect: the intermediate outputs of one batch in memory
            calibrator.collect_data(batch)
    histograms = calibrator.collector.histogram_dict if calibrator.collector else {}
    ranges = {}
    for name, (counts, edges, low, high, *_rest) in histograms.items():
        rmin, rmax = mse_range(np.asarray(counts), np.asarray(edges), float(low), float(high))
        ranges[name] = TensorData(lowest=np.float32(rmin), highest=np.float32(rmax))
    cache = folder / "mse_ranges.json"
    save_tensors_data(TensorsData(CalibrationMethod.Percentile, ranges), cache)
    return cache, len(ranges)


class _Single(CalibrationDataReader):
    def __init__(self, feed: dict) -> None:
        self._feed: dict | None = feed

    def get_next(self) -> dict | None:
        feed, self._feed = self._feed, None
        return feed


def _one_at_a_time(reader: CalibrationDataReader) -> Iterable[CalibrationDataReader]:
    while (feed := reader.get_next()) is not None:
        yield _Single(feed)
