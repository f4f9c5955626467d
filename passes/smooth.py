"""smoothquant: move activation outliers into the next MatMul's weights (SmoothQuant).

Folded where it costs nothing (a ``Mul`` by a scalar constant takes the per-channel ``1/s``); with
``insert: true`` every other MatMul input with outlier channels gets one ``Mul`` by ``1/s`` in front of the
MatMuls that read it (BERT's post-LayerNorm Q/K/V and FFN-in inputs, which also feed the residual).
With ``split``, an input made by a MatMul through elementwise ops only (an FFN's GELU output) has its
outlier channels split into copies instead (OCS), which leaves the weights' range as it was.
"""

from __future__ import annotations

import contextlib
import io
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir
from onnx import helper, numpy_helper
from pydantic import Field

from edgepipe.core.runtime import exposed
from edgepipe.passes.base import EdgepipePass, PassConfig, StatsResult

UNARY = {"Erf", "Relu", "Tanh", "Sigmoid", "Gelu", "Neg", "Abs", "Identity"}  # one input, channel j → channel j
BINARY = {"Add", "Sub", "Mul", "Div"}


class SmoothConfig(PassConfig):
    alpha: float = 0.7  # share of the outlier moved into the weights (SmoothQuant: 0.5; 0.7 measured best on MiniLM)
    max_samples: int = 64
    min_ratio: float = 2.0  # smooth only inputs whose largest channel is this many times the median
    # Also smooth inputs that cannot be folded, with one Mul (shared by every MatMul reading the input).
    # GELU's tail then gets a Mul too instead of a folded constant: ORT fuses GELU only with its scalar 0.5.
    insert: bool = False
    # Outlier channel splitting (OCS, Zhao et al. 2019) where an input is made by a MatMul through channelwise
    # ops only (an FFN's GELU output): a channel whose max is over `split` x the 99th-percentile channel max is
    # copied c times, each copy carrying 1/c (one more column in the first weight, one more row in the next),
    # instead of scaling weight rows up. 0 turns it off.
    split: float = Field(0.0, ge=0.0)
    max_copies: int = Field(16, ge=2)


def _is_gelu_tail(mul: onnx.NodeProto, k: int, producer: dict[str, onnx.NodeProto]) -> bool:
    """Is ``mul`` the ``* 0.5`` that ends an Erf GELU (ORT fuses the pattern only with that scalar)?"""
    frontier, seen = [mul.input[1 - k]], 0
    while frontier and seen < 4:
        node = producer.get(frontier.pop())
        if node is None:
            continue
        if node.op_type == "Erf":
            return True
        frontier += list(node.input)
        seen += 1
    return False


def _sites(model: onnx.ModelProto, insert: bool) -> list[dict[str, Any]]:
    """One site per activation read by MatMuls with a constant 2-D weight: fold into a scalar ``Mul`` when
    that Mul feeds only them (and is not GELU's tail while ``insert`` is on), else insert a Mul if allowed."""
    graph = model.graph
    consts = {i.name: i for i in graph.initializer}
    producer = {o: n for n in graph.node for o in n.output}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for n in graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        w = consts.get(node.input[1]) if node.op_type == "MatMul" and len(node.input) == 2 else None
        if w is not None and len(w.dims) == 2 and node.input[0] not in consts:
            readers.setdefault(node.input[0], []).append(node)
    found = []
    for act, matmuls in readers.items():
        site: dict[str, Any] = {"act": act, "matmuls": matmuls}
        mul = producer.get(act)
        k = None
        if mul is not None and mul.op_type == "Mul" and len(consumers[act]) == len(matmuls):
            k = next((j for j in (1, 0) if mul.input[j] in consts and numpy_helper.to_array(consts[mul.input[j]]).size == 1), None)
        if k is not None and not (insert and _is_gelu_tail(mul, k, producer)):
            found.append({**site, "mode": "fold", "mul": mul, "k": k, "const": mul.input[k]})
        elif insert:
            found.append({**site, "mode": "insert"})
    return found


def channel_max(model: onnx.ModelProto, names: list[str], batches) -> dict[str, np.ndarray]:
    """max |x| per last-axis channel of the named tensors over calibration batches."""
    peak: dict[str, np.ndarray] = {}
    for _, values in exposed(model, names, batches):
        for name, v in values.items():
            m = np.abs(v.reshape(-1, v.shape[-1])).max(0)
            peak[name] = np.maximum(peak.get(name, m), m)
    return peak


