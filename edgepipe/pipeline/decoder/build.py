"""edgepipe build for ``task: text-generation``: causal LM → checked decoder graph → int4/int8 → genai-ready artifact."""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort

from edgepipe.core.artifact import remove_stale, save_npz, staging, write_manifest
from edgepipe.core.errors import BadInput
from edgepipe.core.manifest import (
    Accuracy,
    ExportCheck,
    Generation,
    Golden,
    KvCache,
    Latency,
    Manifest,
    ModelEntry,
    ModelSource,
    Precision,
    Runtime,
    Size,
)
from edgepipe.core.result import FAILED, PASSED, TargetResult
from edgepipe.passes.int4 import Int4Config
from edgepipe.pipeline.decoder.bench import bench_decoder
from edgepipe.pipeline.decoder.export import Exported, export_decoder
from edgepipe.pipeline.decoder.forms import (
    FP16_SPEED_NOTE,
    Form,
    Layout,
    fix_batch,
    genai_settings,
    layout,
    precision_on_cpu,
    share_head,
    to_fp16,
    write_ort,
)
from edgepipe.pipeline.decoder.genai import genai_config, write_genai_config
from edgepipe.pipeline.decoder.metrics import TeacherForced, agreement, greedy, matched
from edgepipe.pipeline.decoder.precision import choose_blocks
from edgepipe.pipeline.decoder.quantize import Quantized, summary
from edgepipe.pipeline.decoder.runtime import CHECK_THREADS, OrtDecoder, TorchDecoder
from edgepipe.pipeline.decoder.scales import input_importance
from edgepipe.pipeline.decoder.source import CausalLM, load_causal_lm, locate, save_tokenizer
from edgepipe.pipeline.manifest import versions as _versions
from edgepipe.pipeline.selection import check_writable, select_targets
from edgepipe.recipe import AccuracySpec, Recipe
from edgepipe.sources.data import read_lines

logger = logging.getLogger(__name__)
DEFAULT_BUDGET = AccuracySpec(metric="perplexity", percent_max_drop=10.0)
DEFAULT_MAX_LENGTH = 128
SENSITIVITY_SEQUENCES, SENSITIVITY_TOKENS = 2, 64  # ranking reads a little text: one model per block
TARGETS = ("cpu", "gpu", "mobile")
UNUSED_OPTIONS = ("int8_passes", "shapes", "runtime")  # encoder target options a decoder target has no use for


def is_decoder(recipe: Recipe) -> bool:
    return recipe.model.task == "text-generation"


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """PyTorch on ``n`` threads for a block: on a busy 2-core machine 2 OpenMP threads spin ~10× slower than 1."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


class Texts:
    """The recipe's text data, tokenized: eval and calibration sequences, prompts."""

    def __init__(self, recipe: Recipe, tokenizer: Any) -> None:
        self.check(recipe)
        d = recipe.data
        length = d.max_length or DEFAULT_MAX_LENGTH
        self.eval = self._encode(recipe, d.eval, tokenizer, length, "data.eval")
        self.calibration = self._encode(recipe, d.calibration, tokenizer, length, "data.calibration") if d.calibration else self.eval
        self.prompts = self._encode(recipe, d.prompts, tokenizer, length, "data.prompts", min_tokens=1)
        self.max_new_tokens = d.max_new_tokens

    @staticmethod
    def check(recipe: Recipe) -> None:
        """The text data a decoder build needs is named (before the slow model load)."""
        d = recipe.data
        if not d.eval:
            raise BadInput("task text-generation needs data.eval: a .txt file of text, one example per line (perplexity is measured on it)")
        if not d.prompts:
            raise BadInput("task text-generation needs data.prompts: a .txt file of prompts, one per line (greedy generation is checked on them)")

    @staticmethod
    def _encode(recipe: Recipe, ref: str, tokenizer: Any, length: int, key: str, min_tokens: int = 2) -> list[np.ndarray]:
        path = recipe.path(ref)
        if path.suffix not in (".txt", ".text"):
            raise BadInput(f"{key}: {path.name} must be a .txt file (one example per line) for task text-generation")
        seqs = [np.asarray(tokenizer(line, truncation=True, max_length=length)["input_ids"], np.int64) for line in read_lines(path)]
        seqs = [s for s in seqs if len(s) >= min_tokens]
        if not seqs:
            raise BadInput(f"{key}: {path} holds no usable examples (one per line; '#' lines are comments)")
        return seqs


