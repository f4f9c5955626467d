"""edgepipe build --dry-run: every cheap check of a build, before any expensive step."""

from __future__ import annotations

from pathlib import Path

import onnxruntime as ort

from edgepipe.core.errors import BadInput
from edgepipe.core.loader import load_callable
from edgepipe.passes import validate_spec
from edgepipe.passes.base import load
from edgepipe.pipeline.build import preflight
from edgepipe.recipe import Recipe
from edgepipe.targets import TARGETS, TargetContext


def dry_run(recipe: Recipe, out: Path, only: list[str] | None, force: bool) -> list[str]:
    """Raise BadInput on the first problem; return what was checked, one line each."""
    lines = [f"recipe {recipe.name}: valid ({recipe.model.kind} source)"]
    if recipe.model.task == "text-generation":  # decoder LLMs: their own cheap checks
        from edgepipe.pipeline.decoder.build import preflight as decoder_preflight

        return lines + decoder_preflight(recipe, out, only, force)
    pre = preflight(recipe, out, only, force)  # the same checks a build makes before its export
    lines.append(f"output {out / recipe.name}: writable")
    if pre.eval_data:
        lines.append(f"eval data: {len(pre.eval_data)} batches")
    for name, batch in (("calibration", pre.first_cal), ("eval", pre.eval_data[0][0] if pre.eval_data else None)):
        if batch is not None:
            lines.append(f"{name} data: inputs {sorted(batch)} match the model")
    if recipe.model.kind == "torch":
        load_callable(recipe.model.torch or "", recipe.base_dir)
        lines.append(f"model factory {recipe.model.torch}: importable")
    source = None  # the graph a default chain reads (targets/encoder.py); an ONNX source has it before any export
    if recipe.model.kind == "onnx":
        from edgepipe.sources.export import load_onnx_source

        source = load(load_onnx_source(recipe, out / recipe.name).onnx_path)
        lines.append(f"model {recipe.model.onnx}: valid ONNX, loads in onnxruntime {ort.__version__}")
    for t in pre.targets:
        target = TARGETS[t]()
        spec_t = recipe.targets[t]
        ctx = TargetContext(recipe, spec_t, pre.calibration is not None, source=source if spec_t.passes is None and target.reads_source else None)
        chain = target.passes(ctx)
        for spec in chain:
            try:
                validate_spec(spec)
            except ValueError as exc:
                raise BadInput(f"target {t}: {exc}") from None
        # a torch or hf source is exported by the build: its graph (a text or vision transformer encoder) decides then
        graph_decides = source is None and spec_t.passes is None and target.reads_source and recipe.model.kind in ("hf", "torch")
        note = " (a transformer encoder's int8 step is quantize.dynamic: decided on the exported graph)" if graph_decides else ""
        lines.append(f"target {t}: passes {' → '.join(s['name'] for s in chain) or '(none)'}{note}; runtime onnxruntime {ort.__version__}")
    return lines
