"""Export: torch sources checked against PyTorch at several sizes; onnx sources checked."""

from __future__ import annotations

import pytest
import torch
from conftest import DIGITS, write_recipe

from edgepipe.cli import main
from edgepipe.core.errors import CheckFailed
from edgepipe.recipe import parse_recipe
from edgepipe.sources.export import export_torch

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
