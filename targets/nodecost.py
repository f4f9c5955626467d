"""Per-node cost of int8 against float: one ORT profiling run of each model as the target ships it.

ORT reports every kernel's time under the name of the node it ran (after its own graph rewrites: a fused
QLinearConv is named after the Conv it replaced plus a suffix, an NCHWc conv after its output tensor, a
QuantizeLinear/DequantizeLinear after the tensor it converts). Each kernel time is mapped back to a node of the
float graph (the names the quantizer and quantize.auto use):

- a node name or an output tensor name that the kernel's name starts with (the longest one), the tensor giving
  its producer;
- a QuantizeLinear of tensor t serves t's producer (the node whose int8 output it makes, or, for a graph
  input, the node reading it); a DequantizeLinear of t serves the node reading t;
- an activation ORT fused into the conv before it (Relu, Clip) counts with that conv.

Kernels no name maps to (layout Reorder/Transpose inserted by ORT) are left out: they are small and shared.
The result is per float node: (int8 ms, float ms) per call, one thread.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import onnx

from edgepipe.core.bench import resize_batch
from edgepipe.core.runtime import pad_tokens, session

FOLLOWERS = {"Relu", "Clip", "LeakyRelu", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh", "BatchNormalization"}
CONVERTERS = {"_QuantizeLinear": "q", "_DequantizeLinear": "dq"}
ITERATIONS = 10


class _Names:
    """Resolves an ORT kernel name to a float-graph node name."""

    def __init__(self, graph: onnx.GraphProto) -> None:
        self.nodes = {n.name: n for n in graph.node if n.name}
        self.producer = {o: n.name for n in graph.node for o in n.output if o and n.name}
        self.readers: dict[str, list[str]] = defaultdict(list)
        for n in graph.node:
            for i in n.input:
                if i and n.name:
                    self.readers[i].append(n.name)
        self.inputs = {i.name for i in graph.input}
        # candidate keys, longest first: a kernel name is such a key, optionally followed by '_<suffix>'
        self.keys = sorted({*self.nodes, *self.producer, *self.inputs}, key=len, reverse=True)

    def _match(self, text: str) -> str | None:
        for key in self.keys:
            if text == key or (text.startswith(key) and text[len(key)] == "_"):
                return key
        return None

    def _node(self, key: str) -> str | None:
        """A matched key (node or tensor name) as a node: the node itself, a tensor's producer or first reader."""
        if key in self.nodes:
            return key
        if key in self.producer:
            return self.producer[key]
        readers = self.readers.get(key)
        return readers[0] if readers else None

    def resolve(self, kernel: str, op: str) -> str | None:
        for marker, kind in CONVERTERS.items():
            at = kernel.find(marker)
            if at > 0 and op in ("QuantizeLinear", "DequantizeLinear"):
                tensor = self._match(kernel[:at])
                if tensor is None:
                    return None
                readers = self.readers.get(tensor)
                if (kind == "q" or not readers) and tensor in self.producer:  # a DQ of a graph output: its producer
                    return self._anchor(self.producer[tensor])
                return self._anchor(readers[0]) if readers else None
        key = self._match(kernel)
        node = self._node(key) if key is not None else None
        return self._anchor(node) if node is not None else None

    def _anchor(self, name: str) -> str:
        """An activation that follows a single producer (fused into it by ORT) counts with that producer."""
        node = self.nodes[name]
        if node.op_type in FOLLOWERS and node.input and node.input[0] in self.producer:
            before = self.nodes[self.producer[node.input[0]]]
            if before.op_type in ("Conv", "ConvTranspose", "Gemm", "MatMul") and len(self.readers[node.input[0]]) == 1:
                return before.name
        return name


