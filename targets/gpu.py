"""gpu: ONNX Runtime CUDA / TensorRT — an fp16 model and a TensorRT-style int8 QDQ model in one folder."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import onnx_ir as ir
import onnxruntime as ort

from edgepipe.core.artifact import sha256_file
from edgepipe.core.version import VERSION
from edgepipe.passes.base import load, save
from edgepipe.passes.tensorrt import pop_ranges
from edgepipe.targets import compat
from edgepipe.targets.base import Emitted, Target, TargetContext, Variant, deployable
from edgepipe.targets.trtcache import HEADER, amax, write_cache

logger = logging.getLogger(__name__)

FP16_FILE = "model.onnx"
INT8_FILE = "model.int8.qdq.onnx"
# ORT's TensorRT provider reads the table at trt_engine_cache_path / trt_int8_calibration_table_name
# (GetCachePath in tensorrt_execution_provider.cc), so the cache ships inside the engine cache folder.
ENGINE_CACHE = "trt_cache"
CACHE_NAME = "calibration.cache"
CACHE = f"{ENGINE_CACHE}/{CACHE_NAME}"
FP32_FILE = "model.fp32.onnx"  # the float32 graph whose tensors the cache names (TensorRT implicit INT8)
CACHE_INFO = "calibration.json"
OPTIONS = "provider_options.json"
CUDA = ["CUDAExecutionProvider", "CPUExecutionProvider"]
TRT = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]


class GpuTarget(Target):
    """model.onnx: float16 with float32 I/O; model.int8.qdq.onnx: explicit int8 for TensorRT (with calibration data)."""

    name = "gpu"
    description = "ONNX Runtime CUDA / TensorRT: fp16 model.onnx and int8 QDQ model.int8.qdq.onnx"
    providers = CUDA

    def default_passes(self, ctx: TargetContext) -> list[dict[str, Any]]:
        return [{"name": "cleanup"}, {"name": "optimize.ort", "level": "basic"}, {"name": "fp16"}]

    def variants(self, ctx: TargetContext) -> list[Variant]:
        models = [Variant("main", self.passes(ctx))]
        if ctx.has_calibration:
            int8 = [{"name": "cleanup"}, {"name": "optimize.ort", "level": "basic"}, {"name": "quantize.tensorrt"}]
            models.append(Variant("int8", list(ctx.spec.int8_passes) if ctx.spec.int8_passes is not None else int8))
        return models

    def emit(self, model: ir.Model, folder: Path, ctx: TargetContext, variant: str = "main") -> Emitted:
        shapes = _trt_shapes(model)
        if variant == "main":
            save(deployable(model), folder / FP16_FILE)
            _write_options(folder, ctx.has_calibration, shapes)
            gpu = {
                "precision": "fp16 (float32 inputs/outputs)",
                "provider_options": OPTIONS,
                "trtexec": f"trtexec --onnx={FP16_FILE} --stronglyTyped {shapes['trtexec']} --saveEngine=model.fp16.plan".replace("  ", " "),
                "checked_on": _checked_on(),
            }
            if not ctx.has_calibration:
                gpu["int8"] = "not built: TensorRT int8 needs calibration data (data.calibration in the recipe)"
            return Emitted(FP16_FILE, list(CUDA), extras={"gpu": gpu})
        record = pop_ranges(model)
        save(deployable(model), folder / INT8_FILE)
        cache = _write_cache(folder, model, record, ctx) if record else None
        if cache:
            _add_legacy_options(folder, shapes)
        gpu = {
            "precision": "int8 QDQ (symmetric, int8 zero points, per-channel weights; float32 inputs/outputs)",
            "primary_int8_artifact": f"{INT8_FILE}: explicit quantization, the form TensorRT 10.1+ and 11 take (--stronglyTyped)",
            "trtexec": f"trtexec --onnx={INT8_FILE} --stronglyTyped {shapes['trtexec']} --saveEngine=model.int8.plan".replace("  ", " "),
            "calibration_cache": cache,
            "checked_on": _checked_on(),
        }
        return Emitted(INT8_FILE, list(TRT), extras={"gpu": gpu})


def _write_cache(folder: Path, model: ir.Model, record: dict, ctx: TargetContext) -> dict:
    """model.fp32.onnx + trt_cache/calibration.cache (TensorRT-native, naming that model's tensors) + calibration.json."""
    quantized = {n.inputs[0].name for n in model.graph if n.op_type == "QuantizeLinear" and not n.inputs[0].is_initializer()}
    fp32 = load(Path(record["fp32_model_path"]))  # the graph the calibration ran on
    if (version := compat.requested(ctx.spec.runtime)) is not None:
        fp32, _ = compat.cap(fp32, version)  # loadable by the same runtime as the QDQ model
    save(deployable(fp32), folder / FP32_FILE)
    names = {v.name for node in fp32.graph.all_nodes() for v in (*node.inputs, *node.outputs) if v is not None}
    names |= {v.name for v in fp32.graph.inputs}
    ranges = {k: v for k, v in record["ranges"].items() if k in names}
    if len(ranges) < len(record["ranges"]):
        logger.warning("calibration cache: %d ranges name no tensor of %s; left out", len(record["ranges"]) - len(ranges), FP32_FILE)
    (folder / ENGINE_CACHE).mkdir(exist_ok=True)
    scales = write_cache(folder / CACHE, ranges)
    fp32_sha = sha256_file(folder / FP32_FILE)
    info = {
        "format": f"TensorRT native calibration cache ({HEADER}); scale = amax / 127, amax = max(|min|, |max|)",
        "model": FP32_FILE,
        "fp32_model_sha256": fp32_sha,
        "calibration_method": record["method"],
        "calibration_samples": record["samples"],
        "edgepipe_version": VERSION,
        "tensors": {
            name: {"min": lo, "max": hi, "amax": amax(lo, hi), "scale": scales[name], "quantized_in_qdq_model": name in quantized}
            for name, (lo, hi) in sorted(ranges.items())
        },
    }
    (folder / CACHE_INFO).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    return {
        "file": CACHE,
        "model": FP32_FILE,
        "sidecar": CACHE_INFO,
        "for": "TensorRT <= 10 implicit INT8 and ORT's TensorRT provider (trt_int8_use_native_calibration_table); "
        "TensorRT 10.1 deprecates calibration and 11 removes it: use the QDQ model there",
        "applies_to": f"{FP32_FILE} (sha256 {fp32_sha}): the float32 graph before quantization, whose tensors the cache names",
        "calibration_method": record["method"],
        "calibration_samples": record["samples"],
        "tensors": len(scales),
        "quantized_tensors_covered": len(quantized & set(scales)),
    }


def _trt_shapes(model: ir.Model) -> dict[str, str]:
    """min/opt/max profiles for dynamic inputs (1 / 8 / 64 on each dynamic dim), for trtexec and the TRT EP."""
    prof: dict[str, list[str]] = {"min": [], "opt": [], "max": []}
    dynamic = False
    for value in model.graph.inputs:
        dims = list(value.shape or [])
        for key, size in (("min", 1), ("opt", 8), ("max", 64)):
            prof[key].append(f"{value.name}:" + "x".join(str(d) if isinstance(d, int) else str(size) for d in dims))
        dynamic |= any(not isinstance(d, int) for d in dims)
    joined = {k: ",".join(v) for k, v in prof.items()}
    flags = f"--minShapes={joined['min']} --optShapes={joined['opt']} --maxShapes={joined['max']}" if dynamic else ""
    return {"trtexec": flags, **({f"trt_profile_{k}_shapes": v for k, v in joined.items()} if dynamic else {})}


def _trt_options(shapes: dict[str, str]) -> dict[str, Any]:
    profile = {k: v for k, v in shapes.items() if k.startswith("trt_profile")}
    return {"device_id": 0, "trt_engine_cache_enable": True, "trt_engine_cache_path": ENGINE_CACHE,
            "trt_timing_cache_enable": True, **profile}


def _write_options(folder: Path, int8: bool, shapes: dict[str, str]) -> None:
    trt = _trt_options(shapes)
    options: dict[str, Any] = {
        FP16_FILE: [["CUDAExecutionProvider", {"device_id": 0}], ["CPUExecutionProvider", {}]],
        f"{FP16_FILE} (TensorRT)": [["TensorrtExecutionProvider", {**trt, "trt_fp16_enable": True}],
                                     ["CUDAExecutionProvider", {"device_id": 0}], ["CPUExecutionProvider", {}]],
    }
    if int8:
        options[INT8_FILE] = [["TensorrtExecutionProvider", {**trt, "trt_int8_enable": True, "trt_fp16_enable": True}],
                              ["CUDAExecutionProvider", {"device_id": 0}], ["CPUExecutionProvider", {}]]
    (folder / OPTIONS).write_text(json.dumps(options, indent=2) + "\n", encoding="utf-8")


def _add_legacy_options(folder: Path, shapes: dict[str, str]) -> None:
    """Implicit INT8 (TensorRT <= 10): the float32 model with the cache the provider reads from its engine cache folder."""
    options = json.loads((folder / OPTIONS).read_text(encoding="utf-8"))
    options[FP32_FILE] = [[
        "TensorrtExecutionProvider",
        {**_trt_options(shapes), "trt_int8_enable": True, "trt_int8_calibration_table_name": CACHE_NAME,
         "trt_int8_use_native_calibration_table": True},
    ], ["CUDAExecutionProvider", {"device_id": 0}], ["CPUExecutionProvider", {}]]
    (folder / OPTIONS).write_text(json.dumps(options, indent=2) + "\n", encoding="utf-8")


def _checked_on() -> str:
    available = ort.get_available_providers()
    if "CUDAExecutionProvider" in available:
        return f"onnxruntime {ort.__version__} with CUDAExecutionProvider"
    return f"onnxruntime {ort.__version__} on CPUExecutionProvider: this build has no CUDA provider (available: {', '.join(available)})"
