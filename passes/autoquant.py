"""quantize.auto: int8 that meets the accuracy budget by keeping the most sensitive nodes in float."""

from __future__ import annotations

import math
import time
from typing import Any, Literal

import onnx
import onnx_ir as ir
from edgepipe.passes.base import EdgepipePass, PassConfig, StatsResult
from edgepipe.passes.quantize import QuantizeDynamic, QuantizeStatic
from pydantic import model_validator

METHODS = {"dynamic": QuantizeDynamic, "static": QuantizeStatic}
DEAD = "__edgepipe_quantized"


class AutoConfig(PassConfig):
    method: Literal["dynamic", "static"] = "dynamic"
    options: dict[str, Any] = {}  # options of quantize.<method>
    search: Literal["bisect", "stepwise"] = "bisect"
    max_float: float = 0.5  # most nodes kept in float: a share of the quantized nodes (< 1) or a count
    analyze: Literal["on_failure", "always"] = "on_failure"  # per-node sensitivity when the budget breaks, or always
    sensitivity_samples: int | None = 64  # eval samples per sensitivity run (ranking only); None: all

    @model_validator(mode="after")
    def _options(self) -> AutoConfig:
        METHODS[self.method].Config(**self.options)  # unknown options fail when the recipe loads
        return self


def quantized_nodes(float_model: onnx.ModelProto, quantized: onnx.ModelProto) -> list[onnx.NodeProto]:
    """Float nodes whose output the quantized graph computes differently (by another op or from other inputs)."""
    producer = {o: n for n in quantized.graph.node for o in n.output}
    changed = []
    for node in float_model.graph.node:
        q = producer.get(node.output[0]) if node.output else None
        if q is None or q.op_type != node.op_type or list(q.input) != list(node.input):
            if q is not None and node.op_type not in ("Constant", "Identity"):
                changed.append(node)
    return changed


def keep_float(quantized: onnx.ModelProto, float_model: onnx.ModelProto, names: list[str]) -> onnx.ModelProto:
    """The quantized model with the named nodes restored to their float form.

    The quantized subgraph of each node stops feeding anything (its outputs are renamed) and is pruned;
    shared pieces (a DynamicQuantizeLinear read by Q, K and V) stay while another node still reads them.
    """
    out = onnx.ModelProto()
    out.CopyFrom(quantized)
    graph = out.graph
    float_nodes = {n.name: n for n in float_model.graph.node}
    float_inits = {i.name: i for i in float_model.graph.initializer}
    defined = {i.name for i in graph.initializer} | {i.name for i in graph.input} | {o for n in graph.node for o in n.output}
    for name in names:
        node = float_nodes[name]
        wanted = set(node.output)
        index = None
        for i, q in enumerate(graph.node):
            hit = [j for j, o in enumerate(q.output) if o in wanted]
            for j in hit:
                q.output[j] = q.output[j] + DEAD
            if hit:
                q.name = q.name + DEAD
                index = i if index is None else min(index, i)
        restored = onnx.NodeProto()
        restored.CopyFrom(node)
        graph.node.insert(index if index is not None else len(graph.node), restored)
        for inp in node.input:
            if inp and inp not in defined and inp in float_inits:
                graph.initializer.append(float_inits[inp])
                defined.add(inp)
    _prune(graph)
    return out


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


class QuantizeAuto(EdgepipePass):
    """Quantizes, then, if the target's budget breaks, ranks nodes by sensitivity and keeps the fewest in float."""

    name = "quantize.auto"
    Config = AutoConfig

    def call(self, model: ir.Model) -> StatsResult:
        c, ctx = self.config, self.context
        inner_cls = METHODS[c.method]
        first = inner_cls(inner_cls.Config(**c.options), ctx)(model)
        if ctx.evaluate is None or ctx.accept is None:
            stats = {**first.stats, "search": "skipped: no evaluation data or budget in this build"}
            return StatsResult(first.model, first.modified, stats)
        start = time.perf_counter()
        evaluate, accept = ctx.evaluate, ctx.accept
        score = evaluate(first.model)
        steps = [{"kept_float": 0, "nodes": [], "metric": round(score, 6), "passed": accept(score)}]
        stats: dict[str, Any] = {**first.stats, "method": c.method, "initial_metric": round(score, 6), "steps": steps}
        if steps[0]["passed"] and c.analyze == "on_failure":
            stats.update(kept_float=[], final_metric=round(score, 6), passed=True, summary=f"int8 meets the budget ({score:.4f}); nothing kept in float")
            return StatsResult(first.model, first.modified, stats)

        fproto, qproto = ir.to_proto(model), ir.to_proto(first.model)
        candidates = quantized_nodes(fproto, qproto)

        def score_with(names: list[str], samples: int | None = None) -> float:
            return evaluate(ir.from_proto(keep_float(qproto, fproto, names)), samples=samples)

        ranking = []
        n = c.sensitivity_samples
        base = score_with([], n) if n is not None else score
        for node in candidates:
            s = score_with([node.name], n)
            ranking.append({"node": node.name, "op": node.op_type, "metric": round(s, 6), "gain": round(s - base, 6)})
        ranking.sort(key=lambda r: -r["gain"])
        stats["sensitivity"] = ranking
        order = [r["node"] for r in ranking]
        if steps[0]["passed"]:
            stats.update(kept_float=[], final_metric=round(score, 6), passed=True, search_seconds=round(time.perf_counter() - start, 2))
            stats["summary"] = f"int8 meets the budget ({score:.4f}); sensitivity of {len(order)} nodes measured"
            return StatsResult(first.model, first.modified, stats)

        limit = min(len(order), c.max_float if c.max_float >= 1 else math.ceil(c.max_float * len(order)))
        limit = int(limit)

        def step(k: int) -> bool:
            s = score_with(order[:k])
            steps.append({"kept_float": k, "nodes": order[:k], "metric": round(s, 6), "passed": accept(s)})
            return steps[-1]["passed"]

        best = self._search(step, limit, c.search)
        stats["search_seconds"] = round(time.perf_counter() - start, 2)
        if best is None:
            stats.update(kept_float=order[:limit], passed=False)
            stats["summary"] = (
                f"budget not met: int8 {score:.4f}, and still {steps[-1]['metric']:.4f} with the {limit} most "
                f"sensitive of {len(order)} nodes in float (max_float {c.max_float})"
            )
            kept = order[:limit]
        else:
            kept = order[:best]
        options = {**c.options, "nodes_to_exclude": list(c.options.get("nodes_to_exclude", [])) + kept}
        final = inner_cls(inner_cls.Config(**options), ctx)(model)
        final_score = evaluate(final.model)
        stats.update(kept_float=kept, final_metric=round(final_score, 6), passed=accept(final_score))
        if best is not None:
            stats["summary"] = (
                f"int8 {score:.4f} broke the budget; kept {len(kept)} of {len(order)} quantized nodes in float "
                f"→ {final_score:.4f} ({len(steps) - 1} search steps, {len(order)} sensitivity runs)"
            )
        return StatsResult(final.model, True, stats)

    @staticmethod
    def _search(step, limit: int, how: str) -> int | None:
        """Fewest nodes (in sensitivity order) that meet the budget, or None within ``limit``."""
        if limit <= 0:
            return None
        if how == "stepwise":
            return next((k for k in range(1, limit + 1) if step(k)), None)
        if not step(limit):
            return None
        lo, hi = 0, limit  # lo fails (the plain int8 model), hi passes
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (lo, mid) if step(mid) else (mid, hi)
        return hi