def kernel_times(path: Path, sample: dict[str, np.ndarray], workdir: Path, providers: list[str] | None = None,
                 iterations: int = ITERATIONS) -> list[tuple[str, str, float, int]]:
    """(kernel name, op type, ms per call, elements of its largest output) of one model file, profiled over
    ``iterations`` runs on one thread."""
    workdir.mkdir(parents=True, exist_ok=True)
    sess = session(path, providers, threads=1, profile_prefix=workdir / path.parent.name)
    meta = {i.name: i for i in sess.get_inputs()}
    feed = resize_batch(sample, 1)
    feed = {k: pad_tokens(np.asarray(v), meta[k].shape) for k, v in feed.items() if k in meta}
    for _ in range(iterations + 1):  # the first run is a warm-up (allocations, weight packing): dropped below
        sess.run(None, feed)
    events = _kernel_events(json.loads(Path(sess.end_profiling()).read_text()))
    calls: dict[tuple[str, str], list[float]] = defaultdict(list)
    elements: dict[tuple[str, str], int] = {}
    for name, op, dur, size in events:
        if (name, op) not in elements:  # the first call of each kernel (its one-time packing) is not a call's cost
            elements[name, op] = size
            continue
        calls[name, op].append(dur)
    # the median call, times the calls a run makes: a call the scheduler preempted on a shared machine (one 2-core
    # box runs builds and tests side by side) does not make its node look like the costliest
    return [(name, op, float(np.median(us)) * len(us) / iterations / 1e3, elements[name, op]) for (name, op), us in calls.items()]


def _kernel_events(events: Iterable[dict]) -> list[tuple[str, str, float, int]]:
    out = []
    for e in events:
        name = e.get("name", "")
        if e.get("cat") == "Node" and name.endswith("_kernel_time"):
            args = e.get("args", {})
            shapes = [dims for o in args.get("output_type_shape", []) for dims in o.values()]
            size = max((int(np.prod(d)) for d in shapes), default=0)
            out.append((name[: -len("_kernel_time")], args.get("op_name", ""), float(e.get("dur", 0)), size))
    return out


def attribute(times: list[tuple[str, str, float, int]], graph: onnx.GraphProto) -> tuple[dict[str, float], float, dict[str, int]]:
    """Kernel times summed per float-graph node (see the module doc), the time no node name maps to, and each
    node's output elements (from the kernel mapped to it that is not a QuantizeLinear/DequantizeLinear)."""
    names = _Names(graph)
    per: dict[str, float] = defaultdict(float)
    elements: dict[str, int] = {}
    other = 0.0
    for kernel, op, ms, size in times:
        node = names.resolve(kernel, op)
        if node is None:
            other += ms
            continue
        per[node] += ms
        if op not in ("QuantizeLinear", "DequantizeLinear"):
            elements[node] = max(elements.get(node, 0), size)
    return dict(per), other, elements


def node_costs(float_path: Path, int8_path: Path, float_graph: onnx.GraphProto, sample: dict[str, np.ndarray],
               workdir: Path, providers: list[str] | None = None) -> dict[str, dict[str, float]]:
    """Per float node: {'int8_ms', 'float_ms', 'elements'} (ms per call, one thread; the elements of its output),
    from one profiling run of each model.

    Only nodes some kernel time maps to in either model; '' holds the time no name maps to, and
    'crossing_ms_per_element': what one tensor element costs to cross between int8 and float (see ``crossing``).
    """
    float_times = kernel_times(float_path, sample, workdir / "float", providers)
    int8_times = kernel_times(int8_path, sample, workdir / "int8", providers)
    f, f_other, f_elements = attribute(float_times, float_graph)
    q, q_other, q_elements = attribute(int8_times, float_graph)
    costs = {n: {"int8_ms": round(q.get(n, 0.0), 5), "float_ms": round(f.get(n, 0.0), 5),
                 "elements": q_elements.get(n, f_elements.get(n, 0))} for n in sorted({*f, *q})}
    costs[""] = {"int8_ms": round(q_other, 5), "float_ms": round(f_other, 5), "crossing_ms_per_element": crossing(int8_times)}
    return costs


def crossing(int8_times: list[tuple[str, str, float, int]]) -> float:
    """ms per element for a tensor crossing between an int8 node and a float one (and back): a DequantizeLinear, a
    QuantizeLinear and the layout changes around a float conv (NHWC int8 ↔ NCHWc float), priced from the int8
    model's own converters (its input's QuantizeLinear, Transpose): the median per-element time, four of them.
    """
    rates = [ms / size for _, op, ms, size in int8_times
             if op in ("QuantizeLinear", "DequantizeLinear", "Transpose") and size >= 1024 and ms > 0]
    return 4 * float(np.median(rates)) if rates else 4e-6  # no converter timed: ~1 ns an element each


def slower_in_int8(costs: dict[str, dict[str, float]], min_ms: float = 0.005) -> list[str]:
    """Nodes whose int8 form costs more than their float form (by more than ``min_ms``), costliest first."""
    rows = [(c["int8_ms"] - c["float_ms"], n) for n, c in costs.items() if n]
    return [n for extra, n in sorted(rows, reverse=True) if extra > min_ms]
