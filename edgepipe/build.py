"""edgepipe build: recipe → reference ONNX → per target: passes, emit, check, publish."""

from __future__ import annotations

import dataclasses
import platform
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort

import edgepipe
from edgepipe import data as data_mod
from edgepipe.accuracy import AccuracyResult, concat, measure, resolve_metric
from edgepipe.artifact import GOLDEN, save_golden, staging, write_manifest
from edgepipe.bench import latency, resize_batch
from edgepipe.errors import BadInput, EdgepipeError
from edgepipe.export import Source, load_source
from edgepipe.passes import PassContext, create, model_stats
from edgepipe.passes.base import load
from edgepipe.recipe import Recipe
from edgepipe.runtime import Runner
from edgepipe.targets import TARGETS, Emitted, Target, TargetContext

Log = Callable[[str], None]
GOLDEN_SAMPLES = 8


@dataclasses.dataclass
class TargetResult:
    target: str
    passed: bool
    folder: Path | None
    manifest: dict[str, Any]
    error: str | None = None


@dataclasses.dataclass
class Evaluation:
    """Eval inputs, labels and reference outputs, computed once per build."""

    batches: list[tuple[dict[str, np.ndarray], np.ndarray | None]]
    labels: np.ndarray | None
    reference: dict[str, np.ndarray]
    origin: str  # eval | calibration | synthetic


def select_targets(recipe: Recipe, only: list[str] | None) -> list[str]:
    names = list(recipe.targets)
    if not only:
        return names
    for name in only:
        if name not in TARGETS:
            raise BadInput(f"unknown target '{name}'; valid targets: {', '.join(TARGETS)}")
    missing = [n for n in only if n not in names]
    if missing:
        raise BadInput(f"--target {','.join(missing)} is not in the recipe's targets {names}; add it to the recipe")
    return [n for n in names if n in only]


def build(recipe: Recipe, out: Path, only: list[str] | None = None, force: bool = False, log: Log = print) -> list[TargetResult]:
    """Run the whole pipeline; returns one result per target (failed checks included)."""
    targets = select_targets(recipe, only)
    root = out / recipe.name
    for t in targets:
        if (root / t).exists() and not force:
            raise BadInput(f"{root / t} already exists; pass --force to replace it or choose another -o folder")
    calibration = data_mod.calibration_source(recipe.data.calibration, recipe.base_dir) if recipe.data.calibration else None
    eval_data = data_mod.eval_batches(recipe.data.eval, recipe.base_dir) if recipe.data.eval else None
    first = eval_data[0][0] if eval_data else (next(iter(calibration()), None) if calibration else None)
    _check_data_names(recipe, first)
    root.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".work-", dir=root))
    try:
        distilled = None
        if recipe.distill:
            from edgepipe.distill_stage import run_distill

            log(f"distill {recipe.model.kind} teacher → student")
            distilled = run_distill(recipe, calibration, eval_data, work, log)
        log(f"export  {recipe.model.kind} source → ONNX")
        source = load_source(distilled.recipe if distilled else recipe, work, first, distilled.module if distilled else None)
        if distilled:
            source.distill = distilled.record
        evaluation = _evaluation(source, eval_data, calibration)
        for batch, _ in evaluation.batches[:1]:
            data_mod.check_batch(batch, source.inputs, "data")
        results = []
        for name in targets:
            log(f"target  {name}")
            results.append(_build_target(recipe, TARGETS[name](), source, evaluation, calibration, root / name, force, work, log))
        return results
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _check_data_names(recipe: Recipe, batch: dict[str, np.ndarray] | None) -> None:
    if batch is None or not recipe.inputs:
        return
    declared = [i.name for i in recipe.inputs]
    if sorted(batch) != sorted(declared):
        raise BadInput(f"data yields inputs {sorted(batch)} but the recipe declares {declared}; make the names match")


