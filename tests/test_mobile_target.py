"""mobile target: fixed shapes, int8 QDQ, model.ort checked by onnxruntime, usability report."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest

from edgepipe.cli import main
from edgepipe.core.errors import BadInput
from edgepipe.core.runtime import Runner
from edgepipe.passes.base import PassContext, save
from edgepipe.passes.shapes import FixShapes, FixShapesConfig

TINY = """<ir_version: 10, opset_import: ["" : 17]>
agraph (float[batch, 3] x, float[batch, seq] t) => (float[batch, 3] y) { y = Relu(x) }"""


def test_model_ort_loads_and_runs_in_onnxruntime(digits_build):
    folder = digits_build / "mobile"
    session = ort.InferenceSession(str(folder / "model.ort"), providers=["CPUExecutionProvider"])
    (inp,) = session.get_inputs()
    assert inp.name == "image" and inp.shape == [1, 1, 8, 8]
    from models_digits_data import split

    _, _, x_te, y_te = split()
    logits = np.concatenate([session.run(None, {"image": x_te[i : i + 1]})[0] for i in range(40)])
    assert np.mean(logits.argmax(1) == y_te[:40]) >= 0.95


def test_manifest_accuracy_on_the_ort_file_and_usability(digits_build):
    folder = digits_build / "mobile"
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["model_file"] == "model.ort"
    assert set(manifest["files"]) == {"model.ort", "golden.npz", "required_operators.config", "usability_report.json"}
    acc = manifest["accuracy"]
    assert acc["samples"] == 360 and acc["drop"] <= 0.01 and acc["passed"]
    assert [p["name"] for p in manifest["passes"]] == ["cleanup", "optimize.ort", "quantize.static", "shapes.fix"]
    static = manifest["passes"][2]["params"]
    assert static["activation_type"] == "uint8" and static["weight_type"] == "int8" and static["per_channel"]
    assert manifest["inputs"] == [{"name": "image", "dtype": "float32", "shape": [1, 1, 8, 8]}]
    usability = manifest["mobile"]["usability"]
    assert set(usability) == {"nnapi", "coreml_mlprogram"}
    for ep in usability.values():
        assert ep["nodes"] > 10 and 0 <= ep["supported_nodes"] <= ep["nodes"] and ep["verdict"] in ("YES", "MAYBE", "NO")
        assert ep["share"] == round(ep["supported_nodes"] / ep["nodes"], 4)
    report = json.loads((folder / "usability_report.json").read_text())
    for info in report.values():
        assert len(info["unsupported_nodes"]) == info["nodes"] - info["supported_nodes"]
        assert all(n["reason"] and n["op"] for n in info["unsupported_nodes"])
    # Fixed shapes: NNAPI takes every node of this QDQ CNN as one partition.
    assert report["nnapi"]["partitions"] == 1 and report["nnapi"]["verdict"] == "YES"


def test_required_operators_config_is_the_converters_and_reproducible(digits_build):
    text = (digits_build / "mobile" / "required_operators.config").read_text()
    assert "/tmp" not in text and "model.ort" in text
    ops = [line for line in text.splitlines() if not line.startswith("#")]
    assert any(line.startswith("ai.onnx;") for line in ops)
    assert "QuantizeLinear" in text or "QLinearConv" in text


def test_verify_passes_on_mobile(digits_build, capsys):
    assert main(["verify", str(digits_build / "mobile")]) == 0
    assert "golden:logits" in capsys.readouterr().out


def test_shapes_fix_pass(tmp_path):
    model = ir.from_onnx_text(TINY)
    result = FixShapes(FixShapesConfig(shapes={"t": [1, 16]}), PassContext(tmp_path))(model)
    assert result.stats["inputs"] == {"t": [1, 16], "x": [1, 3]}
    proto = ir.to_proto(result.model)
    assert [d.dim_value for d in proto.graph.output[0].type.tensor_type.shape.dim] == [1, 3]
    with pytest.raises(BadInput, match="not model inputs"):
        FixShapes(FixShapesConfig(shapes={"img": [1, 3]}), PassContext(tmp_path))(model)
    with pytest.raises(BadInput, match="cannot take shape"):
        FixShapes(FixShapesConfig(shapes={"x": [1, 3, 3]}), PassContext(tmp_path))(model)


def test_runner_feeds_a_fixed_batch_in_chunks(tmp_path):
    model = ir.from_onnx_text(TINY.replace("batch", "2", 2).replace("[2, seq] t", "[2, 4] t"))
    path = save(model, tmp_path / "m.onnx")
    runner = Runner(path)
    assert runner.fixed_batch() == 2
    x = np.arange(-7, 8, dtype=np.float32).reshape(5, 3)
    got = runner.run_samples({"x": x, "t": np.zeros((5, 4), np.float32)})
    assert np.array_equal(got["y"], np.maximum(x, 0))


def test_old_runtime_cannot_read_ort_format(tmp_path, capsys):
    from conftest import DIGITS, write_recipe

    text = (DIGITS / "recipe.yaml").read_text().replace("targets: [cpu, mobile, gpu]", 'targets: {mobile: {runtime: {onnxruntime: "1.15"}}}')
    recipe = write_recipe(tmp_path, text)
    assert main(["build", str(recipe), "-o", str(tmp_path / "out")]) == 2
    assert "onnxruntime 1.15 cannot read the ORT format" in capsys.readouterr().err
    assert not (tmp_path / "out" / "digits-cnn" / "mobile").exists()


@pytest.fixture(autouse=True, scope="module")
def _digits_data_module():
    import importlib.util
    import sys

    from conftest import DIGITS

    spec = importlib.util.spec_from_file_location("models_digits_data", DIGITS / "data.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    sys.modules["models_digits_data"] = module
    yield
    sys.modules.pop("models_digits_data", None)


def test_ort_inputs_match_onnx_description(digits_build):
    # The manifest's opset comes from the QDQ model the .ort was converted from.
    manifest = json.loads((digits_build / "mobile" / "manifest.json").read_text())
    assert manifest["opset"] >= 13 and manifest["outputs"][0]["shape"] == [1, 10]
    assert onnx.defs.onnx_opset_version() >= manifest["opset"]


def test_recipe_shapes_with_a_fixed_batch_of_four(tmp_path):
    from conftest import DIGITS, write_recipe

    text = (DIGITS / "recipe.yaml").read_text().replace("targets: [cpu, mobile, gpu]", "targets: {mobile: {shapes: {image: [4, 1, 8, 8]}}}")
    assert main(["build", str(write_recipe(tmp_path, text)), "-o", str(tmp_path / "out"), "-q"]) == 0
    folder = tmp_path / "out" / "digits-cnn" / "mobile"
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["inputs"][0]["shape"] == [4, 1, 8, 8]
    assert manifest["passes"][-1]["stats"]["inputs"] == {"image": [4, 1, 8, 8]}
    assert manifest["accuracy"]["samples"] == 360 and manifest["accuracy"]["passed"]  # 90 chunks of 4
    assert main(["verify", str(folder)]) == 0
    assert main(["bench", str(folder), "--batch", "4"]) == 0
