"""fp16 on a ViT attention input: the Transpose → MatMul pattern that made ORT's CPU provider segfault."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from edgepipe.passes.base import PassContext, save
from edgepipe.passes.fp16 import Fp16


def _model() -> ir.Model:
    """torchvision's ViT attention input: nn.MultiheadAttention (batch_first) transposes [batch, tokens, dim] to
    [tokens, batch, dim] before its in-projection MatMul; in float16 ORT 1.32 (ORT_ENABLE_ALL) crashed creating the session."""
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.uniform(-0.2, 0.2, (32, 96)).astype(np.float32), "w")
    b = numpy_helper.from_array(rng.uniform(-0.2, 0.2, 96).astype(np.float32), "b")
    nodes = [helper.make_node("Transpose", ["x"], ["t"], perm=[1, 0, 2]), helper.make_node("MatMul", ["t", "w"], ["m"]),
             helper.make_node("Add", ["m", "b"], ["y"])]
    graph = helper.make_graph(nodes, "attention_input", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 17, 32])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [17, "N", 96])], [w, b])
    return ir.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10))


def test_fp16_model_loads_in_a_default_ort_session_and_matches_float32(tmp_path):
    model = _model()
    x = np.random.default_rng(1).standard_normal((2, 17, 32)).astype(np.float32)
    fp32 = save(model, tmp_path / "fp32.onnx")
    half = save(Fp16(context=PassContext(tmp_path))(model).model, tmp_path / "fp16.onnx")
    np.save(tmp_path / "x.npy", x)
    # In a child process: the failure this guards against is a segfault, which would take pytest down.
    code = (f"import numpy as np, onnxruntime as ort; s = ort.InferenceSession({str(half)!r}, providers=['CPUExecutionProvider']); "
            f"np.save({str(tmp_path / 'y.npy')!r}, s.run(None, {{'x': np.load({str(tmp_path / 'x.npy')!r})}})[0])")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=120)
    assert proc.returncode == 0, f"onnxruntime died creating the fp16 session (exit {proc.returncode})"
    want = ort.InferenceSession(str(fp32), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_allclose(np.load(tmp_path / "y.npy"), want, atol=2e-2)
