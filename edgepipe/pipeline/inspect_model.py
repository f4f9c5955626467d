"""edgepipe inspect: what is inside an ONNX file."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import onnx
from google.protobuf.message import DecodeError

from edgepipe.core.errors import BadInput, one_line
from edgepipe.passes.base import model_stats


def read_onnx(path: Path) -> onnx.ModelProto:
    """Load an ONNX file, or fail with one line that says why."""
    if not path.is_file():
        raise BadInput(f"{path} not found")
    if path.stat().st_size == 0:
        raise BadInput(f"{path} is empty (0 bytes); re-export the model")
    try:
        model = onnx.load(str(path))
    except (DecodeError, RuntimeError, ValueError, OSError, UnicodeDecodeError) as exc:
        raise BadInput(one_line(f"{path} is not an ONNX model (or is truncated): {exc}")) from None
    if not model.graph.node and not model.graph.output:
        raise BadInput(f"{path} is not an ONNX model (no graph); check the file")
    return model


def inspect_model(path: Path) -> dict[str, Any]:
    import onnx_ir as ir

    proto = read_onnx(path)
    try:
        model = ir.from_proto(proto)
    except Exception as exc:  # parsed as protobuf, but not a coherent graph
        raise BadInput(f"{path} is not a well-formed ONNX model: {type(exc).__name__}: {exc}") from None
    inits = {i.name for i in proto.graph.initializer}
    produced = inits | {v.name for v in proto.graph.input} | {o for n in proto.graph.node for o in n.output}
    dangling = [o.name for o in proto.graph.output if o.name not in produced]
    if dangling:
        raise BadInput(f"{path} is not a well-formed ONNX model: graph output {dangling[0]!r} is produced by no node, "
                       "input or initializer; re-export the model")

    def io(values):
        res = []
        for v in values:
            t = v.type.tensor_type
            shape = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in t.shape.dim]
            res.append({"name": v.name, "dtype": onnx.TensorProto.DataType.Name(t.elem_type).lower(), "shape": shape})
        return res

    ops = Counter(n.op_type if n.domain in ("", "ai.onnx") else f"{n.domain}.{n.op_type}" for n in proto.graph.node)
    return {
        "file": str(path),
        "size_bytes": path.stat().st_size,
        "ir_version": proto.ir_version,
        "opsets": {(o.domain or "ai.onnx"): o.version for o in proto.opset_import},
        "producer": f"{proto.producer_name} {proto.producer_version}".strip(),
        "inputs": io(v for v in proto.graph.input if v.name not in inits),
        "outputs": io(proto.graph.output),
        "ops": dict(ops.most_common()),
        **model_stats(model),
    }
