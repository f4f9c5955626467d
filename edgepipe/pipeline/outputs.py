"""Every graph output checked against the reference: shape, dtype, finiteness and closeness.

The budget's metric reads one output; an artifact whose other outputs are widened, retyped, NaN or
just different must not pass because of it (Optimum's export validation checks names, shapes, then
values for every output; Polygraphy never lets NaN pass).
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import numpy as np

from edgepipe.core.manifest import Manifest
from edgepipe.recipe import AccuracySpec
from edgepipe.sources.accuracy import AccuracyResult, Metric, Outputs, cosine_per_sample, measure, reference_value

logger = logging.getLogger(__name__)


def check_output(name: str, cand: np.ndarray | None, ref: np.ndarray, min_cosine: float) -> dict[str, Any]:
    """One output: shape, dtype, finite where the reference is, and closeness (mean per-sample cosine;
    for integer/bool outputs the share of equal elements) at least ``min_cosine``."""
    if cand is None:
        return {"passed": False, "problem": f"output '{name}' is missing from the artifact"}
    entry: dict[str, Any] = {"shape": list(cand.shape), "dtype": str(cand.dtype)}
    problems = []
    if cand.dtype != ref.dtype:
        problems.append(f"dtype {cand.dtype}, reference {ref.dtype}")
    if cand.shape != ref.shape:
        problems.append(f"shape {list(cand.shape)}, reference {list(ref.shape)}")
        entry["reference_shape"] = list(ref.shape)
    else:
        floating = np.issubdtype(cand.dtype, np.floating) or np.issubdtype(ref.dtype, np.floating)
        if floating:
            bad = ~np.isfinite(cand) & np.isfinite(ref)  # NaN/Inf where the reference is finite
            entry["finite"] = not bool(bad.any())
            if bad.any():
                problems.append(f"{int(bad.sum())} NaN/Inf values where the reference is finite")
            c, r = np.where(np.isfinite(cand), cand, 0).astype(np.float64), np.where(np.isfinite(ref), ref, 0).astype(np.float64)
            entry["cosine"] = round(float(cosine_per_sample(c, r).mean()), 6) if c.size else 1.0
            entry["rel_l2"] = round(float(np.linalg.norm(c - r) / max(np.linalg.norm(r), 1e-12)), 6)
            entry["max_abs"] = float(f"{float(np.abs(c - r).max(initial=0.0)):.6g}")
            close, what = entry["cosine"], "cosine"
        else:
            close = entry["agreement"] = round(float(np.mean(cand == ref)) if cand.size else 1.0, 6)
            what = "share of equal elements"
        if close < min_cosine:
            problems.append(f"{what} {close:.4f} < {min_cosine} (accuracy.outputs_min_cosine)")
    entry["passed"] = not problems
    if problems:
        entry["problem"] = f"output '{name}': " + "; ".join(problems)
    return entry


def check_outputs(candidate: Outputs, reference: Outputs, min_cosine: float) -> dict[str, dict[str, Any]]:
    """``check_output`` for every reference output, plus any output the artifact has that the reference lacks."""
    checks = {name: check_output(name, candidate.get(name), ref, min_cosine) for name, ref in reference.items()}
    for name in candidate:
        if name not in reference:
            checks[name] = {"passed": False, "problem": f"output '{name}' is not an output of the reference model"}
    return checks


def measure_every_output(spec: AccuracySpec, metric: Metric, candidate: Outputs, reference: Outputs, labels: np.ndarray | None) -> AccuracyResult:
    """The budget metric (``measure``) and every output's check; the result passes only when all do."""
    checks = check_outputs(candidate, reference, spec.outputs_min_cosine)
    output = spec.output or next(iter(reference))
    cand = candidate.get(output)
    if output in reference and (cand is None or cand.shape != reference[output].shape):
        # The metric cannot be computed on a wrongly shaped output: a failed result, not bad input.
        ref_value = reference_value(spec, metric, reference, labels)
        worst = -np.inf if metric.higher_is_better else np.inf
        acc = AccuracyResult(metric.name, output, ref_value, float(worst), float("inf"), {}, False, len(reference[output]))
    else:
        acc = measure(spec, metric, candidate, reference, labels)
    return dataclasses.replace(acc, outputs=checks, passed=acc.passed and all(c["passed"] for c in checks.values()))


def problems(acc: AccuracyResult) -> list[str]:
    """One line per output that failed its check."""
    return [c["problem"] for c in (acc.outputs or {}).values() if not c["passed"]]


def failure_reason(manifest: Manifest) -> str:
    """The outputs that failed their checks, for the build summary ('' when only the budget failed)."""
    reasons = []
    entries = manifest.entries
    for entry in entries:
        prefix = f"{entry.model_file}: " if len(entries) > 1 else ""
        failed = [c["problem"] for c in (entry.accuracy.outputs or {}).values() if not c.get("passed")]
        reasons += [prefix + p for p in failed]
    return "; ".join(reasons)
