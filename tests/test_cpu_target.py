"""cpu target: dynamic int8 without calibration; a budget that is broken fails the build."""

from __future__ import annotations

import json

import onnx
from conftest import DIGITS, write_onnx_recipe

from edgepipe.cli import main
from edgepipe.targets.cpu import CpuTarget

GOOD = (DIGITS / "recipe.yaml").read_text().replace("targets: [cpu, mobile, gpu]", "targets: [cpu]")


def test_dynamic_int8_when_no_calibration(digits_onnx, tmp_path, monkeypatch):
    # Dynamic int8 of this tiny CNN is slower than float (the speed check would ship float): off here.
    monkeypatch.setattr(CpuTarget, "speed_checked", False)
    recipe = write_onnx_recipe(tmp_path, digits_onnx, GOOD.replace("  calibration: data.py:calibration\n", ""))
    assert main(["build", str(recipe), "-o", str(tmp_path / "out"), "-q", "--executor", "inprocess"]) == 0  # the monkeypatch
    folder = tmp_path / "out" / "digits-cnn" / "cpu"
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["passes"][-1]["name"] == "quantize.dynamic"
    ops = {n.op_type for n in onnx.load(str(folder / "model.onnx")).graph.node}
    assert {"DynamicQuantizeLinear", "MatMulInteger"} & ops or "ConvInteger" in ops
    assert manifest["accuracy"]["passed"]


def test_broken_budget_is_exit_1_and_writes_nothing(digits_onnx, tmp_path, capsys):
    # An impossible budget: the int8 model must beat the float one by 5 points.
    recipe = write_onnx_recipe(tmp_path, digits_onnx, GOOD.replace("max_drop: 0.01", "min_value: 1.01"))
    out = tmp_path / "out"
    assert main(["build", str(recipe), "-o", str(out)]) == 1
    assert "FAILED" in capsys.readouterr().out
    assert not (out / "digits-cnn" / "cpu").exists()
    assert (out / "digits-cnn" / "report.html").is_file()
    assert not [p for p in (out / "digits-cnn").iterdir() if p.name.startswith(".")]


def test_recipe_pass_chain_override(digits_onnx, tmp_path):
    text = GOOD.replace("targets: [cpu]", "targets:\n  cpu:\n    passes: [{name: cleanup}, {name: quantize.static, calibration: entropy}]")
    recipe = write_onnx_recipe(tmp_path, digits_onnx, text)
    assert main(["build", str(recipe), "-o", str(tmp_path / "out"), "-q"]) == 0
    manifest = json.loads((tmp_path / "out" / "digits-cnn" / "cpu" / "manifest.json").read_text())
    assert [p["name"] for p in manifest["passes"]] == ["cleanup", "quantize.static"]
    assert manifest["passes"][1]["params"]["calibration"] == "entropy"
