"""edgepipe build: recipe → reference ONNX → per target: passes, emit, check, publish."""

from __future__ import annotations

import dataclasses
import os
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
from edgepipe.accuracy import AccuracyResult, Metric, budget_met, concat, measure, reference_value, resolve_metric
from edgepipe.artifact import GOLDEN, remove_stale, save_golden, staging, write_manifest
from edgepipe.bench import latency, resize_batch
from edgepipe.checks import data_warnings, speed_warning
from edgepipe.errors import BadInput, EdgepipeError, explain
from edgepipe.evaluator import Evaluator
from edgepipe.executor import current_map, evaluate_batches
from edgepipe.export import Source, describe_values, load_source
from edgepipe.passes import PassContext, create, model_stats
from edgepipe.passes.base import default_opset, load
from edgepipe.recipe import AccuracySpec, Recipe
from edgepipe.runtime import Runner, pad_tokens
from edgepipe.targets import TARGETS, Emitted, Target, TargetContext, compat
from edgepipe.targets.speed import run_chain

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
    warnings: list[str] = dataclasses.field(default_factory=list)  # weak data: in every manifest and the report


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


@dataclasses.dataclass
class Preflight:
    """What the cheap checks before an export found: the targets to build and the data, loaded once."""

    targets: list[str]
    calibration: Callable | None
    eval_data: list | None
    first_cal: dict[str, np.ndarray] | None

    @property
    def first(self) -> dict[str, np.ndarray] | None:
        return self.eval_data[0][0] if self.eval_data else self.first_cal


def preflight(recipe: Recipe, out: Path, only: list[str] | None, force: bool) -> Preflight:
    """Every check that needs no export: targets, existing artifacts, data names/dtypes/shapes, output folder."""
    targets = select_targets(recipe, only)
    root = out / recipe.name
    for t in targets:
        if (root / t).exists() and not force:
            raise BadInput(f"{root / t} already exists; pass --force to replace it or choose another -o folder")
    calibration, eval_data = _data_sources(recipe)
    first_cal = next(iter(calibration()), None) if calibration else None
    if calibration is not None and first_cal is None:
        raise BadInput(f"data.calibration '{recipe.data.calibration}' yielded no batches; give it at least one batch")
    pre = Preflight(targets, calibration, eval_data, first_cal)
    _check_data_names(recipe, pre.first)
    if recipe.inputs:  # before the (slow) export: the data must fit the declared inputs
        specs = {i.name: (i.dtype, list(i.shape)) for i in recipe.inputs}
        for where, batch in (("data.eval", eval_data[0][0] if eval_data else None), ("data.calibration", first_cal)):
            if batch is not None:
                data_mod.check_batch(batch, specs, where)
    check_writable(out)
    return pre


def build(recipe: Recipe, out: Path, only: list[str] | None = None, force: bool = False, log: Log = print) -> list[TargetResult]:
    """Run the whole pipeline; returns one result per target (failed checks included)."""
    pre = preflight(recipe, out, only, force)
    targets, calibration, eval_data, first = pre.targets, pre.calibration, pre.eval_data, pre.first
    root = out / recipe.name
    root.mkdir(parents=True, exist_ok=True)
    remove_stale(root)
    work = Path(tempfile.mkdtemp(prefix=f".work-{os.getpid()}-", dir=root))
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
        evaluation.warnings = data_warnings(evaluation.origin, calibration, quantized=True)
        for batch, _ in evaluation.batches[:1]:
            data_mod.check_batch(batch, source.inputs, "data")
        results = []
        for name in targets:
            log(f"target  {name}")
            results.append(_build_target(recipe, TARGETS[name](), source, evaluation, calibration, root / name, force, work, log))
        return results
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _data_sources(recipe: Recipe):
    """(calibration source, eval batches); text files are tokenized with an hf model's own tokenizer."""
    encoder = None
    if recipe.model.kind == "hf":
        from edgepipe.hf import hf_folder, text_encoder

        encoder = text_encoder(hf_folder(recipe), recipe.data.max_length)
    d, base = recipe.data, recipe.base_dir
    only_input = recipe.inputs[0].name if recipe.inputs and len(recipe.inputs) == 1 else None
    images = (d.images, only_input)
    calibration = data_mod.calibration_source(d.calibration, base, encoder, images) if d.calibration else None
    return calibration, (data_mod.eval_batches(d.eval, base, encoder, images) if d.eval else None)


