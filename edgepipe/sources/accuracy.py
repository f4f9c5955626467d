"""Accuracy of an artifact against the reference: metrics, comparison and budgets."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

import numpy as np

from edgepipe.core.errors import BadInput
from edgepipe.core.loader import load_callable
from edgepipe.recipe import AccuracySpec

Outputs = dict[str, np.ndarray]


@dataclasses.dataclass(frozen=True)
class Metric:
    """A metric over a whole eval set; ``higher_is_better`` decides what a drop is."""

    name: str
    fn: Callable[[np.ndarray, np.ndarray, np.ndarray | None], float]  # (candidate, reference, labels)
    higher_is_better: bool = True


def _top1(cand: np.ndarray, ref: np.ndarray, labels: np.ndarray | None) -> float:
    target = labels if labels is not None else ref.reshape(len(ref), -1).argmax(1)
    return float(np.mean(cand.reshape(len(cand), -1).argmax(1) == target))


def _rows(a: np.ndarray) -> np.ndarray:
    return a.reshape(len(a), -1).astype(np.float64) if a.ndim else a.reshape(1, 1).astype(np.float64)


def cosine_per_sample(cand: np.ndarray, ref: np.ndarray) -> np.ndarray:
    """Cosine of each sample's values (the one cosine of the accuracy metric and the every-output check), in [-1, 1].

    A candidate row with NaN/Inf scores -1 (never passes); two all-zero rows agree (1.0); one all-zero row
    against a non-zero one does not (0.0).
    """
    c, r = _rows(cand), _rows(ref)
    finite = np.isfinite(c).all(1)
    c = np.where(finite[:, None], c, 0.0)
    nc, nr = np.linalg.norm(c, axis=1), np.linalg.norm(r, axis=1)
    cos = np.where(nc * nr > 0, (c * r).sum(1) / np.maximum(nc * nr, 1e-300), 0.0)
    cos = np.where((nc == 0) & (nr == 0), 1.0, np.clip(cos, -1.0, 1.0))
    return np.where(finite & np.isfinite(cos), cos, -1.0)


def _cosine(cand: np.ndarray, ref: np.ndarray, labels: np.ndarray | None) -> float:
    return float(cosine_per_sample(cand, ref).mean())


def _rel_l2(cand: np.ndarray, ref: np.ndarray, labels: np.ndarray | None) -> float:
    c, r = _rows(cand), _rows(ref)
    err = np.linalg.norm(c - r, axis=1) / np.maximum(np.linalg.norm(r, axis=1), 1e-12)
    return float(np.nan_to_num(err, nan=np.inf).mean())


def _max_abs(cand: np.ndarray, ref: np.ndarray, labels: np.ndarray | None) -> float:
    return float(np.nan_to_num(np.abs(cand.astype(np.float64) - ref), nan=np.inf).max())


def _cosine_min(cand: np.ndarray, ref: np.ndarray, labels: np.ndarray | None) -> float:
    return float(cosine_per_sample(cand, ref).min())


def _top5(cand: np.ndarray, ref: np.ndarray, labels: np.ndarray | None) -> float:
    """With labels: the label is in the candidate's top 5; without: the reference's top-1 is."""
    target = labels if labels is not None else _rows(ref).argmax(1)
    top = np.argsort(-_rows(cand), axis=1)[:, :5]
    return float(np.mean([t in row for t, row in zip(target, top, strict=True)]))


def neighbours(emb: np.ndarray, k: int) -> np.ndarray:
    """Indices of each row's k nearest rows by cosine (itself excluded)."""
    e = _rows(emb)
    e = e / np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-12)
    sim = e @ e.T
    np.fill_diagonal(sim, -np.inf)
    return np.argsort(-sim, axis=1)[:, :k]


def _knn10(cand: np.ndarray, ref: np.ndarray, labels: np.ndarray | None) -> float:
    """Embeddings: mean share of each sample's 10 nearest neighbours (within the eval set) both agree on."""
    if not np.all(np.isfinite(cand)):
        return 0.0
    k = min(10, len(ref) - 1)
    if k < 1:
        return 1.0
    a, b = neighbours(cand, k), neighbours(ref, k)
    return float(np.mean([len(set(x) & set(y)) / k for x, y in zip(a, b, strict=True)]))


BUILTIN = {
    "top1": Metric("top1", _top1),
    "top5": Metric("top5", _top5),
    "cosine": Metric("cosine", _cosine),
    "cosine_min": Metric("cosine_min", _cosine_min),
    "knn10": Metric("knn10", _knn10),
    "rel_l2": Metric("rel_l2", _rel_l2, higher_is_better=False),
    "max_abs": Metric("max_abs", _max_abs, higher_is_better=False),
}


def resolve_metric(name: str, base: Path) -> Metric:
    if name in BUILTIN:
        return BUILTIN[name]
    fn = load_callable(name, base)
    return Metric(name, lambda c, r, y: float(fn(c, r, y)))


@dataclasses.dataclass
class AccuracyResult:
    metric: str
    output: str
    reference: float
    value: float
    drop: float
    budget: dict[str, float]
    passed: bool
    samples: int
    outputs: dict[str, dict] | None = None  # every output's shape/dtype/finite/closeness check (edgepipe.pipeline.outputs)
    reason: str | None = None  # why a check failed that the budget alone would pass (a constant output)

    def as_dict(self) -> dict:
        return {k: (round(v, 6) if isinstance(v, float) else v) for k, v in dataclasses.asdict(self).items() if v is not None}


