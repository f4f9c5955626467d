"""Runtime version capping: opset/IR converted down to what the requested onnxruntime loads."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from conftest import DIGITS, write_recipe

from edgepipe.cli import main
from edgepipe.core.errors import BadInput
from edgepipe.targets.compat import ORT_LIMITS, cap, requested

RELU21 = """<ir_version: 10, opset_import: ["" : 21]>
agraph (float[N, 4] x) => (float[N, 4] y) { y = Relu(x) }"""
GELU20 = """<ir_version: 10, opset_import: ["" : 20]>
agraph (float[N, 4] x) => (float[N, 4] y) { y = Gelu(x) }"""


def test_table_matches_onnxruntime_docs():
    assert ORT_LIMITS["1.17"] == (20, 9) and ORT_LIMITS["1.14"] == (18, 8) and ORT_LIMITS["1.20"] == (21, 10)
    opsets = [ORT_LIMITS[v][0] for v in sorted(ORT_LIMITS, key=lambda v: tuple(map(int, v.split("."))))]
    assert opsets == sorted(opsets)


def test_cap_converts_down_and_still_runs(tmp_path):
    model, info = cap(ir.from_onnx_text(RELU21), requested({"onnxruntime": "1.14.1"}))
    proto = ir.to_proto(model)
    assert info["opset"] == 18 and proto.ir_version == 8 and info["opset_before"] == 21
    assert next(o.version for o in proto.opset_import if o.domain == "") == 18
    path = tmp_path / "m.onnx"
    onnx.save(proto, str(path))
    x = np.array([[-1, 2, -3, 4]], np.float32)
    y = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    assert np.array_equal(y, np.maximum(x, 0))


def test_op_newer_than_the_runtime_names_node_and_version():
    with pytest.raises(BadInput, match=r"node 'Gelu' \(Gelu, opset 20\+\) cannot run on onnxruntime 1.16"):
        cap(ir.from_onnx_text(GELU20), "1.16")


@pytest.mark.parametrize("runtime, message", [
    ({"onnxruntime": "1.5"}, "not in edgepipe's compatibility table"),
    ({"onnxruntime": "latest"}, "not MAJOR.MINOR"),
    ({"tensorrt": "10"}, "unknown runtime"),
])
def test_bad_runtime_requests(runtime, message):
    with pytest.raises(BadInput, match=message):
        requested(runtime)


def test_cli_exit_2_and_nothing_written_for_an_op_the_runtime_lacks(tmp_path, capsys):
    onnx.save(ir.to_proto(ir.from_onnx_text(GELU20)), str(tmp_path / "gelu.onnx"))
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        "name: gelu\nmodel: {onnx: gelu.onnx}\ninputs: [{name: x, shape: [batch, 4]}]\n"
        "accuracy: {metric: cosine, max_drop: 0.01}\n"
        'targets: {cpu: {runtime: {onnxruntime: "1.16"}, passes: [{name: cleanup}]}}\n'
    )
    assert main(["build", str(recipe), "-o", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "Gelu" in err and "onnxruntime 1.16" in err and "Traceback" not in err
    assert not (tmp_path / "out" / "gelu" / "cpu").exists()


def test_digits_cpu_built_for_onnxruntime_1_17(tmp_path):
    text = (DIGITS / "recipe.yaml").read_text().replace("targets: [cpu, mobile, gpu]", 'targets: {cpu: {runtime: {onnxruntime: "1.17"}}}')
    assert main(["build", str(write_recipe(tmp_path, text)), "-o", str(tmp_path / "out"), "-q"]) == 0
    folder = tmp_path / "out" / "digits-cnn" / "cpu"
    manifest = json.loads((folder / "manifest.json").read_text())
    req = manifest["runtime"]["requested"]
    assert req["onnxruntime"] == "1.17" and req["max_opset"] == 20 and req["max_ir_version"] == 9
    model = onnx.load(str(folder / "model.onnx"))
    assert model.ir_version <= 9 and all(o.version <= 20 for o in model.opset_import if o.domain == "")
    assert manifest["accuracy"]["passed"] and main(["verify", str(folder)]) == 0
