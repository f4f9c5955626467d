"""The graph an ORT-format (.ort) file holds, as an ONNX model without weights: nodes, attributes, shapes.

Read with ORT's own flatbuffers bindings, so reports about a .ort describe the file itself, not the ONNX model
it was converted from (Fixed-style conversion fuses and re-lays out nodes). Shapes are the ones ORT stored.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import onnx
from onnx import helper

from edgepipe.core.errors import BadInput

logger = logging.getLogger(__name__)


def _fbs() -> Any:
    import onnxruntime.tools.ort_format_model  # noqa: F401 - puts ORT's flatbuffers bindings on the path
    import ort_flatbuffers_py.fbs as fbs

    return fbs


def load_ort(path: Path) -> onnx.ModelProto:
    """The .ort file's model: every node (subgraphs included) and every value's type and shape."""
    fbs = _fbs()
    buf = bytearray(Path(path).read_bytes())
    if not fbs.InferenceSession.InferenceSession.InferenceSessionBufferHasIdentifier(buf, 0):
        raise BadInput(f"{path}: not an ORT format model; convert it with onnxruntime.tools.convert_onnx_models_to_ort")
    model = fbs.InferenceSession.InferenceSession.GetRootAsInferenceSession(buf, 0).Model()
    opsets = [helper.make_opsetid(model.OpsetImport(i).Domain().decode(), model.OpsetImport(i).Version())
              for i in range(model.OpsetImportLength())]
    return helper.make_model(_graph(fbs, model.Graph(), "main"), opset_imports=opsets, ir_version=model.IrVersion())


def _text(value: bytes | None) -> str:
    return value.decode() if value else ""


def _value_info(fbs: Any, arg: Any) -> onnx.ValueInfoProto | None:
    info = arg.Type()
    if info is None or info.ValueType() != fbs.TypeInfoValue.TypeInfoValue.tensor_type:
        return None  # sequences and maps: no tensor shape to report
    tensor = fbs.TensorTypeAndShape.TensorTypeAndShape()
    tensor.Init(info.Value().Bytes, info.Value().Pos)
    shape = tensor.Shape()
    dims: list[int | str | None] | None = None
    if shape is not None:
        dims = []
        for k in range(shape.DimLength()):
            value = shape.Dim(k).Value()
            kind = value.DimType() if value is not None else 0
            dims.append(value.DimValue() if kind == 1 else _text(value.DimParam()) if kind == 2 else None)
    return helper.make_tensor_value_info(_text(arg.Name()), tensor.ElemType(), dims)


def _attribute(fbs: Any, attr: Any) -> onnx.AttributeProto | None:
    kinds = fbs.AttributeType.AttributeType
    name, kind = _text(attr.Name()), attr.Type()
    if kind == kinds.FLOAT:
        return helper.make_attribute(name, attr.F())
    if kind == kinds.INT:
        return helper.make_attribute(name, attr.I())
    if kind == kinds.STRING:
        return helper.make_attribute(name, attr.S())
    if kind == kinds.INTS:
        return helper.make_attribute(name, [attr.Ints(j) for j in range(attr.IntsLength())], attr_type=onnx.AttributeProto.INTS)
    if kind == kinds.FLOATS:
        return helper.make_attribute(name, [attr.Floats(j) for j in range(attr.FloatsLength())], attr_type=onnx.AttributeProto.FLOATS)
    if kind == kinds.STRINGS:
        return helper.make_attribute(name, [attr.Strings(j) for j in range(attr.StringsLength())], attr_type=onnx.AttributeProto.STRINGS)
    if kind == kinds.GRAPH:
        return helper.make_attribute(name, _graph(fbs, attr.G(), name))
    if kind == kinds.GRAPHS:
        return helper.make_attribute(name, [_graph(fbs, attr.Graphs(j), name) for j in range(attr.GraphsLength())])
    return None  # tensors: values are not needed to describe the graph


def _graph(fbs: Any, graph: Any, name: str) -> onnx.GraphProto:
    args = {}
    for j in range(graph.NodeArgsLength()):
        arg = graph.NodeArgs(j)
        args[_text(arg.Name())] = _value_info(fbs, arg) or helper.make_empty_tensor_value_info(_text(arg.Name()))
    nodes = []
    for i in range(graph.NodesLength()):
        node = graph.Nodes(i)
        if node is None:  # a removed node's slot
            continue
        attrs = [a for a in (_attribute(fbs, node.Attributes(j)) for j in range(node.AttributesLength())) if a is not None]
        proto = helper.make_node(_text(node.OpType()), [_text(node.Inputs(j)) for j in range(node.InputsLength())],
                                 [_text(node.Outputs(j)) for j in range(node.OutputsLength())],
                                 name=_text(node.Name()), domain=_text(node.Domain()) or None)
        proto.attribute.extend(attrs)
        nodes.append(proto)
    nodes = _topological(nodes)
    inputs = [_text(graph.Inputs(j)) for j in range(graph.InputsLength())]
    outputs = [_text(graph.Outputs(j)) for j in range(graph.OutputsLength())]
    inits = []
    for j in range(graph.InitializersLength()):
        t = graph.Initializers(j)
        inits.append(onnx.TensorProto(name=_text(t.Name()), data_type=t.DataType(), dims=[t.Dims(k) for k in range(t.DimsLength())]))
    init_names = {t.name for t in inits}
    io = set(inputs) | set(outputs)
    value_info = [v for n, v in args.items() if n not in io and n not in init_names and n]
    return helper.make_graph(nodes, name, [args.get(n) or helper.make_empty_tensor_value_info(n) for n in inputs],
                             [args.get(n) or helper.make_empty_tensor_value_info(n) for n in outputs], inits,
                             value_info=value_info)


def _topological(nodes: list[onnx.NodeProto]) -> list[onnx.NodeProto]:
    """Nodes in an order where each comes after its producers (.ort files keep ORT's node index order)."""
    produced = {o: i for i, n in enumerate(nodes) for o in n.output if o}
    done: set[int] = set()
    order: list[onnx.NodeProto] = []

    def visit(i: int, path: frozenset[int]) -> None:
        if i in done or i in path:
            return
        for name in nodes[i].input:
            if name in produced:
                visit(produced[name], path | {i})
        done.add(i)
        order.append(nodes[i])

    for i in range(len(nodes)):
        visit(i, frozenset())
    return order