def _evaluation(source: Source, eval_data, calibration) -> Evaluation:
    if eval_data:
        batches, origin = eval_data, "eval"
    elif calibration is not None:
        batches, origin = [(b, None) for b in calibration()], "calibration"
    else:
        from edgepipe.export import sample_batch

        sizes = {d: 1 for _, shape in source.inputs.values() for d in shape if isinstance(d, str)}
        batches, origin = [(sample_batch(source.inputs, None, sizes, seed=s), None) for s in range(16)], "synthetic"
    labels = None
    if all(y is not None for _, y in batches):
        labels = np.concatenate([y for _, y in batches])
    reference = concat([source.reference(b) for b, _ in batches])
    return Evaluation(batches, labels, reference, origin)


def run_batches(runner: Runner, batches: list) -> dict[str, np.ndarray]:
    """Artifact outputs over all batches; split to single samples where the batch dim is fixed."""
    outs = []
    fixed = any(isinstance(m.shape[0], int) for m in runner.inputs.values() if m.shape)
    for batch, _ in batches:
        if fixed:
            n = len(next(iter(batch.values())))
            outs.extend(runner.run({k: v[i : i + 1] for k, v in batch.items()}) for i in range(n))
        else:
            outs.append(runner.run(batch))
    return concat(outs)


def _build_target(
    recipe: Recipe, target: Target, source: Source, ev: Evaluation, calibration, final: Path, force: bool, work: Path, log: Log
) -> TargetResult:
    spec = recipe.targets[target.name]
    tctx = TargetContext(recipe, spec, calibration is not None)
    pctx = PassContext(workdir=work / target.name, calibration=calibration, target=target.name)
    model = load(source.onnx_path)
    pass_log = []
    for entry in target.passes(tctx):
        p = create(entry, pctx)
        before = model_stats(model)
        start = time.perf_counter()
        try:
            result = p(model)
        except EdgepipeError:
            raise
        except Exception as exc:
            raise BadInput(f"pass {p.name} failed on this model: {type(exc).__name__}: {exc}") from exc
        model = result.model
        stats = {"before": before, "after": model_stats(model), **getattr(result, "stats", {})}
        pass_log.append({"name": p.name, "params": p.config.model_dump(), "modified": result.modified, "stats": stats})
        log(f"  pass  {p.name:<18} nodes {before['nodes']}→{stats['after']['nodes']}  bytes {before['bytes']}→{stats['after']['bytes']}  ({time.perf_counter() - start:.1f}s)")
    spec_acc = target.accuracy(tctx)
    metric = resolve_metric(spec_acc.metric, recipe.base_dir)
    try:
        with staging(final, force) as tmp:
            manifest = _check_and_write(recipe, target, tctx, source, ev, model, pass_log, spec_acc, metric, tmp, log)
    except _Failed as failed:
        return TargetResult(target.name, False, None, failed.manifest, "accuracy budget exceeded")
    return TargetResult(target.name, True, final, manifest)


def _check_and_write(recipe, target, tctx, source, ev, model, pass_log, spec_acc, metric, tmp: Path, log: Log) -> dict:
    """Emit into ``tmp``, check accuracy on the emitted file itself, write golden and manifest."""
    emitted = target.emit(model, tmp, tctx)
    runner = Runner(tmp / emitted.model_file, providers=emitted.providers, session_config=emitted.session_config)
    outputs = run_batches(runner, ev.batches)
    acc = measure(spec_acc, metric, outputs, ev.reference, ev.labels)
    log(f"  check {acc.metric} {acc.reference:.4f} → {acc.value:.4f} (drop {acc.drop:+.4f}, budget {acc.budget}) {'ok' if acc.passed else 'FAILED'}")
    golden = _write_golden(tmp, runner, ev, target, bool(pass_log) and any(p["name"].startswith("quantize") for p in pass_log))
    feed1 = resize_batch(ev.batches[0][0], 1)
    manifest = _manifest(recipe, target, source, emitted, runner, pass_log, acc, ev, golden, latency(runner, feed1), tmp)
    manifest = write_manifest(tmp, manifest)
    if not acc.passed:
        # Nothing half-trusted is published: the failed artifact is dropped, its manifest reported.
        raise _Failed(manifest)
    return manifest


