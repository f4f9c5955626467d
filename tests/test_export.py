"""Export: torch sources checked against PyTorch at several sizes; onnx sources checked."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from conftest import DIGITS, write_recipe

from edgepipe.cli import main
from edgepipe.core.errors import BadInput, CheckFailed, one_line
from edgepipe.core.runtime import Runner
from edgepipe.recipe import parse_recipe
from edgepipe.sources.export import export_torch, verify_export

SHAPE_BRANCH = '''
import torch
class M(torch.nn.Module):
    def forward(self, x):
        # Python-level branch on a shape: tracing freezes it for the export size
        return x * 2 if x.shape[0] <= 2 else x * 3
def build():
    return M()
'''


def test_frozen_control_flow_fails_the_export_check(tmp_path):
    (tmp_path / "m.py").write_text(SHAPE_BRANCH)
    recipe = parse_recipe(
        {
            "name": "branchy",
            "model": {"torch": "m.py:build", "exporter": "torchscript"},
            "inputs": [{"name": "x", "shape": ["batch", 4]}],
            "accuracy": {"metric": "max_abs", "max_drop": 1e-4},
        },
        tmp_path,
    )
    # Caught twice over: the tracer's warning, and ONNX vs PyTorch at batch 5.
    with pytest.raises(CheckFailed, match=r"export check failed: .*(m.py:6|at sizes \{'batch': 5\})"):
        export_torch(recipe, tmp_path, None)


VALUE_BRANCH = '''
import torch
class M(torch.nn.Module):
    def forward(self, x):
        if x.sum() > 0:  # a tensor value decides the branch
            return x * 2
        return -x
def build():
    return M()
'''


def test_tracer_warning_about_python_booleans_fails_and_says_where(tmp_path):
    (tmp_path / "m.py").write_text(VALUE_BRANCH)
    recipe = parse_recipe(
        {"name": "valuey", "model": {"torch": "m.py:build", "exporter": "torchscript"}, "inputs": [{"name": "x", "shape": ["batch", 4]}]},
        tmp_path,
    )
    with pytest.raises(CheckFailed, match=r"froze data-dependent control flow at m.py:5"):
        export_torch(recipe, tmp_path, None)


def test_dynamic_dims_stay_dynamic(tmp_path):
    recipe = parse_recipe(
        {
            "name": "digits",
            "model": {"torch": str(DIGITS / "model.py") + ":build"},
            "inputs": [{"name": "image", "shape": ["n", 1, 8, 8]}],
            "outputs": ["logits"],
        },
        tmp_path,
    )
    source = export_torch(recipe, tmp_path, None)
    assert source.inputs == {"image": ("float32", ["n", 1, 8, 8])}
    assert source.outputs == ["logits"]
    assert {c["sizes"]["n"] for c in source.export_check} == {1, 2, 5}
    assert all(c["passed"] and c["max_abs"] < 1e-4 for c in source.export_check)


def test_onnx_source_builds_and_mismatched_names_are_exit_2(digits_build, tmp_path, capsys):
    src = tmp_path / "digits.onnx"
    src.write_bytes((digits_build / "cpu" / "model.onnx").read_bytes())
    good = """name: from-onnx
