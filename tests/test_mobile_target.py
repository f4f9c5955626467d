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
    nodes = _ort_nodes(folder / "model.ort")
    for info in report.values():
        # ORT's counts and the listed nodes agree, and every reason matches ORT's own list of unsupported ops
        assert len(info["unsupported_nodes"]) == info["nodes"] - info["supported_nodes"]
        for entry in info["unsupported_nodes"]:
            assert (entry["op"] in info["unsupported_ops"]) == entry["reason"].startswith(f"op {entry['op']} "), entry
            assert (entry["node"], entry["op"]) in nodes


def _ort_nodes(path) -> list[tuple[str, str]]:
    """(name, domain:op) of every node of a .ort file's main graph, read with ORT's flatbuffers bindings."""
    import onnxruntime.tools.ort_format_model  # noqa: F401 - puts ort_flatbuffers_py on the path
    import ort_flatbuffers_py.fbs as fbs

    graph = fbs.InferenceSession.InferenceSession.GetRootAsInferenceSession(bytearray(path.read_bytes()), 0).Model().Graph()
    nodes = [graph.Nodes(i) for i in range(graph.NodesLength())]
    return [(n.Name().decode(), f"{n.Domain().decode() or 'ai.onnx'}:{n.OpType().decode()}") for n in nodes if n is not None]


def test_usability_report_describes_the_ort_file_not_the_model_it_came_from(digits_build):
    folder = digits_build / "mobile"
    nodes = _ort_nodes(folder / "model.ort")
    report = json.loads((folder / "usability_report.json").read_text())
    for info in report.values():
        assert info["nodes"] == len(nodes)
        assert {e["op"] for e in info["unsupported_nodes"]} <= {op for _, op in nodes}
    # the Fixed-style .ort holds ORT CPU kernels (e.g. com.microsoft:QLinearConv): the report names them
    contrib = {op for _, op in nodes if op.startswith("com.microsoft:")}
    assert contrib and contrib <= set(report["nnapi"]["unsupported_ops"])


def _model(text: str) -> onnx.ModelProto:
    model = onnx.parser.parse_model(text)
    for i, node in enumerate(model.graph.node):
        node.name = node.name or f"n{i}"
    return model


def test_usability_gives_the_rank_reason_for_a_rank_6_input():
    from edgepipe.targets.usability import usability

    report = usability(_model("""<ir_version: 8, opset_import: ["" : 17]>
    g (float[1, 1, 1, 2, 3, 4] x) => (float[1, 1, 1, 2, 3, 4] y) { a = Relu(x)\n y = Sigmoid(a) }"""))
    coreml = {e["node"]: e["reason"] for e in report["coreml_mlprogram"]["unsupported_nodes"]}
    assert "rank 6" in coreml["n0"] and "rank 6" in coreml["n1"] and "dynamic" not in coreml["n0"]
    assert not any("rank" in e["reason"] for e in report["nnapi"]["unsupported_nodes"])  # NNAPI has no rank limit here


def test_usability_lists_the_nodes_inside_subgraphs():
    from edgepipe.targets.usability import usability

    model = _model("""<ir_version: 8, opset_import: ["" : 17]>
    g (bool c, float[2, 3] x) => (float[2, 3] y) {
        y = If (c) <then_branch = then_g () => (float[2, 3] t) { t = Erf(x) },
                    else_branch = else_g () => (float[2, 3] e) { e = Relu(x) }>
    }""")
    report = usability(model)
    for info in report.values():
        assert info["nodes"] == 3  # the If and one node in each branch
        assert len(info["unsupported_nodes"]) == info["nodes"] - info["supported_nodes"]
    graphs = {e["graph"] for info in report.values() for e in info["unsupported_nodes"] if "graph" in e}
    assert graphs and graphs <= {"n0/then_branch", "n0/else_branch"}


def test_usability_says_so_when_shapes_cannot_be_established():
    from edgepipe.targets.usability import usability

    # two contrib ops onnx cannot infer: no value info at all, which ORT's checker refuses with a ValueError
    model = _model("""<ir_version: 8, opset_import: ["" : 17, "com.microsoft" : 1]>
    g (float[2, 3] x) => (float[2, 3] y) { a = com.microsoft.Gelu(x)\n y = com.microsoft.FastGelu(a) }""")
    report = usability(model)
    for info in report.values():
        assert info["verdict"] == "UNKNOWN" and "shapes" in info["error"]


def test_required_operators_config_lists_exactly_the_ops_the_ort_holds(digits_build):
    text = (digits_build / "mobile" / "required_operators.config").read_text()
    assert "/tmp" not in text and "model.ort" in text  # no build-machine path: the same bytes every build
    listed = set()
    for line in text.splitlines():
        if line and not line.startswith("#"):
            domain, _opset, ops = line.split(";")
            listed |= {f"{domain}:{op}" for op in ops.split(",")}
    assert listed == {op for _, op in _ort_nodes(digits_build / "mobile" / "model.ort")}


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