def measure(
    spec: AccuracySpec,
    metric: Metric,
    candidate: Outputs,
    reference: Outputs,
    labels: np.ndarray | None,
) -> AccuracyResult:
    """The metric for the reference and the candidate, the drop, and the budget verdict."""
    output = spec.output or next(iter(reference))
    if output not in candidate or output not in reference:
        raise BadInput(f"accuracy.output '{output}' is not a model output; outputs: {sorted(reference)}")
    cand, ref = candidate[output], reference[output]
    if cand.shape != ref.shape:
        raise BadInput(f"output '{output}': artifact shape {cand.shape} differs from reference {ref.shape}")
    ref_value = metric.fn(ref, ref, labels)
    value = metric.fn(cand, ref, labels)
    if not np.all(np.isfinite(cand)):
        value = -np.inf if metric.higher_is_better else np.inf  # NaN/Inf never passes
    drop = (ref_value - value) if metric.higher_is_better else (value - ref_value)
    budget, passed = _budget(spec, metric, ref_value, value, drop)
    reason = degenerate(output, cand, ref)
    return AccuracyResult(metric.name, output, ref_value, float(value), float(drop), budget, passed and reason is None, len(ref), reason=reason)


def constant_across_samples(arr: np.ndarray) -> bool:
    """Every sample's output is the same (to 1e-6 of the output's scale): it says nothing about the input."""
    rows = _rows(arr)
    if len(rows) < 2 or not np.all(np.isfinite(rows)):
        return False
    spread = float((rows.max(0) - rows.min(0)).max(initial=0.0))
    return spread <= 1e-6 * float(np.abs(rows).max(initial=0.0))


def degenerate(output: str, cand: np.ndarray, ref: np.ndarray) -> str | None:
    """Why the comparison cannot be trusted, or None: a metric that can't tell a broken artifact is no pass."""
    n = len(ref)
    if constant_across_samples(ref):
        return (f"the reference output '{output}' is the same for all {n} eval samples, so the metric cannot tell a good "
                "artifact from a broken one; check the model's weights (a zero-initialised or untrained last layer?) and "
                "that the eval samples differ")
    if constant_across_samples(cand):
        return (f"the artifact's output '{output}' is the same for all {n} eval samples while the reference's varies: "
                "the artifact ignores its input")
    return None


def reference_value(spec: AccuracySpec, metric: Metric, reference: Outputs, labels: np.ndarray | None) -> float:
    """The metric of the reference itself (1.0 for cosine; with labels, the reference's task score)."""
    ref = reference[spec.output or next(iter(reference))]
    return metric.fn(ref, ref, labels)


def budget_met(spec: AccuracySpec, metric: Metric, ref: float, value: float) -> bool:
    """Does ``value`` meet the budget, given the reference's own ``ref``?"""
    drop = (ref - value) if metric.higher_is_better else (value - ref)
    return _budget(spec, metric, ref, value, drop)[1]


def _budget(spec: AccuracySpec, metric: Metric, ref: float, value: float, drop: float) -> tuple[dict, bool]:
    budget: dict[str, float] = {}
    passed = bool(np.isfinite(value))
    if spec.max_drop is not None:
        budget["max_drop"] = spec.max_drop
        passed &= drop <= spec.max_drop + 1e-12
    if spec.percent_max_drop is not None:
        budget["percent_max_drop"] = spec.percent_max_drop
        passed &= drop <= abs(ref) * spec.percent_max_drop / 100 + 1e-12
    if spec.min_value is not None:
        if not metric.higher_is_better:
            raise BadInput(f"accuracy.min_value does not apply to {metric.name} (lower is better); use max_drop")
        budget["min_value"] = spec.min_value
        passed &= value >= spec.min_value
    return budget, bool(passed)


STATS = ("elementwise", "max", "mean", "median", "quantile")


def compare(cand: np.ndarray, ref: np.ndarray, atol: float, rtol: float, stat: str = "elementwise", quantile: float = 0.99) -> dict[str, float | bool]:
    """Polygraphy-style: an element fails only when it breaks both atol and rtol; NaN never passes.

    ``stat`` picks the error statistic checked against the tolerances: every element (``elementwise``),
    or the max / mean / median / ``quantile`` of the absolute and relative errors.
    """
    if stat not in STATS:
        raise BadInput(f"unknown error statistic '{stat}'; use one of {', '.join(STATS)}")
    c, r = cand.astype(np.float64), ref.astype(np.float64)
    if c.shape != r.shape:
        return {"passed": False, "max_abs": float("inf"), "max_rel": float("inf"), "shape_mismatch": True}
    diff = np.nan_to_num(np.abs(c - r), nan=np.inf)
    diff = np.where(np.isfinite(c) | ~np.isfinite(r), diff, np.inf)  # NaN/Inf where the reference is finite
    rel = diff / np.maximum(np.abs(r), 1e-12)
    if stat == "elementwise":
        passed = not bool(((diff > atol) & (rel > rtol)).any())
    else:
        reduce = {"max": np.max, "mean": np.mean, "median": np.median, "quantile": lambda a: np.quantile(a, quantile)}[stat]
        passed = bool(not (reduce(diff) > atol and reduce(rel) > rtol)) if diff.size else True
    return {
        "passed": passed,
        "max_abs": float(diff.max(initial=0.0)),
        "max_rel": float(rel.max(initial=0.0)),
    }


def compare_outputs(
    cand: Outputs, ref: Outputs, default: tuple[float, float], per_output: dict[str, tuple[float, float]] | None = None, stat: str = "elementwise"
) -> dict[str, dict[str, float | bool]]:
    """``compare`` on every output, with (atol, rtol) per output name overriding the default."""
    per_output = per_output or {}
    unknown = set(per_output) - set(ref)
    if unknown:
        raise BadInput(f"tolerances name outputs {sorted(unknown)} the model does not have; outputs: {sorted(ref)}")
    return {name: compare(cand[name], ref[name], *per_output.get(name, default), stat=stat) for name in ref}
