"""edgepipe build --dry-run: every cheap check of a build, before any expensive step."""

from __future__ import annotations

from pathlib import Path

import onnxruntime as ort

from edgepipe import data as data_mod
from edgepipe.build import _check_data_names, check_writable, select_targets
from edgepipe.errors import BadInput
from edgepipe.loader import load_callable
from edgepipe.passes import validate_spec
from edgepipe.recipe import Recipe
from edgepipe.targets import TARGETS, TargetContext


def dry_run(recipe: Recipe, out: Path, only: list[str] | None, force: bool) -> list[str]:
    """Raise BadInput on the first problem; return what was checked, one line each."""
    lines = [f"recipe {recipe.name}: valid ({recipe.model.kind} source)"]
    targets = select_targets(recipe, only)
    root = out / recipe.name
    for t in targets:
        if (root / t).exists() and not force:
            raise BadInput(f"{root / t} already exists; pass --force to replace it or choose another -o folder")
    check_writable(out)
    lines.append(f"output {root}: writable")
    if recipe.model.kind == "torch":
        load_callable(recipe.model.torch or "", recipe.base_dir)
        lines.append(f"model factory {recipe.model.torch}: importable")
    elif recipe.model.kind == "onnx":
        from edgepipe.export import load_onnx_source

        load_onnx_source(recipe, root)
        lines.append(f"model {recipe.model.onnx}: valid ONNX, loads in onnxruntime {ort.__version__}")
    calibration = data_mod.calibration_source(recipe.data.calibration, recipe.base_dir) if recipe.data.calibration else None
    first_cal = next(iter(calibration()), None) if calibration else None
    if calibration is not None and first_cal is None:
        raise BadInput(f"data.calibration '{recipe.data.calibration}' yielded no batches")
    first_eval = None
    if recipe.data.eval:
        gen = data_mod.eval_batches(recipe.data.eval, recipe.base_dir)
        first_eval = gen[0][0]
        lines.append(f"eval data: {len(gen)} batches")
    for name, batch in (("calibration", first_cal), ("eval", first_eval)):
        if batch is None:
            continue
        _check_data_names(recipe, batch)
        if recipe.inputs:
            specs = {i.name: (i.dtype, list(i.shape)) for i in recipe.inputs}
            data_mod.check_batch(batch, specs, f"data.{name}")
        lines.append(f"{name} data: inputs {sorted(batch)} match the model")
    for t in targets:
        target = TARGETS[t]()
        ctx = TargetContext(recipe, recipe.targets[t], calibration is not None)
        chain = target.passes(ctx)
        for spec in chain:
            try:
                validate_spec(spec)
            except ValueError as exc:
                raise BadInput(f"target {t}: {exc}") from None
        lines.append(f"target {t}: passes {' → '.join(s['name'] for s in chain) or '(none)'}; runtime onnxruntime {ort.__version__}")
    return lines