class SmoothQuant(EdgepipePass):
    """Divides outlier activation channels by s and multiplies the weight rows by s (exact in float)."""

    name = "smoothquant"
    Config = SmoothConfig

    def call(self, model: ir.Model) -> StatsResult:
        c = self.config
        self.require_calibration()
        proto = ir.to_proto(model)
        sites = _sites(proto, c.insert)
        if not sites:
            return StatsResult(ir.from_proto(proto), modified=False, stats={"smoothed": 0, "summary": "no MatMul input to smooth"})
        batches, n = [], 0
        for batch in self.context.calibration():
            batches.append(batch)
            n += len(next(iter(batch.values())))
            if n >= c.max_samples:
                break
        with contextlib.redirect_stdout(io.StringIO()):
            peaks = channel_max(proto, [s["act"] for s in sites], batches)
        inits = {i.name: i for i in proto.graph.initializer}
        smoothed, ratios, inserted, split = [], [], 0, {}
        for site in sites:
            act = peaks[site["act"]]
            weights = [numpy_helper.to_array(inits[m.input[1]]) for m in site["matmuls"]]
            ratio = float(act.max() / max(np.median(act), 1e-12))
            if ratio < c.min_ratio or any(w.shape[0] != act.shape[0] for w in weights):
                continue
            source = _channel_source(proto, site, len(act)) if c.split else None
            extra = _split_channels(proto, site, source, act, c.split, c.max_copies) if source else 0
            if extra:  # split instead of smoothed (nothing over the limit: smoothed as usual)
                split[site["matmuls"][0].name] = extra
            else:
                w_max = np.max([np.abs(w).max(1) for w in weights], axis=0)  # Q, K and V share one scale
                s = np.power(np.maximum(act, 1e-5), c.alpha) / np.power(np.maximum(w_max, 1e-5), 1 - c.alpha)
                s = np.clip(s, 1e-2, 1e2).astype(np.float32)
                for matmul, w in zip(site["matmuls"], weights, strict=True):
                    _set_weight(proto, inits, matmul, (w * s[:, None]).astype(np.float32), site["matmuls"])
                if site["mode"] == "fold":
                    scalar = numpy_helper.to_array(inits[site["const"]]).reshape(())
                    name = site["mul"].name + "_smoothquant_scale"  # its own constant: the scalar may be shared
                    proto.graph.initializer.append(numpy_helper.from_array((scalar / s).astype(np.float32), name))
                    site["mul"].input[site["k"]] = name
                else:
                    _insert_mul(proto, site, (1.0 / s).astype(np.float32))
            inserted += site["mode"] == "insert"
            smoothed += [m.name for m in site["matmuls"]]
            ratios.append(round(ratio, 1))
        stats = {"smoothed": len(smoothed), "nodes": smoothed, "inserted": inserted, "outlier_ratio": ratios, "alpha": c.alpha, "samples": n}
        if split:
            stats["split_channels"] = split
        stats["summary"] = (
            f"smoothed {len(smoothed)} MatMuls ({inserted} Mul inserted; max/median channel ratio "
            f"{min(ratios, default=0)}–{max(ratios, default=0)})"
            + (f"; {sum(split.values())} outlier channels split before {len(split)} of them" if split else "")
        )
        return StatsResult(ir.from_proto(proto), modified=bool(smoothed), stats=stats)


def _set_weight(proto: onnx.ModelProto, inits: dict[str, onnx.TensorProto], matmul: onnx.NodeProto,
                value: np.ndarray, site: list[onnx.NodeProto]) -> None:
    """Give ``matmul`` the scaled weight: in place when only this site's MatMuls read it, else as its own copy."""
    name = matmul.input[1]
    ours = {id(m) for m in site}
    shared = any(name in n.input and id(n) not in ours for n in proto.graph.node) or name in {o.name for o in proto.graph.output}
    if not shared:
        inits[name].CopyFrom(numpy_helper.from_array(value, name))
        return
    copy = f"{name}/smoothquant/{matmul.name or len(proto.graph.initializer)}"
    proto.graph.initializer.append(numpy_helper.from_array(value, copy))
    inits[copy] = proto.graph.initializer[-1]
    matmul.input[1] = copy


def _insert_mul(proto: onnx.ModelProto, site: dict[str, Any], inverse: np.ndarray) -> None:
    """``act * (1/s)`` placed before the first MatMul that reads it; only those MatMuls read the result."""
    act, first = site["act"], site["matmuls"][0]
    stem = first.name or act
    scale, out = f"{stem}/smoothquant/inv_scale", f"{stem}/smoothquant/output"
    proto.graph.initializer.append(numpy_helper.from_array(inverse, scale))
    produced = {m.output[0] for m in site["matmuls"]}
    for matmul in site["matmuls"]:
        matmul.input[0] = out
    index = min(i for i, n in enumerate(proto.graph.node) if n.output and n.output[0] in produced)
    proto.graph.node.insert(index, helper.make_node("Mul", [act, scale], [out], name=f"{stem}/smoothquant/Mul"))


