"""Speed-aware int8: a cpu/mobile artifact is never slower than the float model it came from.

The chain runs up to its quantize pass (the float model), then the rest; both are emitted the way
the target ships them (model.onnx, or the mobile .ort) and timed side by side on one sample. When
int8 is slower by more than the noise, the nodes whose int8 form costs more than their float form
(one ORT profiling run of each model, targets/nodecost.py; the known-slow patterns, squeeze-excitation,
hard-swish / hard-sigmoid / swish activations, depthwise convolutions, when that measures nothing) stay
float and it is timed again; when that is still slower, the float model ships. Three timings at most (both sets side by side),
and the choice is in the quantize pass's stats. The budget fallback's quantize.auto gets the same
per-node measurement (PassContext.node_costs) to choose the faster of the float sets that meet the budget.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir

from edgepipe.core.bench import resize_batch
from edgepipe.core.runtime import Runner, pad_tokens
from edgepipe.passes import PassContext
from edgepipe.passes.base import clone
from edgepipe.passes.float_guard import name_nodes
from edgepipe.targets.base import Target, TargetContext
from edgepipe.targets.nodecost import node_costs, slower_in_int8

logger = logging.getLogger(__name__)

QUANTIZE = ("quantize.static", "quantize.dynamic", "quantize.auto")  # quantize.auto: the budget fallback's step too
# int8 counts as slower only past both: a relative margin over the timing noise (interleaved medians on a
# shared 2-core machine spread by ~3 %), and an absolute one (a tiny model is dispatch-bound: µs either way).
MARGIN = 0.05
MIN_MS = 0.05
ACTIVATIONS = {"HardSwish", "HardSigmoid", "Sigmoid"}
POOLS = {"GlobalAveragePool", "ReduceMean"}
RunPasses = Callable[[list[dict[str, Any]], PassContext, ir.Model], tuple[ir.Model, list[dict]]]
Timer = Callable[[list[Path], "Target", dict[str, np.ndarray]], list[float]]
Costs = Callable[[Path, Path, onnx.GraphProto, "Target", dict[str, np.ndarray], Path], dict[str, dict[str, float]]]


def slower(int8_ms: float, float_ms: float) -> bool:
    """Is int8 slower than float beyond the noise (relative and absolute margins)?"""
    return int8_ms > float_ms * (1 + MARGIN) and int8_ms - float_ms > MIN_MS


def slow_nodes(model: ir.Model) -> list[str]:
    """Nodes whose int8 form ORT runs slower than float: squeeze-excitation blocks, the activations
    without an int8 kernel (each costs a DequantizeLinear/QuantizeLinear pair), depthwise convolutions.

    Names as quantize.static sees them (it names unnamed nodes the same way).
    """
    named = clone(model)
    name_nodes(named)
    found: list[str] = []
    for node in named.graph:
        if node.op_type in ACTIVATIONS or (node.op_type == "Conv" and _group(node) > 1):
            found.append(node.name)
        elif node.op_type == "Mul" and any(_gate(v) for v in node.inputs):
            found.append(node.name)  # x * sigmoid(...): swish, or the squeeze-excitation scale
        elif node.op_type in POOLS:
            found += [node.name, *_excitation(node)]
    return list(dict.fromkeys(found))


def _group(node: ir.Node) -> int:
    attr = node.attributes.get("group")
    return attr.as_int() if attr is not None else 1


def _gate(value: ir.Value | None) -> bool:
    producer = value.producer() if value is not None else None
    return producer is not None and producer.op_type in ACTIVATIONS


def _excitation(pool: ir.Node) -> list[str]:
    """The 1x1 convs and activations between a global pool and the Mul it scales (squeeze-excitation)."""
    out: list[str] = []
    seen = {id(pool.outputs[0])}
    frontier = [pool.outputs[0]]
    for _ in range(8):  # pool → conv → act (swish: 2 nodes) → conv → gate → Mul: a handful of hops
        nxt = []
        for value in frontier:
            for user, _index in value.uses():
                inner = all(id(v) in seen or v.const_value is not None for v in user.inputs if v is not None)
                if user.op_type == "Mul" and not inner:
                    return out  # the scale: one operand is the block's feature map
                if user.op_type in ("Conv", "Relu", "Clip", "Mul", *ACTIVATIONS):
                    out.append(user.name)
                    seen.update(id(o) for o in user.outputs)
                    nxt.extend(user.outputs)
        frontier = nxt
    return []  # no scaling Mul reached: not an excitation block


def quantize_index(chain: list[dict[str, Any]]) -> int | None:
    """Position of the chain's (single) plain int8 quantize pass, if any."""
    found = [i for i, p in enumerate(chain) if p.get("name") in QUANTIZE]
    return found[0] if len(found) == 1 else None


