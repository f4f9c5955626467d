"""edgepipe build, as stages: plan → source → reference → per target: variants (passes), check, publish.

``build()`` never raises for a problem in a target: each target's result says passed, failed (a check) or
error (its reason and exit code), and the other targets still build. Progress goes to this module's logger.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import os
import shutil
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir

from edgepipe.core.artifact import GOLDEN, ensure_replaceable, remove_stale, save_golden, staging, write_manifest
from edgepipe.core.bench import latency, resize_batch
from edgepipe.core.errors import BadInput, EdgepipeError, PassError, classify, explain
from edgepipe.core.fanout import current_map, evaluate_batches
from edgepipe.core.manifest import Golden, Latency, Manifest, ModelEntry
from edgepipe.core.result import ERROR, FAILED, PASSED, TargetResult
from edgepipe.core.runtime import Runner, concat, pad_tokens, run_batches
from edgepipe.passes import PassContext, create, model_stats
from edgepipe.passes.base import load
from edgepipe.pipeline.checks import data_warnings, speed_note, speed_warning
from edgepipe.pipeline.evaluator import EvalSet
from edgepipe.pipeline.fallback import failure_reason as budget_failure
from edgepipe.pipeline.fallback import float_after_all, missed, run_with_fallback
from edgepipe.pipeline.manifest import model_source, target_manifest, versions
from edgepipe.pipeline.outputs import failure_reason as output_failure
from edgepipe.pipeline.outputs import measure_every_output
from edgepipe.pipeline.outputs import problems as output_problems
from edgepipe.pipeline.selection import check_writable, select_targets
from edgepipe.recipe import AccuracySpec, Recipe
from edgepipe.sources import data as data_mod
from edgepipe.sources.accuracy import AccuracyResult, Metric, budget_met, reference_value, resolve_metric
from edgepipe.sources.datashapes import longest_shapes
from edgepipe.sources.export import Source
from edgepipe.sources.source import load_source
from edgepipe.targets import TARGETS, Emitted, Target, TargetContext, compat, rounding
from edgepipe.targets.speed import run_chain

logger = logging.getLogger(__name__)
GOLDEN_SAMPLES = 8

__all__ = ["BuildContext", "EvalSet", "TargetResult", "build", "build_target", "prepare", "preflight", "run_batches", "select_targets"]


@dataclasses.dataclass(frozen=True)
class BuildContext:
    """What every target of one recipe reads, made once per recipe by ``prepare``."""

    recipe: Recipe
    root: Path  # OUT/<name>
    work: Path  # scratch, removed when the recipe is done
    force: bool
    source: Source
    evals: EvalSet
    calibration: Callable | None


OnStart = Callable[[str], None]
OnDone = Callable[[TargetResult], None]


def build(recipe: Recipe, out: Path, only: list[str] | None = None, force: bool = False,
          on_start: OnStart | None = None, on_done: OnDone | None = None) -> list[TargetResult]:
    """Build the recipe's targets (or ``only`` these); one result per target, in the recipe's order.

    A bad target name raises BadInput; anything else that goes wrong is the result of the targets it hit.
    ``on_start(target)`` / ``on_done(result)`` report progress (a child process streams them to its parent).
    """
    targets = select_targets(recipe, only)
    if recipe.model.task == "text-generation":  # decoder LLMs: their own export, passes and checks
        from edgepipe.pipeline.decoder.build import build_decoder

        return _decoder(recipe, out, targets, force, on_start, on_done, build_decoder)
    results: dict[str, TargetResult] = {}

    def done(result: TargetResult) -> None:
        results[result.target] = result
        if on_done is not None:
            on_done(result)

    start = time.perf_counter()
    try:
        with prepare(recipe, out, targets, force) as ctx:
            for name in targets:
                if on_start is not None:
                    on_start(name)
                done(build_target(ctx, name))
    except Exception as exc:  # the recipe's stages (preflight, distill, export, reference): every target left
        for name in targets:
            if name not in results:
                done(failure(recipe.name, name, exc, time.perf_counter() - start))
    return [results[t] for t in targets]


def _decoder(recipe: Recipe, out: Path, targets: list[str], force: bool, on_start: OnStart | None, on_done: OnDone | None,
             build_decoder: Callable[..., list[TargetResult]]) -> list[TargetResult]:
    """A text-generation recipe's targets; a failure of its shared stages (load, export, reference) is every target's."""
    start = time.perf_counter()
    if on_start is not None:
        on_start(targets[0])
    try:
        built = build_decoder(recipe, out, targets, force)
        results = [dataclasses.replace(r, seconds=round(time.perf_counter() - start, 2)) for r in built]
    except Exception as exc:
        results = [failure(recipe.name, name, exc, time.perf_counter() - start) for name in targets]
    for r in results:
        if on_done is not None:
            on_done(r)
    return results


def failure(name: str, target: str, exc: BaseException, seconds: float = 0.0) -> TargetResult:
    """The result of a target whose build raised: its reason and exit code (a bug keeps its traceback for --debug)."""
    code, why = classify(exc)
    tb = traceback.format_exc() if code == 3 else None
    if code == 3 and not isinstance(exc, EdgepipeError):
        why = f"internal error: {why}"
    return TargetResult(name, target, ERROR, why, code, seconds=round(seconds, 2), traceback=tb)


@contextlib.contextmanager
def prepare(recipe: Recipe, out: Path, targets: list[str], force: bool) -> Iterator[BuildContext]:
    """Stages shared by the targets: preflight, distill, export (source) and the reference outputs."""
    pre = preflight(recipe, out, targets, force)
    root = out / recipe.name
    root.mkdir(parents=True, exist_ok=True)
    remove_stale(root)
    work = Path(tempfile.mkdtemp(prefix=f".work-{os.getpid()}-", dir=root))
    try:
        source = _source(recipe, pre, work)
        evals = _eval_set(source, pre.eval_data, pre.calibration)
        for batch, _ in evals.batches[:1]:
            data_mod.check_batch(batch, source.inputs, "data")
        yield BuildContext(recipe, root, work, force, source, evals, pre.calibration)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _source(recipe: Recipe, pre: Preflight, work: Path) -> Source:
    if not recipe.distill:
        logger.info(f"export  {recipe.model.kind} source → ONNX")
        return load_source(recipe, work, pre.first)
    from edgepipe.pipeline.distill_stage import run_distill

    logger.info(f"distill {recipe.model.kind} teacher → student")
    distilled = run_distill(recipe, pre.calibration, pre.eval_data, work)
    logger.info(f"export  {recipe.model.kind} source → ONNX")
    source = load_source(distilled.recipe, work, pre.first, distilled.module)
    return dataclasses.replace(source, distill=distilled.record)


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
    if recipe.model.task == "text-generation":  # decoder LLMs: their own checks (text files, source path), no model load
        from edgepipe.pipeline.decoder.build import preflight as decoder_preflight

        decoder_preflight(recipe, out, only, force)
        return Preflight(targets, None, None, None)
    root = out / recipe.name
    for t in targets:
        ensure_replaceable(root / t, force)
    calibration, eval_data = data_sources(recipe)
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




def data_sources(recipe: Recipe):
    """(calibration source, eval batches); text files are tokenized with an hf model's own tokenizer."""
    encoder = None
    if recipe.model.kind == "hf":
        from edgepipe.sources.hf import hf_folder, text_encoder

        encoder = text_encoder(hf_folder(recipe), recipe.data.max_length)
    d, base = recipe.data, recipe.base_dir
    only_input = recipe.inputs[0].name if recipe.inputs and len(recipe.inputs) == 1 else None
    images = (d.images, only_input)
    calibration = data_mod.calibration_source(d.calibration, base, encoder, images) if d.calibration else None
    return calibration, (data_mod.eval_batches(d.eval, base, encoder, images) if d.eval else None)


