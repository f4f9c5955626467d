"""gpu: ONNX Runtime CUDA / TensorRT — an fp16 model and a TensorRT-style int8 QDQ model in one folder."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import onnx_ir as ir
import onnxruntime as ort

from edgepipe.core.version import VERSION
from edgepipe.passes.base import save
from edgepipe.passes.tensorrt import pop_ranges
from edgepipe.targets.base import Emitted, Target, TargetContext, Variant, deployable
from edgepipe.targets.trtcache import HEADER, amax, write_cache

FP16_FILE = "model.onnx"
INT8_FILE = "model.int8.qdq.onnx"
CACHE = "calibration.cache"
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
        cache = _write_cache(folder, model, record) if record else None
        gpu = {
            "precision": "int8 QDQ (symmetric, int8 zero points, per-channel weights; float32 inputs/outputs)",
            "primary_int8_artifact": f"{INT8_FILE}: explicit quantization, the form TensorRT 10.1+ and 11 take (--stronglyTyped)",
            "trtexec": f"trtexec --onnx={INT8_FILE} --stronglyTyped {shapes['trtexec']} --saveEngine=model.int8.plan".replace("  ", " "),
            "calibration_cache": cache,
            "checked_on": _checked_on(),
        }
        return Emitted(INT8_FILE, list(TRT), extras={"gpu": gpu})


def _write_cache(folder: Path, model: ir.Model, record: dict) -> dict:
    """calibration.cache (TensorRT-native) + calibration.json (what the numbers are and where they came from)."""
    quantized = {n.inputs[0].name for n in model.graph if n.op_type == "QuantizeLinear" and not n.inputs[0].is_initializer()}
    scales = write_cache(folder / CACHE, record["ranges"])
    info = {
        "format": f"TensorRT native calibration cache ({HEADER}); scale = amax / 127, amax = max(|min|, |max|)",
        "fp32_model_sha256": record["fp32_model_sha256"],
        "calibration_method": record["method"],
        "calibration_samples": record["samples"],
        "edgepipe_version": VERSION,
        "tensors": {
            name: {"min": lo, "max": hi, "amax": amax(lo, hi), "scale": scales[name], "quantized_in_qdq_model": name in quantized}
            for name, (lo, hi) in sorted(record["ranges"].items())
        },
    }
    (folder / CACHE_INFO).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    return {
        "file": CACHE,
        "sidecar": CACHE_INFO,
        "for": "TensorRT <= 10 implicit INT8 and ORT's TensorRT provider (trt_int8_use_native_calibration_table); "
        "TensorRT 10.1 deprecates calibration and 11 removes it: use the QDQ model there",
        "applies_to": f"the float32 graph with sha256 {record['fp32_model_sha256']} (tensor names of the model before quantization)",
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


def _write_options(folder: Path, int8: bool, shapes: dict[str, str]) -> None:
    profile = {k: v for k, v in shapes.items() if k.startswith("trt_profile")}
    trt = {"device_id": 0, "trt_engine_cache_enable": True, "trt_engine_cache_path": "trt_cache",
           "trt_timing_cache_enable": True, **profile}
    options: dict[str, Any] = {
        FP16_FILE: [["CUDAExecutionProvider", {"device_id": 0}], ["CPUExecutionProvider", {}]],
        f"{FP16_FILE} (TensorRT)": [["TensorrtExecutionProvider", {**trt, "trt_fp16_enable": True}],
                                     ["CUDAExecutionProvider", {"device_id": 0}], ["CPUExecutionProvider", {}]],
    }
    if int8:
        options[INT8_FILE] = [["TensorrtExecutionProvider", {**trt, "trt_int8_enable": True, "trt_fp16_enable": True}],
                              ["CUDAExecutionProvider", {"device_id": 0}], ["CPUExecutionProvider", {}]]
        options["float32 model + calibration.cache (TensorRT <= 10, legacy)"] = [[
            "TensorrtExecutionProvider",
            {**trt, "trt_int8_enable": True, "trt_int8_calibration_table_name": CACHE, "trt_int8_use_native_calibration_table": True},
        ]]
    (folder / OPTIONS).write_text(json.dumps(options, indent=2) + "\n", encoding="utf-8")


def _checked_on() -> str:
    available = ort.get_available_providers()
    if "CUDAExecutionProvider" in available:
        return f"onnxruntime {ort.__version__} with CUDAExecutionProvider"
    return f"onnxruntime {ort.__version__} on CPUExecutionProvider: this build has no CUDA provider (available: {', '.join(available)})"