class Reference:
    """PyTorch's teacher-forced logits/perplexity on the eval text and greedy tokens on the prompts."""

    def __init__(self, lm: CausalLM, texts: Texts) -> None:
        torch_dec = TorchDecoder(lm.model)
        self.eos = lm.eos_ids
        self.teacher = TeacherForced.measure(torch_dec.logits, texts.eval)
        self.greedy = [greedy(torch_dec, p, texts.max_new_tokens, self.eos) for p in texts.prompts]


def preflight(recipe: Recipe, out: Path, only: list[str] | None, force: bool) -> list[str]:
    """Every check that needs no model load: targets, output folder, pass options, data files, the source's path."""
    targets = select_targets(recipe, only)
    unsupported = [t for t in targets if t not in TARGETS]
    if unsupported:
        raise BadInput(f"target {unsupported[0]} is not built for task text-generation (only {', '.join(TARGETS)}); "
                       f"remove it from the recipe's targets or pass --target cpu")
    for t in targets:
        unused = [k for k in UNUSED_OPTIONS if getattr(recipe.targets[t], k) is not None]
        if unused:
            raise BadInput(f"targets.{t}.{unused[0]} does not apply to task text-generation (a decoder target takes passes and "
                           f"accuracy; mobile fixes batch 1 itself); remove it")
    root = out / recipe.name
    for t in targets:
        if (root / t).exists() and not force:
            raise BadInput(f"{root / t} already exists; pass --force to replace it or choose another -o folder")
    check_writable(out)
    for t in targets:
        _quant_config(recipe, t)
    Texts.check(recipe)
    folder, gguf = locate(recipe)
    counts = {k: len(read_lines(recipe.path(v))) for k, v in (("eval", recipe.data.eval), ("calibration", recipe.data.calibration),
                                                              ("prompts", recipe.data.prompts)) if v}
    return [f"source {folder / gguf if gguf else folder}: found", f"output {root}: writable",
            "text data: " + ", ".join(f"{k} {n} lines" for k, n in counts.items()),
            *(f"target {t}: passes {[p['name'] for p in recipe.targets[t].passes or [{'name': 'quantize.int4'}]]}" for t in targets)]


def build_decoder(recipe: Recipe, out: Path, only: list[str] | None, force: bool) -> list[TargetResult]:
    preflight(recipe, out, only, force)
    targets = select_targets(recipe, only)
    root = out / recipe.name
    logger.info("load    causal LM (float32)")
    lm = load_causal_lm(recipe)
    texts = Texts(recipe, lm.tokenizer)
    root.mkdir(parents=True, exist_ok=True)
    remove_stale(root)
    work = Path(tempfile.mkdtemp(prefix=f".work-{os.getpid()}-", dir=root))
    try:
        with torch_threads(1):
            logger.info("export  decoder graph with KV cache → ONNX (checked vs PyTorch at past 0, 1, many)")
            exported = export_decoder(lm, work, texts.eval[0][:48])
            logger.info(f"        {exported.backend} graph, {len(exported.checks)} export checks passed")
            logger.info(f"reference PyTorch: perplexity on {len(texts.eval)} eval texts, greedy on {len(texts.prompts)} prompts")
            ref = Reference(lm, texts)
        lm.release()  # the float weights are no longer needed: the peak RSS is the quantization's
        gc.collect()
        tokenizer_files = save_tokenizer(lm, work / "tokenizer")
        results, chosen = [], {}
        for name in targets:
            logger.info(f"target  {name}")
            results.append(_build_target(recipe, lm, texts, ref, exported, tokenizer_files, root / name, force, chosen))
        return results
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _quant_config(recipe: Recipe, target: str) -> Int4Config | None:
    """The target's weight-only quantization (``quantize.int4``), None for a float artifact (``passes: []``)."""
    spec = recipe.targets[target]
    defaults = layout(target, True).quant_defaults  # gpu: the builder's CUDA accuracy_level
    if spec.passes is None:
        return Int4Config(**defaults)
    names = [p["name"] for p in spec.passes]
    if not names:
        return None
    if names != ["quantize.int4"]:
        raise BadInput(f"targets.{target}.passes: task text-generation takes [] (float) or [{{name: quantize.int4, ...}}] "
                       f"(block_size, try_block_sizes, search_scales, symmetric, accuracy_level, bits, mixed); got {names}")
    return Int4Config(**{**defaults, **{k: v for k, v in spec.passes[0].items() if k != "name"}})


