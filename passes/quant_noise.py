"""Rank the nodes of a QDQ int8 graph by the quantization noise they read: one probe run, no per-node evaluation.

For each node the quantizer changed, every input it now reads through a DequantizeLinear is compared with
the float tensor that was quantized (the activation as the int8 graph computed it, or the float weight):
noise = ||dq(q(x)) - x||² / ||x||², summed over the node's inputs. That is the error the node stops reading
when it is kept in float (``autoquant.keep_float``), measured in one run of the int8 graph on a few
calibration samples, where a per-node sensitivity needs one evaluation per node (ViT-B/16: ~150 runs).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper

from edgepipe.core.runtime import exposed
from edgepipe.passes.base import Batch

logger = logging.getLogger(__name__)


def pairs(fproto: onnx.ModelProto, qproto: onnx.ModelProto, nodes: list[onnx.NodeProto]) -> dict[str, list[tuple[str, str]]] | None:
    """Per node: (float tensor, the DequantizeLinear output the int8 graph feeds in its place) for each changed input.

    None when the int8 graph is not QDQ (another op type in a node's place: dynamic quantization's MatMulInteger).
    """
    producer = {o: n for n in qproto.graph.node for o in n.output}
    found: dict[str, list[tuple[str, str]]] = {}
    for node in nodes:
        q = producer.get(node.output[0])
        if q is None or q.op_type != node.op_type or len(q.input) != len(node.input):
            return None
        found[node.name] = [
            (f, qi) for f, qi in zip(node.input, q.input, strict=True)
            if f and qi != f and qi in producer and producer[qi].op_type == "DequantizeLinear"
        ]
    return found


def noise(fproto: onnx.ModelProto, qproto: onnx.ModelProto, nodes: list[onnx.NodeProto], batches: Iterable[Batch],
          max_samples: int, workdir: Path | None = None) -> list[float] | None:
    """Quantization noise each node reads in the int8 graph (see the module doc), in order; None if not QDQ."""
    found = pairs(fproto, qproto, nodes)
    if found is None:
        return None
    weights = {i.name: i for i in fproto.graph.initializer}
    inputs = {i.name for i in qproto.graph.input}
    names = [n for pair in found.values() for f, q in pair for n in (q, f) if n not in weights and n not in inputs]
    err: dict[tuple[str, str], float] = {}
    energy: dict[tuple[str, str], float] = {}
    for feed, out in exposed(qproto, names, batches, workdir=workdir, max_samples=max_samples,
                                opt_level=ort.GraphOptimizationLevel.ORT_DISABLE_ALL):
        values = {**feed, **out}
        for pair in found.values():
            for f, q in pair:
                ref = numpy_helper.to_array(weights[f]) if f in weights else values.get(f)
                got = values.get(q)
                if ref is None or got is None or ref.shape != got.shape:
                    continue
                ref64, got64 = ref.astype(np.float64), got.astype(np.float64)
                err[f, q] = err.get((f, q), 0.0) + float(np.sum((got64 - ref64) ** 2))
                energy[f, q] = energy.get((f, q), 0.0) + float(np.sum(ref64**2))
    return [sum(err.get(p, 0.0) / max(energy.get(p, 0.0), 1e-30) for p in found[node.name]) for node in nodes]