class _Failed(Exception):
    def __init__(self, manifest: dict) -> None:
        self.manifest = manifest


def _write_golden(folder: Path, runner: Runner, ev: Evaluation, target: Target, quantized: bool) -> dict:
    inputs = {k: v[:GOLDEN_SAMPLES] for k, v in ev.batches[0][0].items()}
    expected = run_batches(runner, [(inputs, None)])
    reference = {k: v[: len(next(iter(expected.values())))] for k, v in ev.reference.items()}
    save_golden(folder / GOLDEN, inputs, expected, reference)
    share, rtol = target.golden_tolerance(quantized)
    scale = max(float(np.abs(v).max(initial=0.0)) for v in expected.values())
    return {"samples": len(next(iter(inputs.values()))), "atol": max(share * scale, 1e-6), "rtol": rtol}


def _io(path: Path) -> tuple[list[dict], list[dict], int, int]:
    if path.suffix == ".ort":
        return [], [], 0, 0
    m = onnx.load(str(path), load_external_data=False)

    def desc(values):
        out = []
        for v in values:
            t = v.type.tensor_type
            shape = [d.dim_value if d.HasField("dim_value") else d.dim_param for d in t.shape.dim]
            out.append({"name": v.name, "dtype": onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name, "shape": shape})
        return out

    inits = {i.name for i in m.graph.initializer}
    opset = next((o.version for o in m.opset_import if o.domain in ("", "ai.onnx")), 0)
    return desc(v for v in m.graph.input if v.name not in inits), desc(m.graph.output), opset, m.ir_version


def _manifest(recipe, target, source, emitted: Emitted, runner: Runner, pass_log, acc: AccuracyResult, ev, golden, lat, folder: Path) -> dict:
    inputs, outputs, opset, ir_version = _io(folder / emitted.model_file)
    return {
        "name": recipe.name,
        "target": target.name,
        "description": target.description,
        "status": "passed" if acc.passed else "failed",
        "model_file": emitted.model_file,
        "runtime": {
            "name": "onnxruntime",
            "version": ort.__version__,
            "providers": runner.providers,
            "requested_providers": emitted.providers,
            "session_config": emitted.session_config,
        },
        "inputs": inputs or [{"name": k, "dtype": v.type, "shape": v.shape} for k, v in runner.inputs.items()],
        "outputs": outputs,
        "opset": opset,
        "ir_version": ir_version,
        "source": {"kind": source.kind, "sha256": source.sha256, "export_check": _export_summary(source)},
        "size": _sizes(folder / emitted.model_file, source.onnx_path),
        "passes": pass_log,
        "accuracy": {**acc.as_dict(), "data": ev.origin},
        "golden": golden,
        **({"distill": source.distill} if source.distill else {}),
        "latency": lat,
        "versions": _versions(),
        **emitted.extras,
    }


def _sizes(model: Path, fp32: Path) -> dict[str, float]:
    """Bytes of the deployable model (with external data) vs the float32 reference file."""
    size = sum(p.stat().st_size for p in model.parent.glob(model.name + "*"))
    ref = sum(p.stat().st_size for p in fp32.parent.glob(fp32.name + "*"))
    return {"model_bytes": size, "fp32_bytes": ref, "ratio": round(size / ref, 4) if ref else 0.0}


def _export_summary(source: Source) -> dict:
    if not source.export_check:
        return {}
    return {
        "cases": len(source.export_check),
        "passed": all(c["passed"] for c in source.export_check),
        "max_abs": max(c["max_abs"] for c in source.export_check),
        "max_rel": max(c["max_rel"] for c in source.export_check),
        "sizes": sorted({tuple(sorted(c["sizes"].items())) for c in source.export_check}),
    }


def _versions() -> dict[str, str]:
    versions = {"edgepipe": edgepipe.__version__, "onnx": onnx.__version__, "onnxruntime": ort.__version__, "onnx_ir": ir.__version__, "python": platform.python_version(), "numpy": np.__version__}
    try:
        import torch

        versions["torch"] = torch.__version__
    except ImportError:
        pass
    return versions
