"""Find nodes that int8 must not touch: attention-mask paths that carry float-min / -1e4 / -inf values."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

# Ops a mask passes through between its "minus infinity" constant and the scores Add.
MASK_OPS = {
    "Where", "Mul", "Sub", "Add", "Cast", "Expand", "Unsqueeze", "Reshape", "Concat", "Slice",
    "Min", "Max", "Neg", "Squeeze", "Transpose", "Tile", "Identity",
}
SOFTMAX = {"Softmax", "LogSoftmax"}
MAX_DEPTH = 8
MAX_CONST_ELEMENTS = 64  # mask fill values are scalars; weights are never considered


def name_nodes(model: ir.Model) -> None:
    """Give every unnamed node a unique name (ORT's quantizer excludes nodes by name)."""
    taken = {n.name for n in model.graph.all_nodes() if n.name}
    for i, node in enumerate(model.graph.all_nodes()):
        if not node.name:
            candidate = f"{node.op_type}_{i}"
            while candidate in taken:
                candidate += "_"
            node.name = candidate
            taken.add(candidate)


def _huge(value: ir.Value, threshold: float) -> float | None:
    tensor = value.const_value
    if tensor is None or tensor.size > MAX_CONST_ELEMENTS or not tensor.dtype.is_floating_point():
        return None
    array = tensor.numpy().astype(np.float64)
    if array.size == 0:
        return None
    worst = float(np.max(np.abs(np.nan_to_num(array, nan=0.0, posinf=np.inf, neginf=np.inf))))
    return worst if worst >= threshold else None


def attention_mask_nodes(model: ir.Model, threshold: float = 1e4) -> dict[str, str]:
    """Nodes on a path from a huge constant (|x| ≥ threshold, ±inf) to a Softmax, with the reason.

    Quantizing these ruins attention: one tensor holding both scores (≈10)
    and the mask fill (-3.4e38) gets a scale under which every score rounds
    to the same value. They are returned to be kept in float.
    """
    found: dict[str, str] = {}
    for node in model.graph.all_nodes():
        for value in node.inputs:
            if value is None or (worst := _huge(value, threshold)) is None:
                continue
            path = _paths_to_softmax(node, MAX_DEPTH)
            for hit in path:
                found.setdefault(hit.name, f"attention-mask path: constant {value.name} (max |x| {worst:.3g}) reaches Softmax")
    return found


def _paths_to_softmax(start: ir.Node, depth: int) -> list[ir.Node]:
    """Nodes (``start`` included) that lie on some forward path from ``start`` to a Softmax."""
    memo: dict[int, list[ir.Node] | None] = {}

    def walk(node: ir.Node, left: int) -> list[ir.Node] | None:
        if node.op_type in SOFTMAX:
            return [node]
        if node.op_type not in MASK_OPS or left == 0:
            return None
        if id(node) in memo:
            return memo[id(node)]
        memo[id(node)] = None  # cycles are impossible in a DAG; this guards the recursion
        hits: list[ir.Node] = []
        for out in node.outputs:
            for user, _ in out.uses():
                sub = walk(user, left - 1)
                if sub:
                    hits.extend(sub)
        result = [node, *hits] if hits else None
        memo[id(node)] = result
        return result

    return list({id(n): n for n in walk(start, depth) or []}.values())


INTEGER_TYPES = {
    ir.DataType.INT64, ir.DataType.INT32, ir.DataType.INT16, ir.DataType.INT8,
    ir.DataType.UINT64, ir.DataType.UINT32, ir.DataType.UINT16, ir.DataType.UINT8, ir.DataType.BOOL,
}


def index_nodes(model: ir.Model) -> dict[str, str]:
    """Float nodes that compute only on integers and small constants (positions, relative-position buckets).

    Their values are indices in float clothing (MPNet's bucket: ``log(distance / 8)``, -inf at distance 0,
    then cast back to int64); an int8 range over -inf turns them into NaN and the Gather they feed reads
    out of bounds. They carry no weights, so keeping them float costs nothing.
    """
    derived: set[int] = set()

    def index_like(value: ir.Value) -> bool:
        if id(value) in derived or value.dtype in INTEGER_TYPES:
            return True
        tensor = value.const_value
        return tensor is not None and tensor.size <= MAX_CONST_ELEMENTS

    found: dict[str, str] = {}
    for node in model.graph:  # ONNX graphs are in topological order
        inputs = [v for v in node.inputs if v is not None]
        if not inputs and node.op_type != "Constant":
            continue
        if all(index_like(v) for v in inputs):
            derived.update(id(v) for v in node.outputs)
            if any(v.dtype is not None and v.dtype.is_floating_point() for v in node.outputs) and node.op_type != "Constant":
                found[node.name] = "computes only on integers and small constants (positions / buckets): not an activation"
    return found