def budget_of(recipe: Recipe, target: str) -> AccuracySpec:
    spec = recipe.targets[target].accuracy
    if spec is not None:
        return spec
    return recipe.accuracy if "accuracy" in recipe.model_fields_set else DEFAULT_BUDGET


def verdict(spec: AccuracySpec, reference: float, value: float) -> Accuracy:
    """drop = how much worse (perplexity up, agreement down); budgets as in the rest of edgepipe."""
    drop = value - reference if spec.metric == "perplexity" else reference - value
    percent = 100.0 * drop / reference if reference else 0.0
    budget: dict[str, float] = {}
    ok = True
    if spec.max_drop is not None:
        budget["max_drop"], ok = spec.max_drop, ok and drop <= spec.max_drop
    if spec.percent_max_drop is not None:
        budget["percent_max_drop"], ok = spec.percent_max_drop, ok and percent <= spec.percent_max_drop
    if spec.min_value is not None:
        budget["min_value"] = spec.min_value
        ok = ok and (value <= spec.min_value if spec.metric == "perplexity" else value >= spec.min_value)
    return Accuracy.of(metric=spec.metric, reference=round(reference, 6), value=round(value, 6), drop=round(drop, 6),
                       percent_drop=round(percent, 4), budget=budget, passed=bool(ok))


def _accept(spec: AccuracySpec, ref: Reference) -> Callable[[TeacherForced], bool]:
    def accept(tf: TeacherForced) -> bool:
        if spec.metric == "perplexity":
            return verdict(spec, ref.teacher.perplexity, tf.perplexity).passed
        return verdict(spec, 1.0, agreement(ref.teacher.logits, tf.logits)["top1"]).passed

    return accept


def _build_target(recipe: Recipe, lm: CausalLM, texts: Texts, ref: Reference, exported: Exported, tokenizer_files: list[Path],
                  final: Path, force: bool, chosen: dict) -> TargetResult:
    """``chosen``: quantized models by (options, fp16, budget), shared by the targets of one build (cpu and mobile)."""
    config = _quant_config(recipe, final.name)
    spec = budget_of(recipe, final.name)
    lay = layout(final.name, config is not None)  # the forms this target ships (forms.py)
    try:
        with staging(final, force) as tmp:
            entries = []
            for form in lay.forms:
                model, passes = _prepare(form, exported, config, spec, texts, ref, chosen)
                entries.append(_emit_and_check(lay, form, lm, texts, ref, exported, model, passes, spec, tmp))
                del model
                gc.collect()
            manifest = _write_manifest(recipe, lay, lm, exported, tokenizer_files, entries, tmp)
    except _Failed as failed:
        return TargetResult(recipe.name, final.name, FAILED, "accuracy budget exceeded", 1, failed.manifest)
    return TargetResult(recipe.name, final.name, PASSED, None, 0, manifest, final)


