"""quantize.auto: int8 that meets the accuracy budget by keeping the most sensitive nodes in float."""

from __future__ import annotations

import functools
import math
import os
import socket
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any, ClassVar, Literal

import numpy as np
import onnx
import onnx_ir as ir
from pydantic import model_validator

from edgepipe.core.fanout import Mapper, local_map
from edgepipe.passes.base import EdgepipePass, PassConfig, StatsResult, clone
from edgepipe.passes.float_guard import name_nodes
from edgepipe.passes.quant_noise import noise
from edgepipe.passes.quantize import QuantizeDynamic, QuantizeStatic
from edgepipe.passes.tensorrt import QuantizeTensorRt

METHODS = {"dynamic": QuantizeDynamic, "static": QuantizeStatic, "tensorrt": QuantizeTensorRt}
# ops worth keeping in float: the ones with weights and int8 kernels (not Relu/MaxPool/Reshape around them)
CANDIDATES = ["Conv", "ConvTranspose", "Gemm", "MatMul", "Attention", "EmbedLayerNormalization", "Gather", "LSTM", "GRU"]
DEAD = "__edgepipe_quantized"
FLOAT = "__edgepipe_float"
PER_NODE_MAX = 64  # per-node evaluations up to here (MiniLM's recipe: 39 MatMuls); one probe run beyond


class AutoConfig(PassConfig):
    method: Literal["dynamic", "static", "tensorrt"] = "dynamic"
    options: dict[str, Any] = {}  # options of quantize.<method>
    search: Literal["bisect", "stepwise"] = "bisect"  # bisect: 1, 2, 4 ... nodes, then bisection; stepwise: 1, 2, 3 ...
    max_float: int | float = 0.5  # most nodes kept in float: a share of the quantized nodes (a float ≤ 1) or a count (an int)
    analyze: Literal["on_failure", "always"] = "on_failure"  # per-node sensitivity when the budget breaks, or always
    candidate_ops: list[str] | None = CANDIDATES  # None: every node the quantizer changed
    rank: Literal["gain", "gain_per_weight"] = "gain_per_weight"  # order in which nodes go back to float (per_node)
    sensitivity_samples: int | None = 64  # eval samples per sensitivity run (ranking only); None: all
    # per_node: one evaluation per candidate (the metric gained when it alone stays float); probe: one run of the
    # QDQ int8 graph on a few calibration samples, nodes ranked by the quantization noise they read
    # (passes/quant_noise.py); auto: per_node up to PER_NODE_MAX candidates, probe beyond (where it applies)
    ranking: Literal["auto", "per_node", "probe"] = "auto"
    probe_samples: int = 4
    # also search the first nodes in graph order (one float region: no int8 ↔ float crossings inside it); of the two
    # sets that meet the budget, the one that costs less time as the target ships it (PassContext.node_costs, a
    # speed-checked target), else the smaller. The budget fallback's step on cpu and mobile sets it.
    graph_order: bool = False
    QUIET_DEFAULTS: ClassVar[frozenset[str]] = frozenset({"graph_order"})  # added after artifacts were published

    @model_validator(mode="after")
    def _options(self) -> AutoConfig:
        METHODS[self.method].Config(**self.options)  # unknown options fail when the recipe loads
        return self


def quantized_nodes(float_model: onnx.ModelProto, quantized: onnx.ModelProto, ops: list[str] | None = None) -> list[onnx.NodeProto]:
    """Float nodes (of ``ops``) whose output the quantized graph computes differently (another op, other inputs)."""
    producer = {o: n for n in quantized.graph.node for o in n.output}
    changed = []
    for node in float_model.graph.node:
        q = producer.get(node.output[0]) if node.output else None
        if q is not None and (ops is None or node.op_type in ops):
            if q.op_type != node.op_type or list(q.input) != list(node.input):
                changed.append(node)
    return changed


def restore_group(quantized: onnx.ModelProto, float_model: onnx.ModelProto, names: list[str]) -> list[str]:
    """The named nodes plus the float producers of inputs the quantized graph no longer has.

    (QDQ quantization folds a Conv's Relu into the Conv: restoring the Relu needs the float Conv too.)
    """
    defined = _defined(quantized.graph) | {i.name for i in float_model.graph.initializer}
    producer = {o: n for n in float_model.graph.node for o in n.output}
    group, todo = list(dict.fromkeys(names)), list(names)
    made = {o for n in float_model.graph.node if n.name in group for o in n.output}
    by_name = {n.name: n for n in float_model.graph.node}
    while todo:
        for inp in by_name[todo.pop()].input:
            if inp and inp not in defined and inp not in made and inp in producer:
                group.append(producer[inp].name)
                todo.append(producer[inp].name)
                made |= set(producer[inp].output)
    return group


