"""Bad input on the text-generation path: one line on stderr, exit 2, nothing written."""

from __future__ import annotations

from pathlib import Path

import pytest
from llm_util import recipe, tiny_lm

from edgepipe.cli import main


def _fails(path: Path, out: Path, capsys) -> str:
    assert main(["build", str(path), "-o", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("edgepipe: error:"), err
    assert not (out / "tiny-lm" / "cpu").exists()
    return err


def test_model_without_lm_head(tmp_path, capsys):
    from transformers import AutoModel

    folder = tiny_lm(tmp_path / "lm")
    AutoModel.from_pretrained(str(folder)).save_pretrained(str(tmp_path / "base"))  # LlamaModel: no head
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (tmp_path / "base" / f).write_bytes((folder / f).read_bytes())
    _fails(recipe(tmp_path, str(tmp_path / "base")), tmp_path / "out", capsys)


def test_unreadable_gguf(tmp_path, capsys):
    (tmp_path / "broken.gguf").write_bytes(b"GGUF" + bytes(range(200)))
    path = recipe(tmp_path, "x")
    path.write_text(path.read_text().replace("{hf: x, task: text-generation}", "{gguf: broken.gguf}"))
    _fails(path, tmp_path / "out", capsys)


def test_missing_tokenizer(tmp_path, capsys):
    folder = tiny_lm(tmp_path / "lm", tokenizer_files=False)
    _fails(recipe(tmp_path, str(folder)), tmp_path / "out", capsys)


@pytest.mark.parametrize("model, extra", [
    ("{gguf: m.gguf, task: feature-extraction}", ""),             # a GGUF is a causal LM
    ("{ggfu: m.gguf, task: text-generation}", ""),                # typo: did-you-mean
    ("{hf: lm, task: text-generation}", "accuracy: {metric: top5, max_drop: 0.1}\n"),  # not a generation metric
    ("{hf: lm, task: text-generation}", "targets: {mobile: {shapes: {input_ids: [1, 16]}}}\n"),  # mobile fixes batch 1 itself
    ("{hf: lm, task: text-generation}", "targets: {gpu: {passes: [{name: fp16}]}}\n"),  # the gpu forms are fixed
    ("{hf: lm, task: text-generation}", "targets: {cpu: {passes: [{name: quantize.static}]}}\n"),
    ("{hf: lm, task: text-generation}", "NO_PROMPTS"),  # greedy generation needs prompts
    ("{hf: lm, gguf: missing.gguf}", ""),                          # a GGUF file named inside the folder
])
def test_recipe_errors(tmp_path, capsys, model, extra):
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    tiny_lm(tmp_path / "lm", tokenizer_files=False)
    path = recipe(tmp_path, "lm", extra)
    text = path.read_text().replace("{hf: lm, task: text-generation}", model)
    path.write_text(text.replace(", prompts: prompts.txt", "").replace("NO_PROMPTS", "") if "NO_PROMPTS" in text else text)
    _fails(path, tmp_path / "out", capsys)


def test_gguf_inside_a_folder_is_located(tmp_path):
    from edgepipe.pipeline.decoder.source import locate
    from edgepipe.recipe import parse_recipe

    (tmp_path / "lm").mkdir()
    (tmp_path / "lm" / "m.gguf").write_bytes(b"GGUF")
    data = {"name": "x", "model": {"hf": "lm", "gguf": "m.gguf"}, "data": {"eval": "e.txt", "prompts": "p.txt"}}
    for f in ("e.txt", "p.txt"):
        (tmp_path / f).write_text("hello world\n")
    recipe = parse_recipe(data, tmp_path)
    assert recipe.model.task == "text-generation"
    assert locate(recipe) == (tmp_path / "lm", "m.gguf")
