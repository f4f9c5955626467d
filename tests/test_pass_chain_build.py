"""New passes in a real `edgepipe build`: the recipe override, the budget search's evaluator, the manifest."""

from __future__ import annotations

import json

from conftest import write_onnx_recipe

from edgepipe.cli import main

RECIPE = """
name: digits-pruned
model: {torch: model.py:build}
inputs: [{name: image, shape: [batch, 1, 8, 8], dtype: float32}]
outputs: [logits]
data: {calibration: data.py:calibration, eval: data.py:evaluation}
accuracy: {metric: top1, max_drop: 0.03}
targets:
  cpu:
    passes:
      - {name: cleanup}
      - {name: share.dedupe}
      - {name: prune.structured, max_drop: 0.02, search_steps: 4}
      - {name: quantize.static}
"""


def test_budgeted_structured_pruning_in_a_build(digits_onnx, tmp_path):
    recipe = write_onnx_recipe(tmp_path, digits_onnx, RECIPE)
    assert main(["build", str(recipe), "-o", str(tmp_path / "out"), "--quiet"]) == 0
    manifest = json.loads((tmp_path / "out" / "digits-pruned" / "cpu" / "manifest.json").read_text())
    prune = next(p for p in manifest["passes"] if p["name"] == "prune.structured")
    stats = prune["stats"]
    assert stats["reference_metric"] > 0.95  # top-1 of the unpruned model on the labelled test split
    assert 0 < stats["chosen_sparsity"] < 0.5 and len(stats["curve"]) == 6
    assert stats["after"]["params"] < stats["before"]["params"]
    assert manifest["accuracy"]["passed"] and manifest["accuracy"]["drop"] <= 0.03