def _defined(graph: onnx.GraphProto) -> set[str]:
    return {i.name for i in graph.initializer} | {i.name for i in graph.input} | {o for n in graph.node for o in n.output}


def keep_float(quantized: onnx.ModelProto, float_model: onnx.ModelProto, names: list[str]) -> onnx.ModelProto:
    """The quantized model with the named nodes (and what they need, see ``restore_group``) back in float.

    The quantized subgraph of each node stops feeding anything (its outputs are renamed) and is pruned;
    shared pieces (a DynamicQuantizeLinear read by Q, K and V) stay while another node still reads them.
    """
    group = restore_group(quantized, float_model, names)
    out = onnx.ModelProto()
    out.CopyFrom(quantized)
    graph = out.graph
    float_inits = {i.name: i for i in float_model.graph.initializer}
    defined = _defined(graph)
    order = {n.name: i for i, n in enumerate(float_model.graph.node)}
    restored = sorted((n for n in float_model.graph.node if n.name in set(group)), key=lambda n: order[n.name])
    wanted = {o for n in restored for o in n.output}
    for q in graph.node:
        hit = [j for j, o in enumerate(q.output) if o in wanted]
        for j in hit:
            q.output[j] = q.output[j] + DEAD
        if hit:
            q.name = q.name + DEAD
    made = {o for n in graph.node for o in n.output}  # a float weight's name may be a DequantizeLinear output here (ORT's biases)
    for node in restored:
        copy = onnx.NodeProto()
        copy.CopyFrom(node)
        for j, inp in enumerate(node.input):
            if not inp or inp not in float_inits:
                continue
            name = inp + FLOAT if inp in made else inp
            copy.input[j] = name
            if name not in defined:
                tensor = onnx.TensorProto()
                tensor.CopyFrom(float_inits[inp])
                tensor.name = name
                graph.initializer.append(tensor)
                defined.add(name)
        graph.node.append(copy)  # a copy of ``copy``: appended once its inputs are final
    _toposort(graph)
    _prune(graph)
    return out


def float_cost(graph: onnx.GraphProto, names: list[str], costs: dict[str, dict[str, float]]) -> float:
    """Estimated ms the int8 model gains with ``names`` in float: each node's float-minus-int8 time, plus a crossing
    (``costs['']['crossing_ms_per_element']`` per element) for each tensor between a float and an int8 node."""
    floats = set(names)
    cross = costs.get("", {}).get("crossing_ms_per_element", 0.0)
    inits = {i.name for i in graph.initializer}
    producer = {o: n for n in graph.node for o in n.output}
    readers: dict[str, list[str]] = {}
    for n in graph.node:
        for i in n.input:
            if i and i not in inits:
                readers.setdefault(i, []).append(n.name)

    def elements(tensor: str, hops: int = 3) -> int:
        p = producer.get(tensor)
        size = costs.get(p.name, {}).get("elements", 0) if p is not None else 0
        if size or p is None or hops == 0 or not p.input:
            return int(size)
        return elements(p.input[0], hops - 1)  # an activation ORT fused into the node before it: that node's size

    own = sum(costs.get(n, {}).get("float_ms", 0.0) - costs.get(n, {}).get("int8_ms", 0.0) for n in floats)
    crossed = sum(elements(t) for t, p in producer.items() if t in readers and any((r in floats) != (p.name in floats) for r in readers[t]))
    return own + cross * crossed


def _weight_elements(model: onnx.ModelProto, node: onnx.NodeProto) -> int:
    """Elements of the constant inputs (weights) of a node: what keeping it in float costs."""
    sizes = {i.name: int(np.prod(i.dims)) for i in model.graph.initializer}
    return sum(sizes.get(i, 0) for i in node.input)


