"""Bad input: one clear line on stderr, exit 2, no traceback, nothing written."""

from __future__ import annotations

import pytest
from conftest import DIGITS, write_recipe

from edgepipe.cli import main

GOOD = (DIGITS / "recipe.yaml").read_text().replace("targets: [cpu, mobile, gpu]", "targets: [cpu]")

CASES = {
    "unknown key with suggestion": (GOOD.replace("max_drop:", "max_dorp:"), "did you mean 'max_drop'"),
    "unknown top-level key": (GOOD + "tragets: [cpu]\n", "did you mean 'targets'"),
    "wrong type": (GOOD.replace("max_drop: 0.01", "max_drop: lots"), "accuracy.max_drop"),
    "missing model file": (GOOD.replace("model.py:build", "nope.py:build"), "nope.py"),
    "missing data file": (GOOD.replace("data.py:evaluation", "gone.py:evaluation"), "gone.py"),
    "unknown target": (GOOD.replace("targets: [cpu]", "targets: [tpu]"), "unknown target 'tpu'"),
    "unknown pass": (GOOD.replace("targets: [cpu]", "targets: {cpu: {passes: [{name: prune.magic}]}}"), "valid passes"),
    "unknown pass option": (GOOD.replace("targets: [cpu]", "targets: {cpu: {passes: [{name: quantize.static, calibraton: entropy}]}}"), "unknown option 'calibraton'"),
    "bad metric": (GOOD.replace("metric: top1", "metric: top7"), "unknown metric 'top7'"),
    "mse calibration with int8 activations": (GOOD.replace("targets: [cpu]", "targets: {cpu: {passes: [{name: quantize.static, calibration: mse, activation_type: int8}]}}"), "activation_type: uint8"),
    "input name mismatch": (GOOD.replace("name: image", "name: pixels"), "make the names match"),
    "no model source": (GOOD.replace("  torch: model.py:build\n", "  task: x\n"), "exactly one of torch / hf / onnx"),
    "bad dim": (GOOD.replace("[batch, 1, 8, 8]", "[batch, 0, 8, 8]"), "must be >= 1"),
    "not yaml": ("name: [unclosed\n", "not valid YAML"),
    "not a mapping": ("- just\n- a list\n", "must be a YAML mapping"),
    "bad name": (GOOD.replace("name: digits-cnn", "name: ../escape"), "recipe: name"),
    "int8_passes off gpu": (GOOD.replace("targets: [cpu]", "targets: {cpu: {int8_passes: [{name: quantize.tensorrt}]}}"),
                            "is for the gpu target's int8 model"),
    "int8_passes without quantize.tensorrt": (GOOD.replace("targets: [cpu]", "targets: {gpu: {int8_passes: [{name: cleanup}]}}"),
                                              "must end with {name: quantize.tensorrt}"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_recipe_is_one_line_exit_2(case, tmp_path, capsys):
    text, expected = CASES[case]
    recipe = write_recipe(tmp_path, text)
    out = tmp_path / "out"
    assert main(["build", str(recipe), "-o", str(out)]) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert expected in lines[0]
    assert "Traceback" not in err
    assert not (out / "digits-cnn" / "cpu").exists()


def test_missing_recipe(tmp_path, capsys):
    assert main(["build", str(tmp_path / "none.yaml")]) == 2
    assert "not found" in capsys.readouterr().err


def test_existing_artifact_needs_force(digits_build, capsys):
    before = (digits_build / "cpu" / "manifest.json").read_bytes()
    assert main(["build", str(DIGITS / "recipe.yaml"), "-o", str(digits_build.parent)]) == 2
    assert "--force" in capsys.readouterr().err
    assert (digits_build / "cpu" / "manifest.json").read_bytes() == before


def test_unknown_cli_target(tmp_path, capsys):
    assert main(["build", str(DIGITS / "recipe.yaml"), "-o", str(tmp_path), "--target", "gpu2"]) == 2
    assert "unknown target 'gpu2'" in capsys.readouterr().err


def test_usage_error_is_exit_2(capsys):
    assert main(["frobnicate"]) == 2


def test_bad_input_with_json_still_prints_the_document(tmp_path, capsys):
    # a CI step runs `build --json > build.json` and reads it: a refused run is the same schema, exit 2, no units
    import json

    recipe = write_recipe(tmp_path, CASES["unknown target"][0])
    assert main(["build", str(recipe), "-o", str(tmp_path / "out"), "--json"]) == 2
    captured = capsys.readouterr()
    doc = json.loads(captured.out)
    assert doc["schema_version"] == 1 and doc["exit_code"] == 2 and doc["passed"] is False and doc["units"] == []
    assert doc["error"] in captured.err  # the stderr line, the same words
    assert len(captured.err.strip().splitlines()) == 1
