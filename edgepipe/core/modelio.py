"""Model files and copies: load / save (external data for large models), clone, opset, stats. Used by every layer."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir


def default_opset(proto: onnx.ModelProto) -> int | None:
    """The model's ai.onnx opset version (None when it imports none)."""
    return next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)


def clone(model: ir.Model) -> ir.Model:
    """A deep copy (round trip through the proto; weights are copied)."""
    return ir.from_proto(ir.to_proto(model))


def external_threshold() -> int:
    """Weight bytes above which models are saved with external data (protobuf's limit is 2 GB).

    ``EDGEPIPE_EXTERNAL_DATA_THRESHOLD`` lowers it, so tests run the large-model path on small models.
    """
    return int(os.environ.get("EDGEPIPE_EXTERNAL_DATA_THRESHOLD", 1_500_000_000))


def is_large(model: ir.Model) -> bool:
    return weight_bytes(model) > external_threshold()


def weight_bytes(model: ir.Model) -> int:
    return sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None)


def save(model: ir.Model, path: Path) -> Path:
    """Write a model; large ones put their weights in ``<file>.data`` beside it (a stable name)."""
    if is_large(model):
        ir.save(model, path, external_data=path.name + ".data")
    else:
        onnx.save_model(ir.to_proto(model), str(path))
    return path


def load(path: Path) -> ir.Model:
    """Read a model with its weights in memory (external data included, so copies stay valid)."""
    model = ir.load(path)
    return ir.external_data.load_to_model(model)


def model_stats(model: ir.Model) -> dict[str, float | int]:
    """Nodes, parameters, bytes and sparsity (zero share of float weights)."""
    params = nbytes = zeros = float_params = 0
    for value in model.graph.initializers.values():
        tensor = value.const_value
        if tensor is None:
            continue
        size = int(np.prod(tensor.shape.numpy())) if tensor.shape is not None else 0
        params += size
        nbytes += tensor.nbytes
        if tensor.dtype in (ir.DataType.FLOAT, ir.DataType.FLOAT16) and size > 1:
            float_params += size
            zeros += int(size - np.count_nonzero(tensor.numpy()))
    nodes = sum(1 for _ in model.graph.all_nodes())
    return {
        "nodes": nodes,
        "params": params,
        "bytes": nbytes,
        "sparsity": round(zeros / float_params, 4) if float_params else 0.0,
    }


def describe_values(values) -> list[dict]:
    """name, numpy dtype and shape (dim names for dynamic dims) of ONNX graph inputs/outputs."""
    out = []
    for v in values:
        t = v.type.tensor_type
        shape = [d.dim_value if d.HasField("dim_value") else d.dim_param for d in t.shape.dim]
        out.append({"name": v.name, "dtype": onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name, "shape": shape})
    return out
