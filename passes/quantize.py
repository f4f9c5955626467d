"""quantize.dynamic / quantize.static: int8 through onnxruntime.quantization (file in, file out)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import ClassVar, Literal

import onnx_ir as ir
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quant_pre_process,
    quantize_dynamic,
    quantize_static,
)
from pydantic import model_validator

from edgepipe.core.errors import BadInput
from edgepipe.core.logs import quiet
from edgepipe.passes.base import Batch, EdgepipePass, PassConfig, StatsResult, clone, is_large, load, save
from edgepipe.passes.bias_correction import correct_biases
from edgepipe.passes.calib_mse import calibrate as mse_calibrate
from edgepipe.passes.float_guard import attention_mask_nodes, index_nodes, name_nodes

CALIBRATION = {
    "minmax": CalibrationMethod.MinMax,
    "entropy": CalibrationMethod.Entropy,
    "percentile": CalibrationMethod.Percentile,
    "mse": CalibrationMethod.Percentile,  # ranges from passes/calib_mse.py, handed over as a Percentile cache
}
INT8 = {"int8": QuantType.QInt8, "uint8": QuantType.QUInt8}


class DynamicConfig(PassConfig):
    per_channel: bool = True
    reduce_range: bool = True
    weight_type: Literal["int8", "uint8"] = "int8"
    op_types: list[str] | None = None
    nodes_to_exclude: list[str] = []
    preprocess: bool = False


class StaticConfig(PassConfig):
    # mse: per tensor, the range with the least expected uint8 error over its histogram (passes/calib_mse.py)
    calibration: Literal["minmax", "entropy", "percentile", "mse"] = "minmax"
    per_channel: bool = True
    activation_type: Literal["int8", "uint8"] = "uint8"
    weight_type: Literal["int8", "uint8"] = "int8"
    symmetric_activations: bool = False
    symmetric_weights: bool = True
    op_types: list[str] | None = None
    nodes_to_exclude: list[str] = []
    max_samples: int = 512
    preprocess: bool = False
    extra_options: dict[str, bool | int | float | str] = {}
    # Keep attention-mask paths (a float-min/-1e4/-inf constant reaching Softmax) in float.
    keep_attention_mask_float: bool = True
    mask_threshold: float = 1e4
    # Empirical bias correction (passes/bias_correction.py): Conv/Gemm biases moved so each output channel's mean
    # on the calibration data matches float, layer by layer (one calibration run per Conv/Gemm). Off by default.
    bias_correction: bool = False
    QUIET_DEFAULTS: ClassVar[frozenset[str]] = frozenset({"bias_correction"})  # added after artifacts were published

    @model_validator(mode="after")
    def _mse_activations(self) -> StaticConfig:
        """calibration: mse searches uint8 asymmetric ranges: another activation form fails when the recipe loads."""
        if self.calibration == "mse" and (self.activation_type != "uint8" or self.symmetric_activations):
            raise ValueError("calibration: mse chooses uint8 asymmetric activation ranges: use activation_type: uint8, "
                             "symmetric_activations: false, or another calibration")
        return self


class _Reader(CalibrationDataReader):
    """Feeds calibration batches to ORT, capped at ``max_samples`` samples."""

    def __init__(self, batches: Iterator[Batch], max_samples: int, input_names: set[str]) -> None:
        self._batches = batches
        self._left = max_samples
        self._names = input_names
        self.samples = 0

    def get_next(self) -> dict | None:
        if self._left <= 0:
            return None
        batch = next(self._batches, None)
        if batch is None:
            return None
        feed = {k: v for k, v in batch.items() if k in self._names}
        n = len(next(iter(feed.values())))
        self._left -= n
        self.samples += n
        return feed


def _prepare(model: ir.Model, folder: Path, preprocess: bool) -> Path:
    src = save(model, folder / "in.onnx")
    if not preprocess:
        return src
    prep = folder / "prep.onnx"
    try:
        quant_pre_process(str(src), str(prep))
    except Exception:  # symbolic shape inference fails on some transformer graphs
        quant_pre_process(str(src), str(prep), skip_symbolic_shape=True)
    return prep


QUANT_OPS = {
    "QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "MatMulInteger", "ConvInteger",
    "QLinearConv", "QLinearMatMul", "MatMulNBits", "GatherBlockQuantized",
}


def _quantized_nodes(model: ir.Model) -> int:
    return sum(1 for n in model.graph.all_nodes() if n.op_type in QUANT_OPS)


def _already_quantized(model: ir.Model) -> StatsResult | None:
    """Quantizing twice is an error in ORT; a pass must be idempotent, so it is a no-op."""
    count = _quantized_nodes(model)
    if count:
        return StatsResult(clone(model), modified=False, stats={"skipped": f"already quantized ({count} quantized nodes)"})
    return None


class QuantizeDynamic(EdgepipePass):
    """Dynamic int8: weights quantized offline, activations at run time (no data needed)."""

    name = "quantize.dynamic"
    Config = DynamicConfig

    def call(self, model: ir.Model) -> StatsResult:
        c = self.config
        if (done := _already_quantized(model)) is not None:
            return done
        folder = self.context.scratch("qdyn")
        src = _prepare(model, folder, c.preprocess)
        out = folder / "out.onnx"
        with quiet():
            quantize_dynamic(
                src,
                out,
                op_types_to_quantize=c.op_types,
                per_channel=c.per_channel,
                reduce_range=c.reduce_range,
                weight_type=INT8[c.weight_type],
                nodes_to_exclude=list(c.nodes_to_exclude),
                use_external_data_format=is_large(model),
                extra_options={"DefaultTensorType": 1},  # FLOAT, for fused graphs without full types
            )
        result = load(out)
        return StatsResult(result, modified=True, stats={"quantized_nodes": _quantized_nodes(result)})


class QuantizeStatic(EdgepipePass):
    """Static int8 QDQ: activation ranges from calibration data, per-channel weights."""

    name = "quantize.static"
    Config = StaticConfig

    def call(self, model: ir.Model) -> StatsResult:
        c = self.config
        if (done := _already_quantized(model)) is not None:
            return done
        self.require_calibration()
        folder = self.context.scratch("qstatic")
        named = clone(model)
        name_nodes(named)  # ORT excludes by node name
        src = _prepare(named, folder, c.preprocess)
        out = folder / "out.onnx"
        exclude = list(c.nodes_to_exclude)
        graph = load(src) if c.preprocess else named
        kept = index_nodes(graph)  # positions/buckets computed in float: never activations worth int8
        if c.keep_attention_mask_float:
            kept = {**kept, **attention_mask_nodes(graph, c.mask_threshold)}
        exclude += [n for n in kept if n not in exclude]
        reader = _Reader(iter(self.context.calibration()), c.max_samples, {v.name for v in model.graph.inputs})
        extra = {
            "ActivationSymmetric": c.symmetric_activations,
            "WeightSymmetric": c.symmetric_weights,
            **c.extra_options,
        }
        cache, ranged = None, {}
        if c.calibration == "mse":  # uint8 asymmetric activations: StaticConfig checked
            cache, count = mse_calibrate(src, reader, c.op_types, folder, is_large(model))
            ranged = {"mse_ranges": count}
            if reader.samples == 0:
                raise BadInput("calibration data is empty: data.calibration yielded no batches")
        with quiet():
            quantize_static(
                src,
                out,
                reader,
                quant_format=QuantFormat.QDQ,
                op_types_to_quantize=c.op_types,
                per_channel=c.per_channel,
                activation_type=INT8[c.activation_type],
                weight_type=INT8[c.weight_type],
                nodes_to_exclude=exclude,
                calibrate_method=CALIBRATION[c.calibration],
                use_external_data_format=is_large(model),
                extra_options=extra,
                calibration_cache_path=cache,
            )
        if reader.samples == 0:
            raise BadInput("calibration data is empty: data.calibration yielded no batches")
        result = load(out)
        stats = {"quantized_nodes": _quantized_nodes(result), "calibration_samples": reader.samples, **ranged}
        if c.bias_correction:
            stats.update(correct_biases(graph, result, self.context.calibration, c.max_samples, folder))
        if kept:
            stats["kept_float"] = kept
        return StatsResult(result, modified=True, stats=stats)
