"""Budgets met by default: plain int8 first; when it breaks the budget on cpu or mobile, the same step calibrated
again, with percentile ranges (clipping the rare outliers that stretch a MinMax range), then, if that misses too,
with per-tensor error-minimizing ranges (calibration: mse); when those miss too, quantize.auto from the best of them
(quantized nodes go back to float, ranked by sensitivity: on cpu and mobile at most half of them, more is a float
model that is not faster); when that misses too, the float model (cpu, mobile) with the reason; failures that say
what was tried."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import onnx_ir as ir

from edgepipe.core.manifest import Accuracy, Manifest
from edgepipe.passes import PassContext
from edgepipe.recipe import TargetSpec

logger = logging.getLogger(__name__)
RunPasses = Callable[[list[dict[str, Any]], PassContext, ir.Model], tuple[ir.Model, list[dict]]]
FALLBACK_TARGETS = ("cpu", "mobile", "gpu")  # the default int8 chains (gpu: its TensorRT-form int8 model)
FLOAT_TARGETS = ("cpu", "mobile")  # a float model may ship in the int8 model's place (gpu's int8 file must be int8)
FALLBACK = "budget.fallback"  # the pass-log record of a float model shipped because no int8 met the budget
PLAIN = {"quantize.static": "static", "quantize.dynamic": "dynamic", "quantize.tensorrt": "tensorrt"}
# cpu, mobile: a model with more than half its quantized nodes back in float is in effect a float model, not faster
# (speed check, quick zoo: DeepLabV3-MobileNetV3 150 of 176 nodes 1.02x cpu / 1.03x mobile; MnasNet 0.5 mobile 76 of
# 99: 0.97x; MobileNetV2 cpu already slower at 29 of 99): the float model ships instead, with the reason.
# gpu's int8 file must be int8.
MAX_FLOAT = {"cpu": 0.5, "mobile": 0.5, "gpu": 1.0}
# the re-calibrations, in order, until one meets the budget (quantize.static's own options): percentile ranges (ORT's
# default 99.999 written out), then per-tensor MSE ranges (quick zoo, cosine minmax / p99.999 / mse: LR-ASPP 0.9730 /
# 0.9798 / 0.9823, MobileNetV2 0.9715 / 0.9724 / 0.9754, DeepLabV3 0.8930 / 0.9059 / 0.9128; benchmarks/RESULTS.md)
RECALIBRATE = ({"calibration": "percentile", "extra_options": {"CalibPercentile": 99.999}}, {"calibration": "mse"})
ADVICE = ("loosen the budget (accuracy.max_drop / min_value), put {name: smoothquant} before the quantize step in "
          "targets.<target>.passes, or ship fp16 (the gpu target)")


def fallback_step(target: str, spec: TargetSpec, chain: list[dict[str, Any]]) -> tuple[int, dict[str, Any]] | None:
    """(index of the plain int8 step, the quantize.auto step replacing it) for a default int8 chain, else None.

    A chain the recipe writes itself is run as written.
    """
    own = spec.int8_passes if any(step.get("name") == "quantize.tensorrt" for step in chain) else spec.passes
    if target not in FALLBACK_TARGETS or own is not None:
        return None
    for i, step in enumerate(chain):
        if step.get("name") in PLAIN:
            options = {k: v for k, v in step.items() if k != "name"}
            # every quantized node is a candidate (up to MAX_FLOAT of them): the search stops at the fewest that meet the budget
            # cpu, mobile: also the first nodes in graph order, one float region (the faster of the two sets ships)
            return i, {"name": "quantize.auto", "method": PLAIN[step["name"]], "options": options, "candidate_ops": None,
                       "max_float": MAX_FLOAT[target], **({"graph_order": True} if target in FLOAT_TARGETS else {})}
    return None


def recalibrations(target: str, step: dict[str, Any]) -> list[dict[str, Any]]:
    """The plain step calibrated each other way (cpu, mobile: quantize.static with MinMax ranges), else none."""
    if target not in FLOAT_TARGETS or step.get("name") != "quantize.static" or step.get("calibration", "minmax") != "minmax":
        return []
    return [{**step, **again, "extra_options": {**step.get("extra_options", {}), **again.get("extra_options", {})}}
            for again in RECALIBRATE]


def _calibration(step: dict[str, Any]) -> str:
    percentile = step.get("extra_options", {}).get("CalibPercentile")
    return step.get("calibration", "minmax") + (f" {percentile}" if percentile is not None else "")


def run_with_fallback(
    target: str, spec: TargetSpec, chain: list[dict[str, Any]], pctx: PassContext, model: ir.Model, run: RunPasses
) -> tuple[ir.Model, list[dict]]:
    """Run ``chain``; on a default chain whose plain int8 misses the budget, calibrate it again (cpu, mobile), then
    redo that step as quantize.auto.

    When plain int8 meets the budget the pass log (and so the artifact) is exactly the plain chain's.
    """
    found = fallback_step(target, spec, chain)
    if found is None or pctx.evaluate is None or pctx.accept is None:
        return run(chain, pctx, model)
    index, auto = found
    before, before_log = run(chain[:index], pctx, model)
    plain, plain_log = run(chain[index : index + 1], pctx, before)
    score = pctx.evaluate(plain)
    if pctx.accept(score):
        after, after_log = run(chain[index + 1 :], pctx, plain)
        return after, before_log + plain_log + after_log
    origin = {"name": chain[index]["name"], "metric": round(score, 6)}
    best, best_score = chain[index], score
    for again in recalibrations(target, chain[index]):
        logger.info(f"        {chain[index]['name']} misses the budget ({best_score:.4f}): calibrating again ({_calibration(again)})")
        other, other_log = run([again], pctx, before)
        other_score = pctx.evaluate(other)
        origin.setdefault("calibrations", [{"calibration": _calibration(chain[index]), "metric": round(score, 6)}])
        origin["calibrations"].append({"calibration": _calibration(again), "metric": round(other_score, 6)})
        if pctx.accept(other_score):
            other_log[0]["stats"]["fallback_from"] = origin
            after, after_log = run(chain[index + 1 :], pctx, other)
            return after, before_log + other_log + after_log
        if other_score > best_score:
            best, best_score = again, other_score
            auto = {**auto, "options": {k: v for k, v in again.items() if k != "name"}}
        origin["chosen"] = _calibration(best)
    logger.info(f"        {best['name']} misses the budget ({best_score:.4f}): quantize.auto keeps the most sensitive nodes in float")
    fixed, auto_log = run([auto], pctx, before)
    stats = auto_log[0]["stats"]
    stats["fallback_from"] = origin
    if stats.get("passed", True) is False and target in FLOAT_TARGETS:
        tried = _tried(stats)
        why = f"no int8 model met the budget (tried {tried}): shipped float"
        logger.info(f"        {why}")
        auto_counts = {"max_float": auto["max_float"], "kept_float": len(stats.get("kept_float") or []),
                       "nodes": len(stats.get("sensitivity") or []), "metric": stats.get("final_metric")}
        return _ship_float(target, chain, index, why, {"tried": tried, "fallback_from": origin, "quantize.auto": auto_counts},
                           pctx, before, before_log, run)
    after, after_log = run(chain[index + 1 :], pctx, fixed)
    return after, before_log + auto_log + after_log


def float_after_all(target: str, spec: TargetSpec, chain: list[dict[str, Any]], pass_log: list[dict], why: str,
                    pctx: PassContext, model: ir.Model, run: RunPasses) -> tuple[ir.Model, list[dict]] | None:
    """The float model (cpu, mobile) when the int8 model the fallback chose misses the budget as emitted, or None.

    The fallback scores its candidates on the model before emitting (EfficientNet-B0 mobile: 0.9801 there, its
    .ort 0.9797 against a 0.98 budget); a model that met the budget only by the fallback's choice ships float then,
    like one whose fallback found nothing, instead of failing the target.
    """
    found = fallback_step(target, spec, chain)
    chosen = any(p["name"].startswith("quantize") and "fallback_from" in (p.get("stats") or {}) for p in pass_log)
    if found is None or target not in FLOAT_TARGETS or not chosen:
        return None
    index = found[0]
    missed_by = why
    why = f"the int8 model the budget fallback chose missed the budget as emitted ({why}): shipped float"
    logger.info(f"        {why}")
    before, before_log = run(chain[:index], pctx, model)
    return _ship_float(target, chain, index, why, {"tried": why, "as_emitted": missed_by}, pctx, before, before_log, run)


def _ship_float(target: str, chain: list[dict[str, Any]], index: int, why: str, stats: dict[str, Any], pctx: PassContext,
                before: ir.Model, before_log: list[dict], run: RunPasses) -> tuple[ir.Model, list[dict]]:
    """The chain with its quantize step (``chain[index]``) dropped, and a budget.fallback record saying why."""
    record = {"name": FALLBACK, "params": {"dropped": chain[index]}, "modified": True,
              "stats": {"summary": why, "warning": f"{target}: {why}", **stats}}
    after, after_log = run(chain[index + 1 :], pctx, before)
    return after, [*before_log, record, *after_log]


def _tried(stats: dict[str, Any]) -> str:
    """What the fallback tried, from quantize.auto's stats: plain int8's metric (per calibration), then the nodes
    kept float."""
    tried = f"int8 {stats.get('initial_metric', float('nan')):.4f}"
    origin = stats.get("fallback_from")
    if origin:
        runs = origin.get("calibrations") or [{"metric": origin["metric"]}]
        tried = origin["name"] + " " + ", ".join(
            f"{r['metric']:.4f}" + (f" ({r['calibration']})" if "calibration" in r else "") for r in runs)
    kept, ranked = len(stats.get("kept_float") or []), len(stats.get("sensitivity") or [])
    if kept:
        tried += (f", quantize.auto with the {kept} most sensitive of {ranked} nodes in "
                  f"float {stats.get('final_metric', float('nan')):.4f}")
        if kept < ranked:
            tried += " (the most its max_float allows)"
    return tried


def failure_reason(manifest: Manifest) -> str:
    """One line on why a target failed: a check that cannot tell, or the budget with what was tried and what to change."""
    entries = manifest.entries
    for entry in entries:
        acc = entry.accuracy
        if acc.passed:
            continue
        where = f"{entry.model_file}: " if len(entries) > 1 else ""
        if acc.reason:
            return where + acc.reason
        head = (f"accuracy budget exceeded: {acc.get('metric')} {acc.value:.6f} vs reference "
                f"{acc.reference:.6f}, budget {_budget(acc)}")
        passes = entry.passes or []
        auto = next((p for p in passes if p.get("name") == "quantize.auto"), None)
        shipped_float = next((p for p in passes if p.get("name") == FALLBACK), None)
        if shipped_float is not None:
            return f"{where}{head}; tried {shipped_float['stats']['tried']}, then the float model; {ADVICE}"
        if auto is None:
            return where + head
        return f"{where}{head}; tried {_tried(auto.get('stats', {}))}; {ADVICE}"
    return "accuracy budget exceeded"


def missed(manifest: Manifest) -> str:
    """Which emitted models missed their budget, by how much: '<file>: cosine 0.9797, budget min_value 0.98'."""
    return "; ".join(f"{e.model_file}: {e.accuracy.get('metric')} {e.accuracy.value:.4f}, budget {_budget(e.accuracy)}"
                     for e in manifest.entries if not e.accuracy.passed)


def _budget(acc: Accuracy) -> str:
    budget = acc.budget or {}
    return ", ".join(f"{k} {v}" for k, v in budget.items()) or "none"