def _prepare(form: Form, exported: Exported, config: Int4Config | None, spec: AccuracySpec, texts: Texts,
             ref: Reference, chosen: dict) -> tuple[onnx.ModelProto, list[dict]]:
    """The exported float graph in ``form``: fp16 (before quantizing: fp16 scales), int4/int8, a fixed batch."""
    passes = []
    if form.fp16:
        passes.append({"name": "fp16", "params": {"keep_io_types": False}, "modified": True,
                       "stats": {"summary": "fp16 weights, activations, KV cache and logits (onnxruntime.transformers.float16)"}})
    if form.quantized and config is not None:
        key = (config.model_dump_json(), form.fp16, spec.model_dump_json())
        if key not in chosen:  # the same options and budget on the same graph choose the same model: measured once
            chosen[key] = _quantize(exported, form, config, spec, texts, ref)
        else:
            logger.info("  pass  quantize.int4  the same options and budget as an earlier target: its model")
        model = onnx.ModelProto()
        model.CopyFrom(chosen[key][0])
        passes.append({"name": "quantize.int4", "params": config.record(), "modified": True, "stats": chosen[key][1]})
    else:
        model = _float(exported, form)
        if form.fp16 and share_head(model):
            passes[-1]["stats"]["tied_head"] = "the LM head reads the embedding table through a Transpose (one copy)"
    if form.batch:
        fix_batch(model, form.batch)
        passes.append({"name": "shapes.fix", "params": {"batch_size": form.batch}, "modified": True,
                       "stats": {"summary": f"batch fixed to {form.batch}; sequence and past lengths stay dynamic"}})
    return model, passes


def _float(exported: Exported, form: Form) -> onnx.ModelProto:
    model = onnx.load(str(exported.path))
    return to_fp16(model) if form.fp16 else model


def _quantize(exported: Exported, form: Form, config: Int4Config, spec: AccuracySpec, texts: Texts,
              ref: Reference) -> tuple[onnx.ModelProto, dict]:
    """The form's float graph at int4 (blocks of each ``try_block_sizes`` first, then ``block_size``, then int8 groups)."""
    start = time.perf_counter()
    importance = None
    if config.bits == 4 and config.symmetric and config.search_scales:
        importance = input_importance(exported.path, texts.calibration)
        logger.info(f"        int4 block scales searched on {len(texts.calibration)} calibration texts' activations")
    block_size = config.block_size
    if config.bits == 8:
        q = Quantized.prepare(_float(exported, form), config, bits=(8,))
        model, plan, steps, ranked, searched = q.build({}, default=8), {}, [], [], 0
        del q
    else:
        def prepare(size: int, bits: tuple[int, ...]) -> Quantized:
            return Quantized.prepare(_float(exported, form), config.model_copy(update={"block_size": size}),
                                     bits=bits, importance=importance)

        calibration = [s[:SENSITIVITY_TOKENS] for s in texts.calibration[:SENSITIVITY_SEQUENCES]]
        choice = choose_blocks(prepare, [*config.try_block_sizes, config.block_size], texts.eval, calibration,
                               _accept(spec, ref), config.max_int8_groups if config.mixed else 0)
        model, plan, steps, ranked = choice.model, choice.plan, choice.steps, choice.sensitivity
        searched, block_size = choice.searched, choice.block_size or config.block_size
    counts = summary(model)
    logger.info(f"  pass  quantize.int4  MatMulNBits int4×{counts['int4']} int8×{counts['int8']}, tied embedding {bool(counts['tied_embedding'])}"
        f"  ({time.perf_counter() - start:.1f}s)")
    stats = {**counts, "int8_groups": sorted(plan), "steps": steps, "sensitivity": ranked, "searched_scales": searched,
             "block_size": block_size, "kept_float": sorted(plan),
             "summary": f"{len(plan)} group(s) kept at int8 by measured sensitivity" if plan else "all int4"}
    if not counts["int4"] and not counts["int8"]:  # e.g. GPT-2: its Conv1D layers export as Gemm, which MatMulNBits does not take
        stats["summary"] = stats["warning"] = ("quantize.int4 found no MatMul with a constant 2-D weight: the model stays "
                                               "float (MatMulNBits takes MatMul only; Gemm layers are not quantized)")
        logger.warning(f"  {stats['warning']}")
    return model, stats


