"""The spine on the real digits model: export, cpu int8, accuracy, artifact layout."""

from __future__ import annotations

import json

import numpy as np
import onnx

from edgepipe.core.artifact import load_golden


def test_cpu_int8_artifact_keeps_accuracy_and_shrinks(digits_build):
    manifest = json.loads((digits_build / "cpu" / "manifest.json").read_text())
    acc = manifest["accuracy"]
    assert acc["metric"] == "top1" and acc["data"] == "eval"
    assert acc["samples"] == 360  # the fixed 20% test split of load_digits
    assert acc["reference"] > 0.95  # a trained model, not noise
    assert acc["drop"] <= 0.01 and acc["passed"]
    assert manifest["size"]["ratio"] <= 0.30
    assert manifest["status"] == "passed"


def test_cpu_default_chain_is_static_qdq_per_channel(digits_build):
    manifest = json.loads((digits_build / "cpu" / "manifest.json").read_text())
    assert [p["name"] for p in manifest["passes"]] == ["cleanup", "optimize.ort", "quantize.static"]
    static = manifest["passes"][-1]
    assert static["params"]["per_channel"] and static["stats"]["calibration_samples"] > 0
    model = onnx.load(str(digits_build / "cpu" / "model.onnx"))
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("QuantizeLinear") >= 5 and ops.count("DequantizeLinear") >= 10
    weights = {i.name: i for i in model.graph.initializer}
    conv_w = [n for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[0].endswith("weight_quantized")]
    assert conv_w and all(weights[n.input[0]].data_type == onnx.TensorProto.INT8 for n in conv_w)
    scales = [weights[n.input[1]] for n in conv_w]
    assert any(len(s.dims) == 1 and s.dims[0] > 1 for s in scales)  # per-channel scales


def test_export_was_checked_at_three_batch_sizes(digits_build):
    manifest = json.loads((digits_build / "cpu" / "manifest.json").read_text())
    check = manifest["source"]["export_check"]
    assert check["passed"] and check["cases"] == 3
    assert sorted(dict(s)["batch"] for s in check["sizes"]) == [1, 8, 11]
    assert check["max_abs"] < 1e-3


def test_manifest_lists_every_file_and_golden_io(digits_build):
    folder = digits_build / "cpu"
    manifest = json.loads((folder / "manifest.json").read_text())
    assert set(manifest["files"]) == {"model.onnx", "golden.npz"}
    assert manifest["inputs"] == [{"name": "image", "dtype": "float32", "shape": ["batch", 1, 8, 8]}]
    assert manifest["runtime"]["providers"] == ["CPUExecutionProvider"]
    inputs, expected, reference = load_golden(folder / "golden.npz")
    assert inputs["image"].shape == (8, 1, 8, 8)
    assert expected["logits"].shape == reference["logits"].shape == (8, 10)
    assert np.mean(expected["logits"].argmax(1) == reference["logits"].argmax(1)) >= 0.875
    assert (digits_build / "report.html").is_file()


def test_no_leftover_temp_folders(digits_build):
    assert sorted(p.name for p in digits_build.iterdir()) == ["cpu", "gpu", "mobile", "report.html"]
