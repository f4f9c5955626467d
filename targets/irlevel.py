"""What a model needs of the ONNX IR version: each feature with the IR version that introduced it.

From onnx.proto's IR version history (onnx/onnx docs/IR.md, Versioning.md). Lowering ``ir_version`` by
assignment is safe only when the model uses nothing newer than the target version; ``lower`` refuses
what the target lacks (naming the feature) and drops only what carries no meaning (metadata).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import onnx
from onnx import TensorProto

from edgepipe.core.errors import BadInput

logger = logging.getLogger(__name__)

# element type → the IR version that introduced it
TYPE_SINCE: dict[int, int] = {
    TensorProto.BFLOAT16: 4,
    TensorProto.FLOAT8E4M3FN: 9, TensorProto.FLOAT8E4M3FNUZ: 9, TensorProto.FLOAT8E5M2: 9, TensorProto.FLOAT8E5M2FNUZ: 9,
    TensorProto.UINT4: 10, TensorProto.INT4: 10,
}
for _name, _since in (("FLOAT4E2M1", 11), ("FLOAT8E8M0", 12), ("UINT2", 13), ("INT2", 13), ("FLOAT6E2M3", 14), ("FLOAT6E3M2", 14)):
    if hasattr(TensorProto, _name):  # newer than some onnx releases this supports
        TYPE_SINCE[getattr(TensorProto, _name)] = _since
# attributes whose int value is an element type
DTYPE_ATTRS = {"to", "dtype", "output_dtype"}


def _graphs(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from _graphs(attr.g)
            for g in attr.graphs:
                yield from _graphs(g)


def nodes(model: onnx.ModelProto) -> Iterator[onnx.NodeProto]:
    for graph in _graphs(model.graph):
        yield from graph.node
    for function in model.functions:
        yield from function.node


def _type_elems(t: onnx.TypeProto, where: str) -> Iterator[tuple[int, str]]:
    kind = t.WhichOneof("value")
    if kind == "tensor_type":
        yield t.tensor_type.elem_type, where
    elif kind == "sparse_tensor_type":
        yield t.sparse_tensor_type.elem_type, where
    elif kind == "sequence_type":
        yield from _type_elems(t.sequence_type.elem_type, where)
    elif kind == "optional_type":
        yield from _type_elems(t.optional_type.elem_type, where)
    elif kind == "map_type":
        yield from _type_elems(t.map_type.value_type, where)


def _kinds(t: onnx.TypeProto) -> set[str]:
    kind = t.WhichOneof("value")
    inner = {"sequence_type": lambda: t.sequence_type.elem_type, "optional_type": lambda: t.optional_type.elem_type,
             "map_type": lambda: t.map_type.value_type}
    return {kind} | (_kinds(inner[kind]()) if kind in inner else set())


def _element_types(model: onnx.ModelProto) -> Iterator[tuple[int, str]]:
    """(element type, where it is used) for every tensor, type and dtype attribute in the model."""
    for graph in _graphs(model.graph):
        for init in graph.initializer:
            yield init.data_type, f"initializer '{init.name}'"
        for sparse in graph.sparse_initializer:
            yield sparse.values.data_type, f"sparse initializer '{sparse.values.name}'"
        for value in (*graph.input, *graph.output, *graph.value_info):
            yield from _type_elems(value.type, f"value '{value.name}'")
    for node in nodes(model):
        label = f"node '{node.name or node.op_type}' ({node.op_type})"
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.TENSOR:
                yield attr.t.data_type, label
            for t in attr.tensors:
                yield t.data_type, label
            if attr.type == onnx.AttributeProto.INT and attr.name in DTYPE_ATTRS:
                yield attr.i, label


def features(model: onnx.ModelProto) -> list[tuple[int, str]]:
    """(IR version needed, what needs it) for everything in ``model`` newer than IR version 3."""
    found: list[tuple[int, str]] = []
    graph = model.graph
    inputs = {i.name for i in graph.input}
    loose = [i.name for i in graph.initializer if i.name not in inputs]
    if loose:
        found.append((4, f"initializers that are not graph inputs ('{loose[0]}'{' and others' if len(loose) > 1 else ''})"))
    if any(g.quantization_annotation for g in _graphs(graph)):
        found.append((5, "quantization annotations"))
    if any(g.sparse_initializer for g in _graphs(graph)):
        found.append((6, "sparse initializers"))
    if model.training_info:
        found.append((7, "training info"))
    if model.functions:
        found.append((8, f"model-local functions ('{model.functions[0].name}')"))
    for g in _graphs(graph):
        for value in (*g.input, *g.output, *g.value_info):
            kinds = _kinds(value.type)
            if "optional_type" in kinds:
                found.append((8, f"optional type (value '{value.name}')"))
            if "sparse_tensor_type" in kinds:
                found.append((8, f"sparse tensor type (value '{value.name}')"))
    if any(f.attribute_proto for f in model.functions):
        found.append((9, "function attribute defaults"))
    if any(f.overload for f in model.functions) or any(n.overload for n in nodes(model)):
        found.append((10, "function overloads"))
    if model.configuration or any(n.device_configurations for n in nodes(model)):
        found.append((11, "multi-device configurations"))
    names = {v: k for k, v in TensorProto.DataType.items()}
    for elem, where in _element_types(model):
        since = TYPE_SINCE.get(elem)
        if since is not None:
            found.append((since, f"element type {names.get(elem, elem)} ({where})"))
    return found


def drop_metadata(model: onnx.ModelProto) -> int:
    """Remove the per-node/graph/value metadata IR 10 added (informational only); returns how many went."""
    dropped = 0
    holders: list = [*nodes(model), *model.functions]
    for graph in _graphs(model.graph):
        holders += [graph, *graph.input, *graph.output, *graph.value_info]
    for holder in holders:
        dropped += len(holder.metadata_props)
        del holder.metadata_props[:]
    return dropped


def check(model: onnx.ModelProto, max_ir: int, runtime: str) -> None:
    """Raise BadInput naming the newest feature of ``model`` that IR version ``max_ir`` lacks."""
    too_new = sorted((since, what) for since, what in features(model) if since > max_ir)
    if too_new:
        since, what = too_new[-1]
        raise BadInput(
            f"runtime {runtime}: the model uses {what}, which needs ONNX IR version {since}; this runtime reads "
            f"IR version {max_ir} at most: request a newer runtime or change the model"
        )


def lower(model: onnx.ModelProto, max_ir: int, runtime: str) -> dict:
    """Set ``model.ir_version`` to ``max_ir`` in place, or raise BadInput naming a feature that IR lacks."""
    if model.ir_version <= max_ir:
        return {}
    check(model, max_ir, runtime)
    info = {}
    if max_ir < 10 and (dropped := drop_metadata(model)):
        info["metadata_props_dropped"] = dropped  # IR 10 introduced them on nodes, graphs and values
        logger.debug("dropped %d metadata_props for IR version %d", dropped, max_ir)
    model.ir_version = max_ir
    return info
