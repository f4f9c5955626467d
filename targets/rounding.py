"""How far a quantized model's outputs move when its float kernels round differently: the golden tolerance a
model needs to pass on another onnxruntime release (a runtime cap's release) than the one that built it.

A quantizer (DynamicQuantizeLinear, QuantizeLinear, ...) turns a float value that sits near a rounding boundary
into a whole quantization step on one side or the other, and a dynamic one also recomputes its scale from the
values. Two releases whose float kernels differ by one float32 rounding (onnxruntime 1.17.3 and 1.32's
LayerNormalization on MiniLM, found by benchmarks/runtime_caps.py) then give int8 outputs that differ by several
quantization steps: 0.005 on MiniLM's embeddings against a golden atol of 0.0019. This module measures that
amplification on the model itself: every quantizer's float input moves by about one unit in the last place
(per element, pseudo-random sign), and the outputs' largest change over a few draws is the spread.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from edgepipe.core.runtime import Runner, run_batches

# float input 0 of these is quantized (ai.onnx and ORT's contrib ops)
QUANTIZERS = {("", "DynamicQuantizeLinear"), ("", "QuantizeLinear"), ("com.microsoft", "QuantizeLinear"),
              ("com.microsoft", "DynamicQuantizeMatMul"), ("com.microsoft", "QAttention"),
              ("com.microsoft", "DynamicQuantizeLSTM")}
ULPS = 1.0  # relative size of the move: float32 epsilon (one unit in the last place of a value in [1, 2))
DRAWS = 3  # different pseudo-random patterns; the spread is the largest change over them
MARGIN = 2.0  # the tolerance covers twice the spread: kernels that differ by more than one rounding
# measured on MiniLM int8 (benchmarks/RESULTS.md): draws give 0.0045-0.0055, onnxruntime 1.17.3 / 1.15.1 gave 0.0051


def quantized_inputs(model: onnx.ModelProto) -> list[str]:
    """Float tensors the top-level graph quantizes, computed inside the graph (a model input or a weight is the
    same bytes in every release)."""
    fixed = {i.name for i in model.graph.input} | {i.name for i in model.graph.initializer}
    inits = {i.name: i for i in model.graph.initializer}
    names = []
    for node in model.graph.node:
        if (node.domain or "", node.op_type) not in QUANTIZERS or not node.input or node.input[0] in fixed:
            continue
        if node.op_type == "QuantizeLinear":  # float32 only (its input has the scale's type)
            scale = inits.get(node.input[1]) if len(node.input) > 1 else None
            if scale is None or scale.data_type != onnx.TensorProto.FLOAT:
                continue
        names.append(node.input[0])
    return list(dict.fromkeys(names))


def perturbed(model: onnx.ModelProto, names: list[str], draw: int) -> onnx.ModelProto:
    """A copy where each tensor in ``names`` becomes x + x·ε·sin(x·f) before its quantizers read it: about one
    rounding on each element, signs pseudo-random per element and per draw (f differs); other readers unchanged."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    freq = numpy_helper.from_array(np.array(7919.0 * (1 + 0.618 * draw), np.float32), "__ulp_freq")
    eps = numpy_helper.from_array(np.array(ULPS * np.finfo(np.float32).eps, np.float32), "__ulp_eps")
    graph.initializer.extend([freq, eps])
    wanted = set(names)
    nodes: list[onnx.NodeProto] = []
    done: dict[str, str] = {}
    for node in graph.node:
        x = node.input[0] if node.input else ""
        if x in wanted and (node.domain or "", node.op_type) in QUANTIZERS:
            if x not in done:
                p = f"{x}__ulp"
                nodes += [helper.make_node("Mul", [x, "__ulp_freq"], [p + "_f"]),
                          helper.make_node("Sin", [p + "_f"], [p + "_s"]),
                          helper.make_node("Mul", [p + "_s", "__ulp_eps"], [p + "_e"]),
                          helper.make_node("Mul", [x, p + "_e"], [p + "_d"]),
                          helper.make_node("Add", [x, p + "_d"], [p])]
                done[x] = p
            node.input[0] = done[x]
        nodes.append(node)
    del graph.node[:]
    graph.node.extend(nodes)
    return out


def _outputs(model: onnx.ModelProto, folder: Path, feed: dict[str, np.ndarray], providers: list[str],
             session_config: dict[str, str] | None) -> dict[str, np.ndarray]:
    path = folder / "probe.onnx"
    large = model.ByteSize() > 1_500_000_000
    onnx.save_model(model, str(path), save_as_external_data=large, location="probe.onnx.data")
    runner = Runner(path, providers=providers, session_config=session_config)
    return run_batches(runner, [(feed, None)])


def spread(model: onnx.ModelProto, feed: dict[str, np.ndarray], providers: list[str] | None = None,
           session_config: dict[str, str] | None = None, draws: int = DRAWS) -> dict | None:
    """The largest |change| of any output over ``draws`` one-rounding moves of every quantizer's input, run as the
    model itself runs (providers, session config, ORT's default optimizations). None for a model with no quantizer."""
    names = quantized_inputs(model)
    if not names:
        return None
    providers = providers or ["CPUExecutionProvider"]
    with tempfile.TemporaryDirectory(prefix="edgepipe-rounding-") as tmp:
        folder = Path(tmp)
        base = _outputs(model, folder, feed, providers, session_config)
        worst = []
        for draw in range(draws):
            got = _outputs(perturbed(model, names, draw), folder, feed, providers, session_config)
            worst.append(max(float(np.abs(got[k].astype(np.float64) - base[k].astype(np.float64)).max(initial=0.0))
                             for k in base))
    return {"quantizers": len(names), "ulps": ULPS, "draws": draws, "max_abs_diff": max(worst),
            "atol": MARGIN * max(worst), "margin": MARGIN}