def _partial(chain: list[dict[str, Any]], q: int, exclude: list[str], pctx: PassContext, float_model: ir.Model,
             run_passes: RunPasses, speed: dict[str, Any]) -> tuple[ir.Model, list[dict]] | None:
    """The chain again with the slow patterns float, or None (and why, in ``speed``) when that fails or, for the
    budget fallback's quantize.auto, misses the budget: the float model is then the answer, not an error."""
    try:
        model, log = run_passes([excluding(chain[q], exclude), *chain[q + 1 :]], pctx, float_model)
    except Exception as exc:  # a best-effort variant: the float model ships with the reason
        speed["partial_error"] = str(exc).splitlines()[0][:300]
        logger.info(f"  speed: int8 with the slow patterns float failed ({speed['partial_error']})")
        return None
    if log[0]["stats"].get("passed") is False:
        speed["partial_error"] = f"misses the budget: {log[0]['stats'].get('summary')}"
        return None
    return model, log


def excluding(entry: dict[str, Any], names: list[str]) -> dict[str, Any]:
    """The quantize step with ``names`` added to its nodes_to_exclude (quantize.auto: its inner pass's options)."""
    entry = dict(entry)
    holder = entry
    if entry.get("name") == "quantize.auto":
        holder = entry["options"] = dict(entry.get("options", {}))
    holder["nodes_to_exclude"] = list(dict.fromkeys([*holder.get("nodes_to_exclude", []), *names]))
    return entry


def time_artifacts(paths: list[Path], target: Target, sample: dict[str, np.ndarray], seconds: float = 2.0, threads: int = 1) -> list[float]:
    """Median ms per call of each model on one sample; calls alternate model by model, so contention on a
    shared machine hits all alike. One thread: a ranking under load, not the device's absolute latency."""
    runners = [Runner(p, providers=list(target.providers), threads=threads) for p in paths]
    feeds = []
    for r in runners:
        feed = resize_batch(sample, r.fixed_batch() or 1)
        feeds.append({k: pad_tokens(v, r.inputs[k].shape) if k in r.inputs else v for k, v in feed.items()})
    start = time.perf_counter()
    for _ in range(3):
        for r, f in zip(runners, feeds, strict=True):
            r.run(f)
    per_round = max((time.perf_counter() - start) / 3, 1e-5)
    times: list[list[float]] = [[] for _ in runners]
    for _ in range(int(np.clip(seconds / per_round, 15, 400))):
        for i, (r, f) in enumerate(zip(runners, feeds, strict=True)):
            t = time.perf_counter()
            r.run(f)
            times[i].append(time.perf_counter() - t)
    return [round(float(np.median(t)) * 1e3, 4) for t in times]


def measure_costs(float_path: Path, int8_path: Path, float_graph: onnx.GraphProto, target: Target,
                  sample: dict[str, np.ndarray], workdir: Path) -> dict[str, dict[str, float]]:
    """Per float node, its int8 and float cost as emitted (one ORT profiling run of each; targets/nodecost.py)."""
    return node_costs(float_path, int8_path, float_graph, sample, workdir, list(target.providers))


