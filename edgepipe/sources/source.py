"""The build's source stage: a recipe's model (torch, ONNX or a Hugging Face folder) as a checked float32 ONNX."""

from __future__ import annotations

from pathlib import Path

from edgepipe.recipe import Recipe
from edgepipe.sources.export import Batch, Source, export_torch, load_onnx_source


def load_source(recipe: Recipe, workdir: Path, real: Batch | None, module: object | None = None) -> Source:
    kind = recipe.model.kind
    if kind == "torch":
        return export_torch(recipe, workdir, real, module)
    if kind == "onnx":
        return load_onnx_source(recipe, workdir)
    from edgepipe.sources.hf import export_hf  # optional extra: transformers + optimum-onnx

    return export_hf(recipe, workdir, real)