model: {onnx: digits.onnx}
data: {eval: data.py:evaluation}
accuracy: {metric: top1, max_drop: 0.01}
targets: [cpu]
"""
    recipe = write_recipe(tmp_path, good)
    assert main(["build", str(recipe), "-o", str(tmp_path / "out"), "-q"]) == 0
    assert (tmp_path / "out" / "from-onnx" / "cpu" / "model.onnx").is_file()
    bad_text = good.replace("data: {eval: data.py:evaluation}\n", "inputs: [{name: img, shape: [1, 1, 8, 8]}]\n")
    bad = write_recipe(tmp_path, bad_text)
    assert main(["build", str(bad), "-o", str(tmp_path / "out2")]) == 2
    assert "do not match" in capsys.readouterr().err


def test_truncated_onnx_is_exit_2(digits_build, tmp_path, capsys):
    src = tmp_path / "broken.onnx"
    src.write_bytes((digits_build / "cpu" / "model.onnx").read_bytes()[:500])
    recipe = write_recipe(tmp_path, "name: broken\nmodel: {onnx: broken.onnx}\n")
    assert main(["build", str(recipe), "-o", str(tmp_path / "out")]) == 2
    assert "not a valid ONNX model" in capsys.readouterr().err
    assert torch is not None


POOLED = '''
import torch
from torch import nn
def build():
    torch.manual_seed(0)
    # a keyword-spotting shape: Conv1d + MaxPool1d over a time axis of any length (2 at least: the pool halves it)
    return nn.Sequential(nn.Conv1d(2, 4, 3, padding=1), nn.ReLU(), nn.MaxPool1d(2), nn.AdaptiveAvgPool1d(1), nn.Flatten())
'''


def _pooled_recipe(tmp_path, model: dict):
    (tmp_path / "m.py").write_text(POOLED)
    return parse_recipe({"name": "kws", "model": {"torch": "m.py:build", **model},
                         "inputs": [{"name": "x", "shape": ["batch", 2, "time"]}]}, tmp_path)


def test_a_dynamic_time_axis_through_max_pool1d_stays_dynamic(tmp_path):
    # torch.export fixes a MaxPool1d input's length to the example's (the default dynamo exporter fails);
    # and the pooled model cannot run at length 1, the export check's usual small size
    real = {"x": np.random.default_rng(0).standard_normal((4, 2, 6)).astype(np.float32)}
    source = export_torch(_pooled_recipe(tmp_path, {}), tmp_path, real)
    assert source.inputs == {"x": ("float32", ["batch", 2, "time"])}
    times = {c["sizes"]["time"] for c in source.export_check}
    assert 6 in times and min(times) < 6 < max(times)  # checked below and above the export size
    assert all(c["passed"] for c in source.export_check)
    runner = Runner(source.onnx_path)  # and the ONNX model runs at a length it was not checked at
    x = np.random.default_rng(1).standard_normal((3, 2, 21)).astype(np.float32)
    assert np.allclose(runner.run({"x": x})[source.outputs[0]], source.reference({"x": x})[source.outputs[0]], atol=1e-4)


def test_the_dynamo_exporter_asked_for_by_name_says_which_dim_it_fixed(tmp_path):
    real = {"x": np.random.default_rng(0).standard_normal((4, 2, 6)).astype(np.float32)}
    with pytest.raises(BadInput) as err:
        export_torch(_pooled_recipe(tmp_path, {"exporter": "dynamo"}), tmp_path, real)
    assert "\x1b" not in str(err.value) and "\n" not in str(err.value)  # one plain line, no terminal colour codes
    assert "time" in str(err.value)


def test_error_lines_drop_terminal_colour_codes():
    # torch.export colours parts of its messages; a one-line error is read in CI logs and JSON
    assert one_line("Failed to export. \x1b[96mThis is step 1/3\x1b[0m of\nexporting") == "Failed to export. This is step 1/3 of exporting"


def test_an_onnx_model_that_fails_where_the_source_runs_is_a_failed_check(tmp_path):
    # the graph fixed 'batch' to 2 (as an exporter that specialised it would); the source runs at any batch
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "fixed", [x], [y])
    path = tmp_path / "fixed.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    with pytest.raises(CheckFailed, match="does not run at sizes"):
        verify_export(path, lambda feed: {"y": np.maximum(feed["x"], 0)}, {"x": ("float32", ["batch", 3])}, None, {"batch": 2})


def _matmul_onnx(path, weight: np.ndarray, bias: np.ndarray | None = None) -> None:
    from onnx import TensorProto, helper, numpy_helper

    k, n = weight.shape
    nodes = [helper.make_node("MatMul", ["x", "w"], ["y" if bias is None else "xw"])]
    inits = [numpy_helper.from_array(weight, "w")]
    if bias is not None:
        nodes.append(helper.make_node("Add", ["xw", "b"], ["y"]))
        inits.append(numpy_helper.from_array(bias, "b"))
    graph = helper.make_graph(nodes, "mm", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", n])], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)


def test_float32_rounding_in_a_large_output_passes_the_export_check_and_a_real_difference_fails(tmp_path):
    # fcn_resnet50's case: a right export whose large output has elements that cancel to ~0, where float32 rounding
    # (the ONNX model) against the exact product (the source) breaks a 1e-4 atol and the rtol there.
    rng = np.random.default_rng(0)
    weight = (rng.standard_normal((1024, 256)) * 30).astype(np.float32)
    source = lambda feed: {"y": feed["x"].astype(np.float64) @ weight.astype(np.float64)}  # noqa: E731
    specs, sizes = {"x": ("float32", ["batch", 1024])}, {"batch": 4}
    _matmul_onnx(tmp_path / "right.onnx", weight)
    results = verify_export(tmp_path / "right.onnx", source, specs, None, sizes)
    assert results and all(r["passed"] for r in results)
    assert max(r["max_abs"] for r in results) > 1e-4  # the rounding this is about is there
    # 1 % of the output's scale on one column: not rounding, a wrong graph
    bias = np.zeros(256, np.float32)
    bias[7] = 0.01 * float(np.abs(source({"x": rng.standard_normal((4, 1024)).astype(np.float32)})["y"]).max())
    _matmul_onnx(tmp_path / "wrong.onnx", weight, bias)
    with pytest.raises(CheckFailed, match="differs from the source model"):
        verify_export(tmp_path / "wrong.onnx", source, specs, None, sizes)