def check_writable(out: Path) -> None:
    """The output folder (or its nearest existing parent) must be a writable folder."""
    probe = out
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir() or not os.access(probe, os.W_OK | os.X_OK):
        raise BadInput(f"output folder {out} is not writable ({probe} is not a writable folder); choose another -o folder")


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
    """Artifact outputs over all batches (in chunks of the fixed batch size where there is one)."""
    return concat([runner.run_samples(batch) for batch, _ in batches])


def _run_passes(chain: list[dict[str, Any]], pctx: PassContext, model: ir.Model, log: Log) -> tuple[ir.Model, list[dict]]:
    pass_log = []
    for entry in chain:
        p = create(entry, pctx)
        before = model_stats(model)
        start = time.perf_counter()
        try:
            result = p(model)
        except EdgepipeError:
            raise
        except Exception as exc:
            why = explain(exc) or f"{type(exc).__name__}: {exc}"
            raise BadInput(f"pass {p.name} failed on this model: {why}") from exc
        model = result.model
        stats = {"before": before, "after": model_stats(model), **getattr(result, "stats", {})}
        pass_log.append({"name": p.name, "params": p.config.model_dump(), "modified": result.modified, "stats": stats})
        log(f"  pass  {p.name:<18} nodes {before['nodes']}→{stats['after']['nodes']}  bytes {before['bytes']}→{stats['after']['bytes']}  ({time.perf_counter() - start:.1f}s)")
        if stats.get("summary"):
            log(f"        {stats['summary']}")
    return model, pass_log


@dataclasses.dataclass
class _Built:
    """A variant's model after its passes (and the runtime cap), ready to emit."""

    key: str
    model: ir.Model
    pass_log: list[dict]
    runtime_cap: dict | None


def _build_target(
    recipe: Recipe, target: Target, source: Source, ev: Evaluation, calibration, final: Path, force: bool, work: Path, log: Log
) -> TargetResult:
    spec = recipe.targets[target.name]
    tctx = TargetContext(recipe, spec, calibration is not None)
    spec_acc = target.accuracy(tctx)
    metric = resolve_metric(spec_acc.metric, recipe.base_dir)
    version = compat.requested(spec.runtime)
    built = []
    for variant in target.variants(tctx):
        if variant.key != "main":
            log(f"  model {variant.key}")
        pctx = PassContext(workdir=work / target.name / variant.key, calibration=calibration, target=target.name, map=current_map())
        pctx.evaluate, pctx.accept = _evaluator(target, spec_acc, metric, ev, work / target.name / variant.key / "candidates")
        model, pass_log = run_chain(target, tctx, variant.passes, pctx, load(source.onnx_path), ev.batches[0][0], _run_passes, log)
        cap = None
        if version is not None:  # before anything is emitted: a model the runtime can't run is exit 2
            model, cap = compat.cap(model, version)
        built.append(_Built(variant.key, model, pass_log, cap))
    try:
        with staging(final, force) as tmp:
            manifest = _check_and_write(recipe, target, tctx, source, ev, built, spec_acc, metric, tmp, log)
    except _Failed as failed:
        return TargetResult(target.name, False, None, failed.manifest, "accuracy budget exceeded")
    return TargetResult(target.name, True, final, manifest)


def _evaluator(target: Target, spec: AccuracySpec, metric: Metric, ev: Evaluation, work: Path):
    """(evaluate, accept) for passes: a candidate's metric on the eval data (higher is better), and the budget."""
    evaluate = Evaluator(spec, metric, ev.batches, ev.reference, ev.labels, list(target.providers), work)
    ref = reference_value(spec, metric, ev.reference, ev.labels)

    def accept(score: float) -> bool:
        return budget_met(spec, metric, ref, evaluate.sign * score)

    return evaluate, accept