def _channel_source(proto: onnx.ModelProto, site: dict[str, Any], channels: int) -> dict[str, Any] | None:
    """The MatMul (constant weight) whose output channels reach ``site["act"]`` through channelwise ops only.

    Every op between them must be elementwise with constants that are scalars or one value per channel,
    and every value between them must be read only inside that subgraph (so copies change nothing else).
    """
    graph = proto.graph
    consts = {i.name: i for i in graph.initializer}
    producer = {o: n for n in graph.node for o in n.output}
    readers: dict[str, list[str]] = {}
    for n in graph.node:
        for i in n.input:
            readers.setdefault(i, []).append(n.output[0])
    graph_outputs = {o.name for o in graph.output}
    inner, vectors, source = [], [], None
    stack, seen = [site["act"]], set()
    while stack:
        name = stack.pop()
        if name in seen:
            continue
        seen.add(name)
        node = producer.get(name)
        if node is None or name in graph_outputs:
            return None
        w = consts.get(node.input[1]) if node.op_type == "MatMul" and len(node.input) == 2 else None
        if w is not None:
            if len(w.dims) != 2 or w.dims[1] != channels or (source is not None and source.output[0] != node.output[0]):
                return None
            source = node
            continue
        if node.op_type not in UNARY | BINARY or len(node.output) != 1:
            return None
        inner.append(node)
        for i in node.input[: 1 if node.op_type in UNARY else 2]:
            if i in consts:
                size = int(np.prod(consts[i].dims)) if consts[i].dims else 1
                if size == channels and consts[i].dims[-1] == channels:
                    vectors.append((node.output[0], i))
                elif size != 1:
                    return None
            else:
                stack.append(i)
    if source is None:
        return None
    inside = {n.output[0] for n in inner} | {source.output[0]}
    for value in inside - {site["act"]}:
        if any(r not in inside for r in readers.get(value, [])):
            return None
    # The activation itself is widened: only the MatMuls that take the extra rows may read it.
    if any(r not in {m.output[0] for m in site["matmuls"]} for r in readers.get(site["act"], [])):
        return None
    return {"source": source, "inner": [n.output[0] for n in inner], "vectors": vectors}


def _split_channels(proto: onnx.ModelProto, site: dict[str, Any], source: dict[str, Any], peak: np.ndarray,
                    split: float, max_copies: int) -> int:
    """Copy each outlier channel c times (1/c each) from the source MatMul's columns to the readers' rows."""
    graph = proto.graph
    consts = {i.name: i for i in graph.initializer}
    limit = split * float(np.percentile(peak, 99))
    copies = np.clip(np.ceil(peak / max(limit, 1e-12)), 1, max_copies).astype(int)
    idx = np.repeat(np.arange(len(peak)), copies - 1)
    if idx.size == 0:
        return 0
    scale = (1.0 / copies).astype(np.float32)
    scale = np.concatenate([scale, scale[idx]])

    def renamed(name: str, value: np.ndarray, tag: str) -> str:
        new = f"{name}/split_{tag}"
        graph.initializer.append(numpy_helper.from_array(value.astype(np.float32), new))
        return new

    nodes = {n.output[0]: n for n in graph.node}
    src = nodes[source["source"].output[0]]
    w1 = numpy_helper.to_array(consts[src.input[1]])
    src.input[1] = renamed(src.input[1], np.concatenate([w1, w1[:, idx]], axis=1), "columns")
    for out, name in source["vectors"]:
        node = nodes[out]
        v = numpy_helper.to_array(consts[name])
        flat = v.reshape(-1)
        widened = np.concatenate([flat, flat[idx]]).reshape((*v.shape[:-1], len(flat) + len(idx)))
        node.input[list(node.input).index(name)] = renamed(name, widened, "channels")
    for matmul in site["matmuls"]:
        node = nodes[matmul.output[0]]
        w2 = numpy_helper.to_array(consts[node.input[1]])
        node.input[1] = renamed(node.input[1], np.concatenate([w2, w2[idx]], axis=0), "rows")
    if site["mode"] == "insert":
        _insert_mul(proto, {**site, "matmuls": [nodes[m.output[0]] for m in site["matmuls"]]}, scale)
    else:
        mul = nodes[site["mul"].output[0]]
        c = numpy_helper.to_array(consts[site["const"]]).reshape(())
        mul.input[site["k"]] = renamed(site["const"], c * scale, "scale")
    stale = set(source["inner"]) | {src.output[0], site["act"]}  # their recorded shapes are one width short now
    kept = [v for v in graph.value_info if v.name not in stale]
    del graph.value_info[:]
    graph.value_info.extend(kept)
    used = {i for n in graph.node for i in n.input}
    unused = [i for i in graph.initializer if i.name not in used]  # the narrower originals, unless shared
    for init in unused:
        graph.initializer.remove(init)
    return int(idx.size)