def _check_data_names(recipe: Recipe, batch: dict[str, np.ndarray] | None) -> None:
    if batch is None or not recipe.inputs:
        return
    declared = [i.name for i in recipe.inputs]
    if sorted(batch) != sorted(declared):
        raise BadInput(f"data yields inputs {sorted(batch)} but the recipe declares {declared}; make the names match")


def _eval_set(source: Source, eval_data, calibration) -> EvalSet:
    if eval_data:
        batches, origin = eval_data, "eval"
    elif calibration is not None:
        batches, origin = [(b, None) for b in calibration()], "calibration"
    else:
        from edgepipe.sources.export import sample_batch

        sizes = {d: 1 for _, shape in source.inputs.values() for d in shape if isinstance(d, str)}
        batches, origin = [(sample_batch(source.inputs, None, sizes, seed=s), None) for s in range(16)], "synthetic"
    labels = None
    if all(y is not None for _, y in batches):
        labels = np.concatenate([y for _, y in batches])
    reference = concat([source.reference(b) for b, _ in batches])
    warnings = tuple(data_warnings(origin, calibration, quantized=True))
    return EvalSet(batches, labels, reference, origin, warnings)


# ---------------------------------------------------------------- one target


@dataclasses.dataclass(frozen=True)
class TargetStage:
    """One target of a recipe: its profile, options and accuracy budget."""

    ctx: BuildContext
    target: Target
    tctx: TargetContext
    accuracy: AccuracySpec
    metric: Metric