class _Failed(Exception):
    def __init__(self, manifest: dict) -> None:
        super().__init__("failed")
        self.manifest = manifest


def _save(model: onnx.ModelProto, form: Form, tmp: Path) -> dict[str, Any]:
    """Write the form's model file(s); returns the form's target extras for the manifest (mobile: the .ort file)."""
    if form.ort_format:
        return {"mobile": write_ort(model, tmp)}
    onnx.save_model(model, str(tmp / form.model_file), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=form.model_file + ".data", size_threshold=1024)
    for data in tmp.glob(form.model_file + ".data"):
        data.chmod(0o644)  # onnx writes it 0600; the artifact is read by other users
    return {}


def _emit_and_check(lay: Layout, form: Form, lm: CausalLM, texts: Texts, ref: Reference, exported: Exported,
                    model: onnx.ModelProto, passes: list[dict], spec: AccuracySpec, tmp: Path) -> ModelEntry:
    """Write one model of the folder and run the generation checks on the written file: its manifest entry."""
    extras = _save(model, form, tmp)
    path = tmp / form.model_file
    checked_on = precision_on_cpu(path, tmp.parent / f".as-run-{os.getpid()}") if form.fp16 else None
    providers = [p for p in lay.providers if p in ort.get_available_providers()]  # CUDA where present, else CPU
    dec = OrtDecoder(path, threads=CHECK_THREADS, providers=providers)
    if form.model_file == lay.genai_model:
        config = genai_config(lm.config, lm.tokenizer, exported.geometry, form.model_file, list(dec.inputs), ref.eos,
                              share_buffer=exported.backend == "fused")
        write_genai_config(tmp, genai_settings(config, lay))
    tf = TeacherForced.measure(dec.logits, texts.eval)
    agree = agreement(ref.teacher.logits, tf.logits)
    tokens = [greedy(dec, p, texts.max_new_tokens, ref.eos) for p in texts.prompts]
    match = [matched(r, t) for r, t in zip(ref.greedy, tokens, strict=True)]
    acc = verdict(spec, ref.teacher.perplexity, tf.perplexity) if spec.metric == "perplexity" else verdict(spec, 1.0, agree["top1"])
    acc = acc.with_(output="logits", samples=len(texts.eval), data="eval")
    increase = round(tf.perplexity / ref.teacher.perplexity - 1, 4)
    greedy_ = {"prompts": len(tokens), "max_new_tokens": texts.max_new_tokens, "matched": match,
               "mean_matched": round(float(np.mean(match)), 2),
               "identical": sum(m == len(r) for m, r in zip(match, ref.greedy, strict=True))}
    generation = Generation.of(
        perplexity={"reference": round(ref.teacher.perplexity, 4), "artifact": round(tf.perplexity, 4), "increase": increase},
        next_token={k: round(v, 6) if isinstance(v, float) else v for k, v in agree.items()}, greedy=greedy_, eos_token_ids=ref.eos,
    )
    logger.info(f"  check {form.model_file}: perplexity {ref.teacher.perplexity:.3f} → {tf.perplexity:.3f} ({100 * increase:+.1f}%, "
        f"budget {acc.budget}) {'ok' if acc.passed else 'FAILED'}; next-token top-1 {agree['top1']:.3f}, "
        f"greedy matched {greedy_['mean_matched']:.1f}/{texts.max_new_tokens} tokens on average")
    golden = {f"prompt/{i}": p for i, p in enumerate(texts.prompts)} | {f"tokens/{i}": np.asarray(t, np.int64) for i, t in enumerate(tokens)}
    save_npz(tmp / form.golden_file, golden)
    bench = bench_decoder(OrtDecoder(path, providers=providers), texts.eval[0])  # speed on the runtime's default threads
    logger.info(f"  bench prefill {bench['prefill_tokens']} tokens {bench['prefill_ms']:.1f} ms, decode {bench['decode_tokens_per_s']:.1f} tokens/s")
    speed = Latency.from_json(bench)
    if form.fp16 and dec.session.get_providers()[0] == "CPUExecutionProvider":
        speed = speed.with_(note=FP16_SPEED_NOTE)
    size = sum(p.stat().st_size for p in tmp.glob(form.model_file + "*"))
    fp32 = sum(p.stat().st_size for p in exported.path.parent.glob("model.onnx*"))
    io = next(i for i in dec.session.get_inputs() if i.name.startswith("past_key_values"))
    runtime = Runtime.of(name="onnxruntime", version=_versions()["onnxruntime"], providers=dec.session.get_providers(),
                         requested_providers=lay.providers, session_config={})
    entry = ModelEntry.of(
        model_file=form.model_file, form=form.key, status="passed" if acc.passed else "failed",
        precision=Precision.of(activations="float16" if form.fp16 else "float32",
                               kv_cache={"float": "float32"}.get(io.type[7:-1], io.type[7:-1]),
                               weights="int4" if form.quantized else ("float16" if form.fp16 else "float32"), batch=form.batch or "dynamic"),
        runtime=runtime.with_(genai_config="genai_config.json") if form.model_file == lay.genai_model else runtime,
        inputs=[{"name": i.name, "dtype": i.type, "shape": i.shape} for i in dec.session.get_inputs()[:3]],
        outputs=[{"name": o.name, "dtype": o.type, "shape": o.shape} for o in dec.session.get_outputs()[:3]],
        opset=next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0), ir_version=model.ir_version,
        size=Size.of(model_bytes=size, fp32_bytes=fp32, ratio=round(size / fp32, 4) if fp32 else 0.0),
        passes=passes, accuracy=acc, generation=generation,
        golden=Golden.of(file=form.golden_file, prompts=len(tokens), max_new_tokens=texts.max_new_tokens, eos_token_ids=ref.eos,
                         threads=CHECK_THREADS),
        latency=speed, extra=extras,
    )
    return entry.with_(checked_on=checked_on) if checked_on is not None else entry


