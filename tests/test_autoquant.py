"""quantize.auto: per-node sensitivity and the float fallback, on the real digits model."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import onnx
import pytest
from conftest import write_onnx_recipe
from onnxruntime.quantization import QuantType, quantize_dynamic

from edgepipe.cli import main
from edgepipe.core.errors import BadInput
from edgepipe.passes import PassContext, create, validate_spec
from edgepipe.passes.autoquant import keep_float, quantized_nodes
from edgepipe.pipeline.build import build
from edgepipe.recipe import load_recipe

TIGHT = """
name: digits-tight
model: {torch: model.py:build}
inputs: [{name: image, shape: [batch, 1, 8, 8], dtype: float32}]
outputs: [logits]
data: {calibration: data.py:calibration, eval: data.py:evaluation}
accuracy: {metric: cosine, min_value: %s}
targets:
  cpu:
    passes:
      - {name: cleanup}
      - {name: quantize.auto, method: static, search: %s, max_float: %s}
"""


def _auto_stats(manifest: dict) -> dict:
    return next(p for p in manifest["passes"] if p["name"] == "quantize.auto")["stats"]


def test_tight_budget_keeps_the_most_sensitive_nodes_in_float(digits_onnx, tmp_path):
    recipe = write_onnx_recipe(tmp_path, digits_onnx, TIGHT % (0.99998, "stepwise", 1.0))
    assert main(["build", str(recipe), "-o", str(tmp_path / "out"), "--quiet"]) == 0
    manifest = json.loads((tmp_path / "out" / "digits-tight" / "cpu" / "manifest.json").read_text())
    stats = _auto_stats(manifest)
    assert stats["initial_metric"] < 0.99998 and stats["steps"][0]["passed"] is False
    ranking = stats["sensitivity"]
    assert len(ranking) >= 4 and all(r["weights"] > 0 for r in ranking)
    positive = [r["gain"] / r["weights"] for r in ranking if r["gain"] > 0]
    assert positive == sorted(positive, reverse=True)  # cheapest recovery first (rank: gain_per_weight)
    kept = stats["kept_float"]
    assert 1 <= len(kept) < len(ranking) and kept == [r["node"] for r in ranking[: len(kept)]]
    # stepwise: one step per added node, each with its metric; only the last one meets the budget
    assert [s["kept_float"] for s in stats["steps"]] == list(range(len(kept) + 1))
    assert [s["passed"] for s in stats["steps"]] == [False] * len(kept) + [True]
    assert stats["final_metric"] >= 0.99998 and manifest["accuracy"]["value"] >= 0.99998
    report = (tmp_path / "out" / "digits-tight" / "report.html").read_text()
    assert "kept in float: " + kept[0] in report and "most sensitive node" in report
    assert manifest["latency"]["float_p50_ms"] > 0  # the speed check ran (int8 vs float on the same feed)
    # the kept nodes really are float in the artifact: float weights; the others read int8 weights
    model = onnx.load(str(tmp_path / "out" / "digits-tight" / "cpu" / "model.onnx"))
    float_weights = {i.name for i in model.graph.initializer if i.data_type == onnx.TensorProto.FLOAT}
    compute = [n for n in model.graph.node if n.op_type in ("Conv", "Gemm")]
    assert {n.name for n in compute if n.input[1] in float_weights} == set(kept)


def test_unreachable_budget_fails_with_the_table_of_what_was_tried(digits_onnx, tmp_path):
    recipe = load_recipe(write_onnx_recipe(tmp_path, digits_onnx, TIGHT % (1.5, "bisect", 2)))
    [result] = build(recipe, tmp_path / "out")
    assert not result.passed and result.folder is None
    stats = _auto_stats(result.manifest)
    assert stats["passed"] is False and len(stats["kept_float"]) == 2
    assert [s["kept_float"] for s in stats["steps"]] == [0, 1, 2]  # galloping 1, 2: stops at the cap
    assert "budget not met" in stats["summary"]
    assert not (tmp_path / "out" / "digits-tight" / "cpu").exists()


def test_budget_met_needs_no_search(digits_onnx, tmp_path):
    recipe = write_onnx_recipe(tmp_path, digits_onnx, TIGHT % (0.9, "bisect", 0.5))
    [result] = build(load_recipe(recipe), tmp_path / "out")
    stats = _auto_stats(result.manifest)
    assert result.passed and stats["kept_float"] == [] and len(stats["steps"]) == 1 and "sensitivity" not in stats


def test_keep_float_restores_exactly_the_named_node():
    f = onnx.parser.parse_model("""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[2, 4] x) => (float[2, 4] y) <float[4, 4] w1 = {1,0,0,0,0,1,0,0,0,0,1,0,0,0,0,1}, float[4, 4] w2 = {2,0,0,0,0,2,0,0,0,0,2,0,0,0,0,2}> {
        h = MatMul (x, w1)
        y = MatMul (h, w2)
    }""")
    for i, n in enumerate(f.graph.node):
        n.name = f"mm{i}"
    with tempfile.TemporaryDirectory() as d:
        onnx.save(f, Path(d) / "f.onnx")
        quantize_dynamic(Path(d) / "f.onnx", Path(d) / "q.onnx", weight_type=QuantType.QInt8)
        q = onnx.load(str(Path(d) / "q.onnx"))
    assert [n.name for n in quantized_nodes(f, q)] == ["mm0", "mm1"]
    mixed = keep_float(q, f, ["mm1"])
    onnx.checker.check_model(mixed)
    ops = [n.op_type for n in mixed.graph.node]
    assert ops.count("MatMulInteger") == 1 and ops.count("MatMul") == 1
    assert [n.name for n in quantized_nodes(f, mixed)] == ["mm0"]
    assert {i.name for i in mixed.graph.initializer} >= {"w2"}


def test_options_are_checked_against_the_inner_pass():
    with pytest.raises(ValueError, match="per_chanel|extra"):
        validate_spec({"name": "quantize.auto", "method": "dynamic", "options": {"per_chanel": True}})
    with pytest.raises(BadInput, match="bogus"):
        create({"name": "quantize.auto", "options": {"bogus": 1}}, PassContext(workdir=Path(".")))