@dataclasses.dataclass(frozen=True)
class Built:
    """A variant's model after its passes (and the runtime cap), ready to emit."""

    key: str
    model: ir.Model
    pass_log: list[dict]
    runtime_cap: dict | None


class _Failed(Exception):
    def __init__(self, manifest: dict) -> None:
        self.manifest = manifest


def build_target(ctx: BuildContext, name: str) -> TargetResult:
    """Variants → check → publish one target; never raises for a build problem (the result says it)."""
    logger.info(f"target  {name}")
    start = time.perf_counter()
    try:
        result = _build_target(ctx, name)
    except Exception as exc:
        result = failure(ctx.recipe.name, name, exc)
    return dataclasses.replace(result, seconds=round(time.perf_counter() - start, 2), where=f"{os.uname().nodename}:{os.getpid()}")


def _build_target(ctx: BuildContext, name: str) -> TargetResult:
    recipe = ctx.recipe
    target = TARGETS[name]()
    spec = recipe.targets[name]
    ev = ctx.evals
    tctx = TargetContext(recipe, spec, ctx.calibration is not None,
                         longest_shapes(ctx.source.inputs, ev.batches, ctx.calibration, recipe.data.max_length),
                         load(ctx.source.onnx_path) if spec.passes is None and target.reads_source else None)  # a default chain reads the graph
    spec_acc = target.accuracy(tctx)
    stage = TargetStage(ctx, target, tctx, spec_acc, resolve_metric(spec_acc.metric, recipe.base_dir))
    version = compat.requested(spec.runtime)
    built, variants = [], target.variants(tctx)
    sample = ev.batches[0][0] if ev.batches else None
    # int8 only where it is not slower than float (cpu, mobile), inside the budget's fallback
    run = functools.partial(_speed_checked, target, tctx, sample)
    for variant in variants:
        if variant.key != "main":
            logger.info(f"  model {variant.key}")
        model, pass_log = run_with_fallback(name, spec, variant.passes, _pass_context(stage, variant.key), load(ctx.source.onnx_path), run)
        built.append(_capped(Built(variant.key, model, pass_log, None), version))
    final = ctx.root / name
    for attempt in range(2):
        try:
            with staging(final, ctx.force) as tmp:
                manifest = _check_and_write(stage, built, tmp)
            return TargetResult(recipe.name, name, PASSED, None, 0, manifest, final)
        except _Failed as failed:
            typed = Manifest.from_json(failed.manifest)
            reason = output_failure(typed) or budget_failure(typed)
            floated = [] if attempt or output_failure(typed) else [
                float_after_all(name, spec, v.passes, b.pass_log, missed(typed), _pass_context(stage, v.key), load(ctx.source.onnx_path), run)
                for v, b in zip(variants, built, strict=True)]
            if not any(floated):
                return TargetResult(recipe.name, name, FAILED, reason, 1, failed.manifest)
            built = [b if f is None else _capped(Built(b.key, *f, None), version) for b, f in zip(built, floated, strict=True)]
    raise AssertionError("unreachable: the second attempt returns")


def _capped(b: Built, version: Any) -> Built:
    """Before anything is emitted: a model the runtime can't run is exit 2."""
    if version is None:
        return b
    model, cap = compat.cap(b.model, version)
    return dataclasses.replace(b, model=model, runtime_cap=cap)


