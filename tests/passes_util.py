"""Helpers for pass tests: run a model in ORT, check the contract, the digits test split."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort

DIGITS = Path(__file__).resolve().parents[1] / "models" / "digits"


def run(model: ir.Model, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
    """Outputs from ONNX Runtime CPU (fails if ORT cannot load the model)."""
    session = ort.InferenceSession(ir.to_proto(model).SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feed)


def check_contract(model: ir.Model) -> None:
    """What every pass must leave: a model onnx.checker accepts (with shapes) and ORT loads."""
    proto = ir.to_proto(model)
    onnx.checker.check_model(proto, full_check=True)
    ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])


def same(a: ir.Model, b: ir.Model) -> bool:
    """Byte-identical graphs (for idempotence)."""
    def norm(m: ir.Model) -> bytes:
        return ir.to_proto(ir.from_proto(ir.to_proto(m))).graph.SerializeToString(deterministic=True)

    return norm(a) == norm(b)


def _digits_data():
    spec = importlib.util.spec_from_file_location("digits_data_for_tests", DIGITS / "data.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def digits_split() -> tuple[np.ndarray, np.ndarray]:
    """The fixed test split (images, labels)."""
    _, _, x_te, y_te = _digits_data().split()
    return x_te, y_te


def digits_train(n: int = 128) -> np.ndarray:
    """The first ``n`` training images (what the recipe's calibration data yields)."""
    return _digits_data().split()[0][:n]


def top1(model: ir.Model) -> float:
    x, y = digits_split()
    return float(np.mean(run(model, {"image": x})[0].argmax(1) == y))


F, I64 = onnx.TensorProto.FLOAT, onnx.TensorProto.INT64


def tensor(name: str, shape: list | None, elem: int = F) -> onnx.ValueInfoProto:
    return onnx.helper.make_tensor_value_info(name, elem, shape)


def make_model(nodes: list, inits: dict[str, np.ndarray], inputs: list, outputs: list, opset: int = 17) -> ir.Model:
    """An ir.Model from onnx.helper nodes and numpy initializers."""
    graph = onnx.helper.make_graph(nodes, "g", inputs, outputs, [onnx.numpy_helper.from_array(v, k) for k, v in inits.items()])
    return ir.from_proto(onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", opset)]))


def node(op: str, inputs: list[str], outputs: list[str], **attrs) -> onnx.NodeProto:
    return onnx.helper.make_node(op, inputs, outputs, name=outputs[0], **attrs)