def _toposort(graph: onnx.GraphProto) -> None:
    """Stable topological order (restored nodes were appended at the end)."""
    ready = {i.name for i in graph.initializer} | {i.name for i in graph.input} | {""}
    pending, ordered = list(graph.node), []
    while pending:
        rest = []
        for node in pending:
            if all(i in ready for i in node.input):
                ordered.append(node)
                ready.update(node.output)
            else:
                rest.append(node)
        if len(rest) == len(pending):
            raise ValueError(f"cannot order the graph: node '{rest[0].name}' reads an undefined value")
        pending = rest
    copies = [onnx.NodeProto() for _ in ordered]
    for c, n in zip(copies, ordered, strict=True):
        c.CopyFrom(n)
    del graph.node[:]
    graph.node.extend(copies)


def _prune(graph: onnx.GraphProto) -> None:
    """Drop nodes nothing reads (repeatedly), then unused initializers."""
    outputs = {o.name for o in graph.output}
    while True:
        used = outputs | {i for n in graph.node for i in n.input}
        dead = [i for i, n in enumerate(graph.node) if not any(o in used for o in n.output)]
        if not dead:
            break
        for i in reversed(dead):
            del graph.node[i]
    used = {i for n in graph.node for i in n.input} | outputs
    keep = [init for init in graph.initializer if init.name in used]
    del graph.initializer[:]
    graph.initializer.extend(keep)


def rank(fproto: onnx.ModelProto, nodes: list[onnx.NodeProto], scores: list[float], base: float, how: str) -> list[dict[str, Any]]:
    """Rows (node, op, metric, gain over ``base``, weights) in the order the nodes go back to float."""
    rows = []
    for node, s in zip(nodes, scores, strict=True):
        rows.append({"node": node.name, "op": node.op_type, "metric": round(s, 6), "gain": round(s - base, 6), "weights": _weight_elements(fproto, node)})
    if how == "gain_per_weight":
        # cheapest recovery first: a small table (position embeddings) kept float costs ~nothing in
        # speed or size; a 1536x384 MatMul in float costs both
        rows.sort(key=lambda r: (r["gain"] <= 0, -r["gain"] / max(r["weights"], 1)))
    else:
        rows.sort(key=lambda r: -r["gain"])
    return rows