def _check_and_write(recipe, target, tctx, source, ev, built: list[_Built], spec_acc, metric, tmp: Path, log: Log) -> dict:
    """Emit each model into ``tmp``, check accuracy on the emitted file itself, write golden and manifest."""
    manifest: dict = {}
    entries = []
    for rel, path in source.extra_files.items():  # e.g. tokenizer files: hashed in the manifest like the model
        (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, tmp / rel)
    for b in built:
        emitted = target.emit(b.model, tmp, tctx, b.key)
        runner = Runner(tmp / emitted.model_file, providers=emitted.providers, session_config=emitted.session_config)
        outputs = evaluate_batches(runner, tmp / emitted.model_file, ev.batches, emitted.providers, emitted.session_config)
        acc = measure(spec_acc, metric, outputs, ev.reference, ev.labels)
        name = emitted.model_file
        log(f"  check {name}: {acc.metric} {acc.reference:.4f} → {acc.value:.4f} (drop {acc.drop:+.4f}, budget {acc.budget}) {'ok' if acc.passed else 'FAILED'}")
        golden_file = GOLDEN if b.key == "main" else f"golden.{b.key}.npz"
        quantized = any(p["name"].startswith("quantize") or p["name"] == "fp16" for p in b.pass_log)
        golden = {"file": golden_file, **_write_golden(tmp / golden_file, runner, ev, target, quantized)}
        feed1 = resize_batch(ev.batches[0][0], runner.fixed_batch() or 1)  # a fixed-shape model takes only its batch
        feed1 = {k: pad_tokens(v, runner.inputs[k].shape) if k in runner.inputs else v for k, v in feed1.items()}  # float and int8 timed on the same feed
        lat = latency(runner, feed1)
        entry = _manifest(recipe, target, source, emitted, runner, b.pass_log, acc, ev, golden, lat, tmp)
        if b.runtime_cap is not None:
            entry["runtime"]["requested"] = b.runtime_cap
        entry["warnings"] = list(ev.warnings) + [p["stats"]["warning"] for p in b.pass_log if p["stats"].get("warning")]
        if any(p["name"].startswith("quantize") for p in b.pass_log):
            # Speed check: int8 that is not faster than float on its runtime says so, with the likely cause.
            float_ms = latency(Runner(source.onnx_path, providers=emitted.providers), feed1)["p50_ms"]
            entry["latency"]["float_p50_ms"] = float_ms
            slow = speed_warning(tmp / emitted.model_file, lat["p50_ms"], float_ms)
            entry["warnings"] += [f"{name}: {slow}"] if slow else []
        entries.append((b.key, acc, entry))
    passed = all(acc.passed for _, acc, _ in entries)
    manifest = dict(entries[0][2])  # the primary model's fields stay at the top level
    manifest["status"] = "passed" if passed else "failed"
    manifest["warnings"] = list(dict.fromkeys(w for _, _, e in entries for w in e["warnings"]))
    for w in manifest["warnings"]:
        log(f"  warn  {w}")
    if len(entries) > 1:
        manifest["models"] = [_model_entry(key, entry) for key, _, entry in entries]
    manifest = write_manifest(tmp, manifest)
    if not passed:
        # Nothing half-trusted is published: the failed artifact is dropped, its manifest reported.
        raise _Failed(manifest)
    return manifest


def _model_entry(key: str, entry: dict) -> dict:
    """What verify and a reader need of each model in a folder that ships several."""
    fields = ("model_file", "runtime", "inputs", "outputs", "opset", "ir_version", "size", "passes", "accuracy", "golden", "latency")
    extras = {k: v for k, v in entry.items() if k not in fields and k not in _COMMON}
    return {"variant": key, **{k: entry[k] for k in fields}, **extras}


_COMMON = {"name", "target", "description", "status", "source", "versions"}


class _Failed(Exception):
    def __init__(self, manifest: dict) -> None:
        self.manifest = manifest


def _write_golden(path: Path, runner: Runner, ev: Evaluation, target: Target, quantized: bool) -> dict:
    inputs = {k: v[:GOLDEN_SAMPLES] for k, v in ev.batches[0][0].items()}
    expected = run_batches(runner, [(inputs, None)])
    reference = {k: v[: len(next(iter(expected.values())))] for k, v in ev.reference.items()}
    save_golden(path, inputs, expected, reference)
    share, rtol = target.golden_tolerance(quantized)
    scale = max(float(np.abs(v).max(initial=0.0)) for v in expected.values())
    return {"samples": len(next(iter(inputs.values()))), "atol": max(share * scale, 1e-6), "rtol": rtol}


def _io(path: Path) -> tuple[list[dict], list[dict], int, int]:
    if path.suffix == ".ort":
        return [], [], 0, 0
    m = onnx.load(str(path), load_external_data=False)
    desc = describe_values
    inits = {i.name for i in m.graph.initializer}
    opset = default_opset(m) or 0
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