def _write_manifest(recipe: Recipe, lay: Layout, lm: CausalLM, exported: Exported, tokenizer_files: list[Path],
                    entries: list[ModelEntry], tmp: Path) -> dict:
    """The folder's manifest: its first model's entry at the top (the artifact contract), every model under ``models``."""
    for f in tokenizer_files:
        shutil.copyfile(f, tmp / f.name)
    passed = all(e.status == "passed" for e in entries)
    geometry = exported.geometry
    check = ExportCheck.of(cases=len(exported.checks), passed=all(c["passed"] for c in exported.checks),
                           max_abs=max(c["max_abs"] for c in exported.checks), checks=exported.checks)
    manifest = Manifest.of(
        entries[0].without("status"),  # the folder's status is the manifest's
        name=recipe.name, target=lay.target, description=lay.description, task="text-generation",
        status="passed" if passed else "failed",
        kv_cache=KvCache.of(layers=geometry["layers"], kv_heads=geometry["kv_heads"], head_size=geometry["head_size"],
                            past="past_key_values.%d.key|value", present="present.%d.key|value"),
        source=ModelSource.of(kind="gguf" if recipe.model.gguf else "hf", origin=lm.origin, export=exported.backend, export_check=check),
        versions=_versions(),
        warnings=list(dict.fromkeys(p["stats"]["warning"] for e in entries for p in e.passes or []
                                    if p.get("stats", {}).get("warning"))),
    )
    if len(entries) > 1:
        manifest = manifest.with_(models=tuple(entries))
    written = write_manifest(tmp, manifest)
    if not passed:
        raise _Failed(written)
    return written
