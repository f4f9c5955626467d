"""Build warnings a deployment team should see: weak data, and int8 that is not faster than float."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import numpy as np
import onnx

MIN_CALIBRATION = 64  # fewer samples than this give noisy activation ranges
INT8_KERNELS = {"MatMulInteger", "ConvInteger", "QLinearConv", "QLinearMatMul", "QAttention", "QGemm", "DynamicQuantizeMatMul", "MatMulIntegerToFloat"}
QUANT_IO = {"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear"}


def data_warnings(eval_origin: str, calibration: Callable[[], Iterable[dict[str, np.ndarray]]] | None, quantized: bool) -> list[str]:
    """Warnings for synthetic evaluation data and for missing or too little calibration data."""
    out = []
    if eval_origin == "synthetic":
        out.append("accuracy was measured on synthetic random inputs (no data.eval or data.calibration): "
                   "it says nothing about real inputs; give real eval data")
    elif eval_origin == "calibration":
        out.append("accuracy was measured on the calibration data (no data.eval): give held-out eval data")
    if quantized and calibration is not None:
        n = sum(len(next(iter(b.values()))) for b in calibration() if b)
        if n < MIN_CALIBRATION:
            out.append(f"only {n} calibration samples (fewer than {MIN_CALIBRATION}): activation ranges may be off; give more")
    return out


CPU = "CPUExecutionProvider"


def emulated(intended: Sequence[str], ran: Sequence[str]) -> bool:
    """Timed on a fallback: the provider the artifact is built for (e.g. TensorRT) did not run here."""
    return bool(intended) and bool(ran) and intended[0] != ran[0]


def speed_note(intended: Sequence[str], ran: Sequence[str], int8_ms: float, float_ms: float) -> str | None:
    """For a model timed on a fallback provider: why its int8 timing says nothing about the target runtime."""
    if not emulated(intended, ran):
        return None
    return (f"timed on {ran[0]}, not {intended[0]} it is built for (not available here): its Q/DQ int8 runs emulated, "
            f"so int8 {int8_ms:.2f} ms vs float32 {float_ms:.2f} ms p50 (batch 1) is expected and not a defect; "
            f"time it on {intended[0]} (e.g. trtexec)")


def speed_warning(model_path: Path, int8_ms: float, float_ms: float, intended: Sequence[str] = (CPU,),
                  ran: Sequence[str] = (CPU,)) -> str | None:
    """When a quantized artifact is not faster than float on the runtime it is built for, say so and name the
    likely cause; None when faster, or when timed on a fallback provider (``speed_note`` says why)."""
    if int8_ms < float_ms or emulated(intended, ran):
        return None
    head = f"int8 artifact is not faster than float32 ({int8_ms:.2f} ms vs {float_ms:.2f} ms p50, batch 1)"
    if model_path.suffix == ".ort":  # ORT format is a flatbuffer, not an ONNX protobuf: no graph to read here
        return head + "; see the mobile usability report for nodes the runtime cannot accelerate"
    model = onnx.load(str(model_path), load_external_data=False)
    ops = Counter(n.op_type for n in model.graph.node)
    producer = {o: n.op_type for n in model.graph.node for o in n.output}
    # DequantizeLinear feeding a float op that ORT cannot fuse with it: the int8 path is not used
    dq_to_float = Counter(
        n.op_type for n in model.graph.node
        if n.op_type not in QUANT_IO | INT8_KERNELS and any(producer.get(i) == "DequantizeLinear" for i in n.input)
    )
    causes = []
    if ops["QuantizeLinear"] or ops["DequantizeLinear"]:
        causes.append(f"{ops['QuantizeLinear']} QuantizeLinear / {ops['DequantizeLinear']} DequantizeLinear nodes "
                      f"(ops reading dequantized values: {dict(dq_to_float.most_common(4))})")
    if ops["DynamicQuantizeLinear"]:
        causes.append(f"{ops['DynamicQuantizeLinear']} run-time activation quantizations")
    kernels = sum(ops[o] for o in INT8_KERNELS)
    causes.append(f"{kernels} int8 kernels in the graph")
    return f"{head}: " + "; ".join(causes)
