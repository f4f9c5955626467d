"""quantize.tensorrt: int8 QDQ in TensorRT's explicit-quantization form, keeping the calibration ranges."""

from __future__ import annotations

import hashlib
import inspect
import json
from typing import Literal

import numpy as np
import onnx_ir as ir
from onnxruntime.quantization import QuantFormat, QuantType, quantize_static
from onnxruntime.quantization.calibrate import load_tensors_data
from pydantic import Field

from edgepipe.core.errors import BadInput
from edgepipe.core.logs import quiet
from edgepipe.passes.base import EdgepipePass, PassConfig, StatsResult, load, save
from edgepipe.passes.quantize import CALIBRATION, _already_quantized, _quantized_nodes, _Reader

# The ranges travel with the model (one metadata entry) so the target that writes the
# calibration cache uses exactly the numbers the QDQ scales came from; it strips the entry.
RANGES_KEY = "edgepipe.calibration_ranges"


class TensorRtConfig(PassConfig):
    calibration: Literal["minmax", "entropy", "percentile"] = "minmax"
    per_channel: bool = True
    # TensorRT quantizes the inputs of weighted ops; their outputs stay unquantized by default.
    op_types: list[str] = ["Conv", "ConvTranspose", "Gemm", "MatMul"]
    nodes_to_exclude: list[str] = []
    max_samples: int = Field(default=512, ge=1)


class QuantizeTensorRt(EdgepipePass):
    """Symmetric int8 QDQ (int8 zero points, per-channel weights) as TensorRT's explicit quantization takes it.

    Options follow NVIDIA's Q/DQ placement guidance: symmetric activations and weights,
    Relu/Clip kept explicit (QDQKeepRemovableActivations), one Q/DQ pair per consumer
    (DedicatedQDQPair), float bias (TensorRT fuses it), MatMul quantized only with a constant B.
    """

    name = "quantize.tensorrt"
    Config = TensorRtConfig

    def call(self, model: ir.Model) -> StatsResult:
        c = self.config
        if (done := _already_quantized(model)) is not None:
            return done
        self.require_calibration()
        if "calibration_cache_path" not in inspect.signature(quantize_static).parameters:
            raise BadInput(f"{self.name} needs onnxruntime >= 1.32 (quantize_static's calibration_cache_path)")
        folder = self.context.scratch("qtrt")
        src = save(model, folder / "in.onnx")
        ranges_file = folder / "ranges.json"
        reader = _Reader(iter(self.context.calibration()), c.max_samples, {v.name for v in model.graph.inputs})
        with quiet():
            quantize_static(
                src,
                folder / "out.onnx",
                reader,
                quant_format=QuantFormat.QDQ,
                op_types_to_quantize=list(c.op_types),
                per_channel=c.per_channel,
                activation_type=QuantType.QInt8,
                weight_type=QuantType.QInt8,
                nodes_to_exclude=list(c.nodes_to_exclude),
                calibrate_method=CALIBRATION[c.calibration],
                calibration_cache_path=ranges_file,
                extra_options={
                    "ActivationSymmetric": True,
                    "WeightSymmetric": True,
                    "QDQKeepRemovableActivations": True,
                    "DedicatedQDQPair": True,
                    "QuantizeBias": False,
                    "MatMulConstBOnly": True,
                    # TensorRT: quantize the inputs of weighted ops, not their outputs.
                    "OpTypesToExcludeOutputQuantization": list(c.op_types),
                },
            )
        if reader.samples == 0:
            raise BadInput("calibration data is empty: data.calibration yielded no batches")
        result = load(folder / "out.onnx")
        data = load_tensors_data(ranges_file)
        ranges = {name: [float(np.min(td.range_value[0])), float(np.max(td.range_value[1]))] for name, td in data.items()}
        result.metadata_props[RANGES_KEY] = json.dumps({
            "method": c.calibration,
            "samples": reader.samples,
            "fp32_model_sha256": hashlib.sha256(src.read_bytes()).hexdigest(),
            "fp32_model_path": str(src),  # the graph the ranges name: the gpu target ships it beside the cache
            "ranges": ranges,
        })
        stats = {"quantized_nodes": _quantized_nodes(result), "calibration_samples": reader.samples, "calibrated_tensors": len(ranges)}
        return StatsResult(result, modified=True, stats=stats)


def pop_ranges(model: ir.Model) -> dict | None:
    """The calibration record a quantize.tensorrt pass left on the model (removed from it)."""
    text = model.metadata_props.pop(RANGES_KEY, None)
    return json.loads(text) if text else None