def _pass_context(stage: TargetStage, key: str) -> PassContext:
    """What a variant's passes may use: calibration data, a scratch folder, the scorer and the budget."""
    work = stage.ctx.work / stage.target.name / key
    ev = stage.ctx.evals
    evaluate = ev.evaluator(stage.accuracy, stage.metric, list(stage.target.providers), work / "candidates")
    ref = reference_value(stage.accuracy, stage.metric, ev.reference, ev.labels)

    def accept(score: float) -> bool:
        return budget_met(stage.accuracy, stage.metric, ref, evaluate.sign * score)

    return PassContext(workdir=work, calibration=stage.ctx.calibration, evaluate=evaluate, accept=accept,
                       target=stage.target.name, map=current_map())


def _speed_checked(target: Target, tctx: TargetContext, sample: dict[str, np.ndarray] | None,
                   chain: list[dict[str, Any]], pctx: PassContext, model: ir.Model) -> tuple[ir.Model, list[dict]]:
    return run_chain(target, tctx, chain, pctx, model, sample, run_passes)


def run_passes(chain: list[dict[str, Any]], pctx: PassContext, model: ir.Model) -> tuple[ir.Model, list[dict]]:
    """Run a pass chain; a pass's unexpected exception is an internal error naming it and the passes before it."""
    pass_log: list[dict] = []
    for entry in chain:
        p = create(entry, pctx)
        before = model_stats(model)
        start = time.perf_counter()
        try:
            result = p(model)
        except EdgepipeError:
            raise
        except Exception as exc:
            why = explain(exc)  # a known onnx / onnxruntime failure: this model is not supported
            if why:
                raise BadInput(f"pass {p.name} failed on this model: {why}") from exc
            raise PassError(p.name, [e["name"] for e in pass_log], exc) from exc
        model = result.model
        stats = {"before": before, "after": model_stats(model), **getattr(result, "stats", {})}
        pass_log.append({"name": p.name, "params": p.config.record(), "modified": result.modified, "stats": stats})
        logger.info(f"  pass  {p.name:<18} nodes {before['nodes']}→{stats['after']['nodes']}  bytes {before['bytes']}→{stats['after']['bytes']}  ({time.perf_counter() - start:.1f}s)")
        if stats.get("summary"):
            logger.info(f"        {stats['summary']}")
    return model, pass_log


def _check_and_write(stage: TargetStage, built: list[Built], tmp: Path) -> dict:
    """Emit each model into ``tmp``, check accuracy on the emitted file itself, write golden and manifest."""
    source = stage.ctx.source
    entries = []
    for rel, path in source.extra_files.items():  # e.g. tokenizer files: hashed in the manifest like the model
        (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, tmp / rel)
    for b in built:
        acc, entry = _check_model(stage, b, tmp)
        entries.append((b.key, acc, entry))
    passed = all(acc.passed for _, acc, _ in entries)
    warnings = list(dict.fromkeys(w for _, _, e in entries for w in e.warnings or []))
    for w in warnings:
        logger.info(f"  warn  {w}")
    target = stage.target
    manifest = Manifest.of(
        entries[0][2].without("warnings"),  # the primary model's fields stay at the top level; its warnings are the folder's
        name=stage.ctx.recipe.name, target=target.name, description=target.description,
        status="passed" if passed else "failed", source=model_source(source), versions=versions(), warnings=warnings,
    )
    if len(entries) > 1:
        manifest = manifest.with_(models=tuple(entry.with_(variant=key) for key, _, entry in entries))
    written = write_manifest(tmp, manifest)
    if not passed:
        # Nothing half-trusted is published: the failed artifact is dropped, its manifest reported.
        raise _Failed(written)
    return written


