"""A vision transformer's default cpu / mobile chain is the text encoders' dynamic int8 (float pixels in, self-attention,
one convolution: the patch embedding); a CNN, and a hybrid whose convolutions carry the compute, keep static QDQ."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest
from test_text_chain import INT8, STATIC, _ctx, _loaded, _quantize_steps

from edgepipe.cli import main
from edgepipe.passes.base import load
from edgepipe.targets import TARGETS
from edgepipe.targets.encoder import text_encoder, transformer_encoder

RECIPE = """
name: vit
model: {onnx: model.onnx}
data: {calibration: cal.npz, eval: eval.npz}
accuracy: {metric: cosine, min_value: 0.98}
targets: TARGETS
"""


def _export(folder: Path, convs: int) -> Path:
    """tests/user_factories.py's tiny ViT (``convs`` 3x3 convolutions after the patch embedding: a hybrid), exported
    with a dynamic batch, and a recipe around it with photo-like random images."""
    import torch
    from user_factories import tiny_vit

    folder.mkdir(parents=True, exist_ok=True)
    torch.onnx.export(tiny_vit(convs), (torch.zeros(1, 3, 16, 16),), str(folder / "model.onnx"), input_names=["image"],
                      output_names=["logits"], dynamic_axes={"image": {0: "batch"}}, dynamo=False)
    rng = np.random.default_rng(0)
    for name, n in (("cal.npz", 16), ("eval.npz", 16)):
        np.savez(folder / name, image=rng.standard_normal((n, 3, 16, 16)).astype(np.float32))
    return folder


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    import sys

    sys.path.insert(0, str(Path(__file__).parent))  # user_factories
    root = tmp_path_factory.mktemp("vit")
    return {"vit": _export(root / "vit", 0), "hybrid": _export(root / "hybrid", 2)}


def test_a_vision_transformer_is_recognised_and_a_cnn_or_hybrid_is_not(models, digits_onnx):
    vit, hybrid = load(models["vit"] / "model.onnx"), load(models["hybrid"] / "model.onnx")
    assert transformer_encoder(vit) and not text_encoder(vit)  # float pixels: not a text encoder, still a transformer
    assert not transformer_encoder(hybrid) and not transformer_encoder(load(digits_onnx)) and not transformer_encoder(None)


@pytest.mark.parametrize("name", ["cpu", "mobile"])
def test_vision_transformer_default_is_dynamic_int8_and_cnn_default_static(name, models, digits_onnx):
    target = TARGETS[name]()
    chain = target.default_passes(_ctx(load(models["vit"] / "model.onnx")))
    assert _quantize_steps(chain) == ["quantize.dynamic"]
    assert (chain[-1]["name"] == "unfuse.skiplayernorm") == (name == "mobile")
    for other in (load(models["hybrid"] / "model.onnx"), load(digits_onnx)):
        assert _quantize_steps(target.default_passes(_ctx(other))) == ["quantize.static"]


def test_vision_transformer_builds_with_dynamic_int8_and_verifies(models, tmp_path, capsys):
    """The whole build on the plain recipe (no passes): int8 weights with activations quantized at run time in both
    artifacts (mobile: in the .ort's own graph), within the budget, and `edgepipe verify` passes; the speed check is
    off (a 2-block model is dispatch-bound: int8 may time slower and ship float)."""
    folder = models["vit"]
    (folder / "recipe.yaml").write_text(RECIPE.replace("TARGETS", "{cpu: {speed_check: false}, mobile: {speed_check: false}}"))
    out = tmp_path / "out"
    assert main(["build", str(folder / "recipe.yaml"), "-o", str(out), "--json", "--executor", "inprocess"]) == 0, capsys.readouterr()
    capsys.readouterr()
    for target, file in (("cpu", "model.onnx"), ("mobile", "model.ort")):
        ops = _loaded(out / "vit" / target / file)
        assert "DynamicQuantizeLinear" in ops and INT8 & ops and not STATIC & ops, (target, ops)
        manifest = json.loads((out / "vit" / target / "manifest.json").read_text())
        assert manifest["accuracy"]["passed"] and manifest["accuracy"]["value"] >= 0.98
        assert main(["verify", str(out / "vit" / target)]) == 0


def test_dry_run_lists_the_chain_the_build_runs(models, tmp_path, capsys):
    """An ONNX source's graph decides before any export: dynamic int8 for the vision transformer, static for the hybrid."""
    planned = {}
    for kind in ("vit", "hybrid"):
        (models[kind] / "recipe.yaml").write_text(RECIPE.replace("TARGETS", "[cpu, mobile]"))
        assert main(["build", str(models[kind] / "recipe.yaml"), "-o", str(tmp_path / kind), "--dry-run"]) == 0
        lines = [x for x in capsys.readouterr().out.splitlines() if "target cpu:" in x or "target mobile:" in x]
        planned[kind] = {s for line in lines for s in ("quantize.dynamic", "quantize.static") if s in line}
        assert len(lines) == 2
    assert planned == {"vit": {"quantize.dynamic"}, "hybrid": {"quantize.static"}}


def test_exported_vit_has_one_convolution(models):
    """The rule's premise on the test model: the patch embedding is its only convolution, the hybrid has three."""
    convs = {k: sum(n.op_type == "Conv" for n in ir.load(str(models[k] / "model.onnx")).graph) for k in models}
    assert convs == {"vit": 1, "hybrid": 3}
