"""A text transformer encoder's default cpu / mobile chain: dynamic int8 (mobile: and no SkipLayerNormalization); a
CNN's is unchanged; the speed check still times the float model treated the same way."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from test_text_targets import _random_text_model

from edgepipe.passes import PassContext
from edgepipe.passes.base import load
from edgepipe.pipeline.build import run_passes
from edgepipe.recipe import TargetSpec, load_recipe
from edgepipe.sources.hf import export_hf
from edgepipe.sources.hf import text_encoder as tokenize
from edgepipe.targets import TARGETS
from edgepipe.targets.base import TargetContext
from edgepipe.targets.encoder import text_encoder
from edgepipe.targets.speed import run_chain

INT8 = {"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "MatMulInteger", "QLinearMatMul", "DynamicQuantizeMatMul",
        "MatMulIntegerToFloat"}
STATIC = {"QuantizeLinear", "QLinearMatMul"}  # activations quantized ahead of time (dynamic int8 dequantizes only weights)


def _exported(folder, kind: str, exporter: str = "torchscript") -> tuple[ir.Model, dict[str, np.ndarray]]:
    """A random 2-layer text model exported the way a build exports it, and a tokenized sentence."""
    _random_text_model(folder, kind)
    option = "" if exporter == "torchscript" else f", exporter: {exporter}"
    (folder / "recipe.yaml").write_text(f"name: tiny\nmodel: {{hf: model, task: feature-extraction{option}}}\ntargets: [cpu]\n")
    source = export_hf(load_recipe(folder / "recipe.yaml"), folder, None)
    sample = tokenize(folder / "model")(["A short sentence for the timer."])
    return load(source.onnx_path), dict(sample)


@pytest.fixture(scope="module")
def bert(tmp_path_factory) -> tuple[ir.Model, dict[str, np.ndarray]]:
    return _exported(tmp_path_factory.mktemp("bert"), "bert")


def _ctx(source: ir.Model | None, calibration: bool = True) -> TargetContext:
    return TargetContext(None, TargetSpec(), calibration, {"input_ids": [1, 16], "attention_mask": [1, 16]}, source)


def _ops(model: ir.Model) -> set[str]:
    return {n.op_type for n in model.graph}


def _quantize_steps(chain: list[dict]) -> list[str]:
    return [s["name"] for s in chain if s["name"].startswith("quantize.")]


def test_a_text_encoder_is_recognised_and_a_cnn_is_not(bert, digits_onnx, tmp_path):
    assert text_encoder(bert[0]) and text_encoder(_exported(tmp_path, "bert", "dynamo")[0])  # either exporter's graph
    assert not text_encoder(load(digits_onnx)) and not text_encoder(None)


def test_deberta_attention_is_recognised(tmp_path):
    """DeBERTa-v2 reshapes the probabilities before ·V."""
    assert text_encoder(_exported(tmp_path, "deberta_v2")[0])


@pytest.mark.parametrize("name", ["cpu", "mobile"])
def test_encoder_default_is_dynamic_int8_unfused_and_cnn_default_unchanged(name, bert, digits_onnx):
    target = TARGETS[name]()
    cnn = target.default_passes(_ctx(load(digits_onnx)))
    assert cnn == target.default_passes(_ctx(None))  # the graph changes nothing for a CNN: static QDQ with calibration
    assert _quantize_steps(cnn) == ["quantize.static"] and "unfuse.skiplayernorm" not in [s["name"] for s in cnn]
    for calibration in (True, False):  # dynamic int8 needs no calibration data: mobile quantizes a text encoder either way
        chain = target.default_passes(_ctx(bert[0], calibration))
        assert _quantize_steps(chain) == ["quantize.dynamic"]
        assert (chain[-1]["name"] == "unfuse.skiplayernorm") == (name == "mobile")


@pytest.mark.parametrize("name", ["cpu", "mobile"])
def test_speed_check_times_the_float_model_with_the_same_passes(name, bert, tmp_path):
    """The timer's float model went through the chain's passes other than the quantize step (mobile: shapes fixed,
    unfused); when int8 is slower that float model ships, and its outputs are the source's."""
    model, sample = bert
    target = TARGETS[name]()
    tctx = _ctx(model)
    chain = target.passes(tctx)
    timed: list[list] = []

    def timer(paths, _target, _sample):
        timed.append([_loaded(p) for p in paths])
        return [1.0, 2.0]  # int8 twice the float's time: the float model ships

    pctx = PassContext(workdir=tmp_path / "work", calibration=None)
    out, log = run_chain(target, tctx, chain, pctx, model, sample, run_passes, timer)
    float_timed, int8_timed = timed[0]
    assert not INT8 & float_timed and INT8 & int8_timed and not STATIC & int8_timed  # dynamic int8: no static QDQ
    unfused = name == "mobile"  # the residual Add before each LayerNormalization is a Sum in both timed models
    assert ("Sum" in float_timed, "Sum" in int8_timed, "Sum" in _ops(out)) == (unfused,) * 3
    assert not {"SkipLayerNormalization"} & (float_timed | int8_timed) or not unfused
    assert not INT8 & _ops(out) and "speed.check" in {p["name"] for p in log}
    from passes_util import run

    feed = {k: v for k, v in sample.items()}
    if name == "mobile":  # fixed to 16 tokens: zero-padded, as the runtime pads
        feed = {k: np.pad(v, ((0, 0), (0, 16 - v.shape[1]))) for k, v in feed.items()}
    np.testing.assert_allclose(run(out, feed)[0], run(model, feed)[0], rtol=1e-4, atol=1e-4)


def _loaded(path) -> set[str]:
    """Op types of an emitted model as ORT will run it (the .ort's own graph on mobile)."""
    if path.suffix == ".ort":
        from edgepipe.targets.ortgraph import load_ort

        return {n.op_type for n in load_ort(path).graph.node}
    return _ops(load(path))


def test_dry_run_lists_the_chain_the_build_runs(bert, digits_onnx, tmp_path, capsys):
    """An ONNX source's graph is at hand before any export: the dry run names the int8 step the build will run
    (a text encoder without calibration data: dynamic int8 on mobile, where another model stays float)."""
    from conftest import write_onnx_recipe

    from edgepipe.cli import main

    text = tmp_path / "text"
    text.mkdir()
    ir.save(bert[0], text / "bert.onnx")
    (text / "recipe.yaml").write_text("name: tiny\nmodel: {onnx: bert.onnx}\ntargets: [cpu, mobile]\n")
    (tmp_path / "cnn").mkdir()
    cnn = write_onnx_recipe(tmp_path / "cnn", digits_onnx)
    planned = {}
    for name, recipe in (("text", text / "recipe.yaml"), ("cnn", cnn)):
        assert main(["build", str(recipe), "-o", str(tmp_path / "out"), "--dry-run", "--target", "mobile"]) == 0
        line = next(x for x in capsys.readouterr().out.splitlines() if "target mobile:" in x)
        planned[name] = {s for s in ("quantize.dynamic", "quantize.static") if s in line}
    assert planned == {"text": {"quantize.dynamic"}, "cnn": {"quantize.static"}}