def _check_model(stage: TargetStage, b: Built, tmp: Path) -> tuple[AccuracyResult, ModelEntry]:
    """Emit one model, score it on the eval data, write its golden file; (accuracy, manifest entry)."""
    source, ev, target = stage.ctx.source, stage.ctx.evals, stage.target
    emitted = target.emit(b.model, tmp, stage.tctx, b.key)
    runner = Runner(tmp / emitted.model_file, providers=emitted.providers, session_config=emitted.session_config)
    outputs = evaluate_batches(runner, tmp / emitted.model_file, ev.batches, emitted.providers, emitted.session_config)
    acc = measure_every_output(stage.accuracy, stage.metric, outputs, ev.reference, ev.labels)  # the budget, and every output's shape/dtype/NaN/closeness
    name = emitted.model_file
    logger.info(f"  check {name}: {acc.metric} {acc.reference:.4f} → {acc.value:.4f} (drop {acc.drop:+.4f}, budget {acc.budget}) {'ok' if acc.passed else 'FAILED'}{': ' + acc.reason if acc.reason else ''}")
    for problem in output_problems(acc):
        logger.info(f"  check {name}: {problem}")
    golden_file = GOLDEN if b.key == "main" else f"golden.{b.key}.npz"
    quantized = any(p["name"].startswith("quantize") or p["name"] == "fp16" for p in b.pass_log)
    golden = _write_golden(tmp / golden_file, runner, ev, target, quantized)
    if quantized and b.runtime_cap is not None:
        golden = _rounding_tolerance(golden, b, tmp / emitted.model_file, emitted, ev)
    feed1 = resize_batch(ev.batches[0][0], runner.fixed_batch() or 1)  # a fixed-shape model takes only its batch
    feed1 = {k: pad_tokens(v, runner.inputs[k].shape) if k in runner.inputs else v for k, v in feed1.items()}  # float and int8 timed on the same feed
    lat = Latency.from_json(latency(runner, feed1))
    warnings = list(ev.warnings) + [p["stats"]["warning"] for p in b.pass_log if p["stats"].get("warning")]
    if any(p["name"].startswith("quantize") for p in b.pass_log):
        # Speed check: int8 that is not faster than float on its runtime says so, with the likely cause.
        float_ms = latency(Runner(source.onnx_path, providers=emitted.providers), feed1)["p50_ms"]
        lat = lat.with_(float_p50_ms=float_ms)
        slow = speed_warning(tmp / emitted.model_file, lat.p50_ms, float_ms, emitted.providers, runner.providers)
        warnings += [f"{name}: {slow}"] if slow else []
        if note := speed_note(emitted.providers, runner.providers, lat.p50_ms, float_ms):  # e.g. TensorRT int8 on CPU
            lat = lat.with_(note=note)
    entry = target_manifest(source=source, emitted=emitted, runner=runner, pass_log=b.pass_log, acc=acc, data_origin=ev.origin,
                            golden=golden, lat=lat, warnings=warnings, folder=tmp, runtime_cap=b.runtime_cap)
    return acc, entry


def _golden_inputs(ev: EvalSet) -> dict[str, np.ndarray]:
    return {k: v[:GOLDEN_SAMPLES] for k, v in ev.batches[0][0].items()}


def _write_golden(path: Path, runner: Runner, ev: EvalSet, target: Target, quantized: bool) -> Golden:
    inputs = _golden_inputs(ev)
    expected = run_batches(runner, [(inputs, None)])
    reference = {k: v[: len(next(iter(expected.values())))] for k, v in ev.reference.items()}
    save_golden(path, inputs, expected, reference)
    share, rtol = target.golden_tolerance(quantized)
    scale = max(float(np.abs(v).max(initial=0.0)) for v in expected.values())
    return Golden.of(file=path.name, samples=len(next(iter(inputs.values()))), atol=max(share * scale, 1e-6), rtol=rtol)


def _rounding_tolerance(golden: Golden, b: Built, emitted_path: Path, emitted: Emitted, ev: EvalSet) -> Golden:
    """A capped quantized model is verified by another onnxruntime release than the one that built it: its golden
    atol also covers what that release's differently-rounding float kernels do to it (measured, targets/rounding.py)."""
    model = onnx.load(str(emitted_path)) if emitted_path.suffix == ".onnx" else ir.to_proto(b.model)  # .ort: its ONNX model
    measured = rounding.spread(model, _golden_inputs(ev), emitted.providers, emitted.session_config)
    if measured is None:
        return golden
    atol = max(golden.atol, measured["atol"])
    why = (f"onnxruntime {b.runtime_cap['onnxruntime']} (the runtime cap) rounds float kernels differently from the "
           f"release that built the model; its {measured['quantizers']} quantizers turn that into whole quantization steps")
    return golden.with_(atol=atol, tolerance={"target_atol": golden.atol, "float_rounding": {**measured, "why": why}})