def run_chain(
    target: Target, tctx: TargetContext, chain: list[dict[str, Any]], pctx: PassContext, model: ir.Model,
    sample: dict[str, np.ndarray] | None, run_passes: RunPasses, timer: Timer = time_artifacts, costs: Costs = measure_costs,
) -> tuple[ir.Model, list[dict]]:
    """Run ``chain``; on a speed-checked target, ship int8 only where it is not slower than float."""
    q = quantize_index(chain)
    if not target.speed_checked or q is None or sample is None:
        return run_passes(chain, pctx, model)
    if tctx is not None and not tctx.spec.speed_check:  # the recipe turned it off: int8 ships untimed
        out, log = run_passes(chain, pctx, model)
        if log[q]["modified"]:
            log[q]["stats"]["speed"] = {"choice": "int8", "checked": False}
        return out, log
    float_model, head = run_passes(chain[:q], pctx, model)
    work = Path(tempfile.mkdtemp(prefix="speed-", dir=pctx.workdir if pctx.workdir.exists() else None))
    try:
        def emit(m: ir.Model, key: str) -> Path:
            folder = work / key
            folder.mkdir()
            return folder / target.emit(m, folder, tctx).model_file

        def cost_of(f: ir.Model, i: ir.Model) -> dict[str, dict[str, float]]:
            """Each float node's cost in either form, both models emitted as the target ships them (the chain's
            passes after the quantize step run on each); node names as the quantizer names them."""
            named = clone(f)
            name_nodes(named)
            key = f"costs{sum(1 for _ in work.iterdir())}"
            fp = emit(run_passes(chain[q + 1 :], pctx, named)[0], key + "-float")
            ip = emit(run_passes(chain[q + 1 :], pctx, i)[0], key + "-int8")
            return costs(fp, ip, ir.to_proto(named).graph, target, sample, work / (key + "-profile"))

        # the budget fallback's quantize.auto weighs what each node it keeps float costs in speed
        qctx = dataclasses.replace(pctx, node_costs=cost_of) if chain[q].get("name") == "quantize.auto" else pctx
        int8_model, tail = run_passes(chain[q:], qctx, float_model)
        if not tail[0]["modified"]:  # already quantized upstream: nothing to compare
            return int8_model, head + tail
        shipped_float, float_tail = run_passes(chain[q + 1 :], pctx, float_model)
        float_path, int8_path = emit(shipped_float, "float"), emit(int8_model, "int8")
        float_ms, int8_ms = timer([float_path, int8_path], target, sample)
        speed: dict[str, Any] = {"float_ms": float_ms, "int8_ms": int8_ms, "margin": MARGIN}
        if not slower(int8_ms, float_ms):
            tail[0]["stats"]["speed"] = {**speed, "choice": "int8"}
            logger.info(f"  speed int8 {int8_ms:.3f} ms, float {float_ms:.3f} ms: int8 ships")
            return int8_model, head + tail
        partials = []  # (nodes kept float, which, model, pass log): the measured nodes, the known-slow patterns
        for exclude, how in _slow(float_model, int8_model, cost_of, speed):
            got = _partial(chain, q, exclude, qctx, float_model, run_passes, speed)
            if got is not None:
                partials.append((exclude, how, *got))
        if partials:
            float_ms, *times = timer([float_path, *(emit(p[2], f"partial{i}") for i, p in enumerate(partials))], target, sample)
            best = int(np.argmin(times))
            exclude, how, partial, partial_tail = partials[best]
            speed.update(partial_ms=times[best], float_ms_retimed=float_ms, kept_float=len(exclude), slow_nodes=how)
            if len(partials) > 1:
                speed["partials_ms"] = {p[1]: ms for p, ms in zip(partials, times, strict=True)}
            if not slower(times[best], float_ms):
                partial_tail[0]["stats"]["speed"] = {**speed, "choice": f"int8, {how} in float"}
                logger.info(f"  speed int8 {int8_ms:.3f} ms > float {float_ms:.3f} ms: {len(exclude)} {how} kept float → {times[best]:.3f} ms")
                return partial, head + partial_tail
        why = f"int8 slower than float on this machine ({speed.get('partial_ms', int8_ms):.3f} ms vs {float_ms:.3f} ms p50, batch 1): shipped float"
        logger.info(f"  speed {why}")
        # Not a quantize entry: nothing in the shipped model is quantized (golden tolerance, speed warning).
        record = {"name": "speed.check", "params": {"dropped": chain[q]}, "modified": True,
                  "stats": {"summary": why, "warning": f"{target.name}: {why}", "speed": {**speed, "choice": "float"},
                            "int8": tail[0]["stats"].get("summary")}}  # what the dropped step had done (quantize.auto: nodes kept float)
        return shipped_float, [*head, record, *float_tail]
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _slow(float_model: ir.Model, int8_model: ir.Model, cost_of: Callable[[ir.Model, ir.Model], dict],
          speed: dict[str, Any]) -> list[tuple[list[str], str]]:
    """The node sets to try in float when int8 is slower (timed side by side, the faster ships): those whose int8
    form measures slower than their float form, and the known-slow patterns (alone when the measurement maps
    nothing or fails)."""
    try:
        measured = slower_in_int8(cost_of(float_model, int8_model))
    except Exception as exc:  # a best-effort measurement: the pattern list stands in
        speed["cost_error"] = str(exc).splitlines()[0][:300]
        measured = []
    patterns = slow_nodes(float_model)
    sets = [(measured, "nodes measured slower in int8")] if measured else []
    if patterns and set(patterns) != set(measured):
        sets.append((patterns, "slow patterns"))
    return sets
