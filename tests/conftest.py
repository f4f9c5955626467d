"""Shared fixtures: the real digits model built once per session."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from edgepipe.cli import main

ROOT = Path(__file__).resolve().parents[1]
DIGITS = ROOT / "models" / "digits"


@pytest.fixture(scope="session")
def digits_build(tmp_path_factory) -> Path:
    """OUT folder of one real `edgepipe build` of the digits recipe (cpu, mobile and gpu targets)."""
    out = tmp_path_factory.mktemp("digits-out")
    assert main(["build", str(DIGITS / "recipe.yaml"), "-o", str(out), "--quiet"]) == 0
    return out / "digits-cnn"


@pytest.fixture
def artifact(digits_build, tmp_path) -> Path:
    """A private copy of the digits cpu artifact, safe to tamper with."""
    dst = tmp_path / "cpu"
    shutil.copytree(digits_build / "cpu", dst)
    return dst


def write_recipe(folder: Path, text: str) -> Path:
    """A recipe file in ``folder`` that can name the digits model's files."""
    for name in ("model.py", "data.py", "weights.pt"):
        target = folder / name
        if not target.exists():
            target.symlink_to(DIGITS / name)
    path = folder / "recipe.yaml"
    path.write_text(text)
    return path


@pytest.fixture(scope="session")
def digits_onnx(tmp_path_factory) -> Path:
    """The digits CNN exported by edgepipe (dynamo, checked) and cleaned: the real model pass tests use."""
    from edgepipe.passes import PASSES
    from edgepipe.passes.base import load, save
    from edgepipe.recipe import load_recipe
    from edgepipe.sources.export import export_torch

    work = tmp_path_factory.mktemp("digits-onnx")
    source = export_torch(load_recipe(DIGITS / "recipe.yaml"), work, None)
    return save(PASSES["cleanup"]()(load(source.onnx_path)).model, work / "digits.onnx")