def sensitivity(qproto: onnx.ModelProto, fproto: onnx.ModelProto, names: list[str], evaluate: Callable[..., float],
                samples: int | None, mapper: Mapper = local_map, run_seconds: float = 0.0) -> tuple[list[float], dict | None]:
    """The metric with each named node alone kept in float (on the first ``samples`` eval samples), in order.

    A loop here, or, when ``mapper`` is wider than 1, the estimated work (``run_seconds`` a run) exceeds
    ``EDGEPIPE_FANOUT_MIN_SECONDS`` and ``evaluate`` can travel (an ``Evaluator``), contiguous chunks of
    names over the map: each task gets both models once and builds its candidates itself (fewer bytes than
    one mixed model per node). The scores equal the loop's bit for bit. Also returns what fanned out, or None.
    """
    width = int(getattr(mapper, "width", 1))
    minimum = float(os.environ.get("EDGEPIPE_FANOUT_MIN_SECONDS", 2.0))
    portable = getattr(evaluate, "portable", None)
    task_eval = portable(samples) if portable is not None and width > 1 and len(names) > 1 and run_seconds * len(names) >= minimum else None
    if task_eval is None:
        return [evaluate(keep_float(qproto, fproto, [name]), samples=samples) for name in names], None
    k = min(width, len(names))
    bounds = [len(names) * i // k for i in range(k + 1)]
    chunks = [names[bounds[i] : bounds[i + 1]] for i in range(k)]
    parts = mapper(functools.partial(_score_chunk, qproto.SerializeToString(), fproto.SerializeToString(), task_eval), chunks)
    scores = [s for part in parts for s in part["scores"]]
    return scores, {"tasks": k, "width": width, "workers": [part["where"] for part in parts]}


def _single_samples(batches: Iterable[dict[str, np.ndarray]]) -> Iterator[dict[str, np.ndarray]]:
    """Each sample of each batch as a batch of one (a probe run exposes every tensor: one sample at a time)."""
    for batch in batches:
        for i in range(len(next(iter(batch.values())))):
            yield {k: v[i : i + 1] for k, v in batch.items()}


def _score_chunk(qbytes: bytes, fbytes: bytes, evaluate: Callable[..., float], names: list[str]) -> dict[str, Any]:
    """A task: the score of each node kept alone in float; ``where`` (host:pid) says which worker ran it."""
    qproto, fproto = onnx.ModelProto.FromString(qbytes), onnx.ModelProto.FromString(fbytes)
    scores = [evaluate(keep_float(qproto, fproto, [name])) for name in names]
    return {"scores": scores, "where": f"{socket.gethostname()}:{os.getpid()}"}


class QuantizeAuto(EdgepipePass):
    """Quantizes, then, if the target's budget breaks, ranks nodes by sensitivity and keeps the fewest in float."""

    name = "quantize.auto"
    Config = AutoConfig

    def call(self, model: ir.Model) -> StatsResult:
        c, ctx = self.config, self.context
        inner_cls = METHODS[c.method]
        if c.method == "static":
            # Keep Relu/Clip as nodes: folded away, their output names would carry pre-activation values and a
            # node restored to float would read the wrong tensor.
            extra = {"QDQKeepRemovableActivations": True, **c.options.get("extra_options", {})}
            c = c.model_copy(update={"options": {**c.options, "extra_options": extra}})
        first = inner_cls(inner_cls.Config(**c.options), ctx)(model)
        if ctx.evaluate is None or ctx.accept is None:
            stats = {**first.stats, "search": "skipped: no evaluation data or budget in this build"}
            return StatsResult(first.model, first.modified, stats)
        start = time.perf_counter()
        evaluate, accept = ctx.evaluate, ctx.accept
        score = evaluate(first.model)
        run_seconds = time.perf_counter() - start
        steps = [{"kept_float": 0, "nodes": [], "metric": round(score, 6), "passed": accept(score)}]
        stats: dict[str, Any] = {**first.stats, "method": c.method, "initial_metric": round(score, 6), "steps": steps}
        if steps[0]["passed"] and c.analyze == "on_failure":
            stats.update(kept_float=[], final_metric=round(score, 6), passed=True, summary=f"int8 meets the budget ({score:.4f}); nothing kept in float")
            return StatsResult(first.model, first.modified, stats)

        named = clone(model)
        name_nodes(named)  # as the quantizer names unnamed nodes: candidates are kept float by name
        fproto, qproto = ir.to_proto(named), ir.to_proto(first.model)
        candidates = quantized_nodes(fproto, qproto, c.candidate_ops)

        def score_with(names: list[str], samples: int | None = None) -> float:
            return evaluate(keep_float(qproto, fproto, names), samples=samples)  # the build's evaluate takes a proto too

        ranking = self._rank(fproto, qproto, candidates, score, score_with, run_seconds)
        stats["sensitivity"] = ranking
        order = [r["node"] for r in ranking]
        if steps[0]["passed"]:
            stats.update(kept_float=[], final_metric=round(score, 6), passed=True, search_seconds=round(time.perf_counter() - start, 2))
            stats["summary"] = f"int8 meets the budget ({score:.4f}); sensitivity of {len(order)} nodes measured"
            return StatsResult(first.model, first.modified, stats)

        share = isinstance(c.max_float, float)
        limit = min(len(order), math.ceil(c.max_float * len(order)) if share else c.max_float)

        def searched(names: list[str], how: str) -> list[str] | None:
            """The fewest of ``names`` (a prefix) whose float form meets the budget, or None within ``limit``."""
            def step(k: int) -> bool:
                s = score_with(names[:k])
                steps.append({"kept_float": k, "nodes": names[:k], "metric": round(s, 6), "passed": accept(s), "order": how})
                return steps[-1]["passed"]

            best = self._search(step, limit, c.search)
            return None if best is None else names[:best]

        kept = searched(order, "sensitivity")
        if c.graph_order:
            kept = self._faster(kept, searched([n.name for n in candidates], "graph"), fproto, named, first.model, stats)
        stats["search_seconds"] = round(time.perf_counter() - start, 2)
        kept = order[:limit] if kept is None else kept
        # ship the model the search scored (re-quantizing with these nodes excluded calibrates the rest afresh:
        # another model, which scored below the search's on EfficientNet-B0)
        final_model = ir.from_proto(keep_float(qproto, fproto, kept))
        final_score = next((s["metric"] for s in steps if s["kept_float"] == len(kept) and s["nodes"] == kept), None)
        if final_score is None:
            final_score = evaluate(final_model)
        passed = accept(final_score)
        stats.update(kept_float=kept, final_metric=round(final_score, 6), passed=passed)
        runs = "1 probe run" if ranking and "noise" in ranking[0] else f"{len(order)} sensitivity runs"
        tried = f"({len(steps) - 1} search steps, {runs})"
        graph_order = next((s.get("order") for s in steps if s["nodes"] == kept), None) == "graph"
        if graph_order:
            stats["float_region"] = "the first nodes in graph order"
        if passed:
            which = "the first " if graph_order else ""
            stats["summary"] = f"int8 {score:.4f} broke the budget; kept {which}{len(kept)} of {len(order)} nodes in float → {final_score:.4f} {tried}"
        else:
            stats["summary"] = (
                f"budget not met: int8 {score:.4f}, and {final_score:.4f} with the {len(kept)} most sensitive of "
                f"{len(order)} nodes in float (max_float {c.max_float}) {tried}"
            )
        return StatsResult(final_model, True, stats)

    def _rank(self, fproto: onnx.ModelProto, qproto: onnx.ModelProto, candidates: list[onnx.NodeProto], score: float,
              score_with: Callable[..., float], run_seconds: float) -> list[dict[str, Any]]:
        """Rows in the order the nodes go back to float: by quantization noise (one probe run) or per-node sensitivity."""
        c, ctx = self.config, self.context
        probe = c.ranking == "probe" or (c.ranking == "auto" and len(candidates) > PER_NODE_MAX)
        if probe and ctx.calibration is not None:
            found = noise(fproto, qproto, candidates, _single_samples(ctx.calibration()), c.probe_samples, ctx.workdir)
            if found is not None:
                rows = [{"node": n.name, "op": n.op_type, "noise": round(e, 8), "weights": _weight_elements(fproto, n)}
                        for n, e in zip(candidates, found, strict=True)]
                return sorted(rows, key=lambda r: -r["noise"])
        n = c.sensitivity_samples
        if n is not None:
            started = time.perf_counter()
            base = score_with([], n)
            run_seconds = time.perf_counter() - started
        else:
            base = score
        # where it ran stays out of the stats: they are part of the manifest's content, equal on every executor
        scores, _ = sensitivity(qproto, fproto, [node.name for node in candidates], ctx.evaluate, n, ctx.map, run_seconds)
        return rank(fproto, candidates, scores, base, c.rank)

    def _faster(self, ranked: list[str] | None, prefix: list[str] | None, fproto: onnx.ModelProto, named: ir.Model,
                quantized: ir.Model, stats: dict[str, Any]) -> list[str] | None:
        """Of the two float sets that meet the budget, the one that costs less time as the target ships it.

        ``ranked``: the most sensitive nodes; ``prefix``: the first nodes in graph order, one float region (no int8
        ↔ float crossings inside it; the error that int8 adds early on also grows less through the network).
        Costed by ``float_cost`` from ``PassContext.node_costs`` (one profiling run of each model); without a
        measurement, the smaller set.
        """
        found = [k for k in (ranked, prefix) if k is not None]
        if len(found) < 2:
            return found[0] if found else None
        if self.context.node_costs is None:
            return min(found, key=len)
        try:
            costs = self.context.node_costs(named, quantized)
        except Exception as exc:  # a best-effort measurement: the smaller set
            stats["node_costs_error"] = str(exc).splitlines()[0][:300]
            return min(found, key=len)
        estimates = [float_cost(fproto.graph, k, costs) for k in found]
        stats["float_cost_ms"] = {"sensitivity": round(estimates[0], 4), "graph": round(estimates[1], 4)}
        return found[int(np.argmin(estimates))]

    @staticmethod
    def _search(step, limit: int, how: str) -> int | None:
        """Fewest nodes (in sensitivity order) that meet the budget, or None within ``limit``."""
        if limit <= 0:
            return None
        if how == "stepwise":
            return next((k for k in range(1, limit + 1) if step(k)), None)
        # galloping: 1, 2, 4 ... nodes (few are usually enough), then bisect between the last miss and the hit
        lo, k = 0, 1
        while not step(min(k, limit)):
            if k >= limit:
                return None
            lo, k = min(k, limit), k * 2
        hi = min(k, limit)
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (lo, mid) if step(mid) else (mid, hi)
        return hi
