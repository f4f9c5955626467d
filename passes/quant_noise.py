"""Rank the nodes of a QDQ int8 graph by the error each adds: one probe run, no per-node evaluation.

Each node the quantizer changed is copied into the int8 graph once more, in float: the copy reads the float
tensors the int8 graph computes (what the node reads once ``autoquant.keep_float`` restores it) and the float
weights. One run of that graph on a few calibration samples gives, per node, the error its int8 form adds,
||y_int8 - y_float||² / ||y_float||² at its output: what keeping it alone in float removes. A per-node
sensitivity needs one evaluation per node instead (ViT-B/16: ~150 model runs with a session each).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from edgepipe.core.runtime import exposed
from edgepipe.passes.base import Batch

logger = logging.getLogger(__name__)
FLOAT = "__edgepipe_float"


def with_float_copies(fproto: onnx.ModelProto, qproto: onnx.ModelProto, nodes: list[onnx.NodeProto]) -> tuple[onnx.ModelProto, dict[str, tuple[str, str]]]:
    """The int8 graph plus a float copy of each node (outputs and float weights renamed), and per node the
    (int8 output, float copy's output) pair; a node reading a tensor the int8 graph lacks gets no copy."""
    out = onnx.ModelProto()
    out.CopyFrom(qproto)
    graph = out.graph
    defined = {i.name for i in graph.input} | {o for n in graph.node for o in n.output}
    weights = {i.name: i for i in fproto.graph.initializer}
    added: set[str] = set()
    compared: dict[str, tuple[str, str]] = {}
    for node in nodes:
        if not node.output or node.output[0] not in defined:
            continue
        inputs = []
        for name in node.input:
            if name in weights:  # the float weight under its own name: the int8 graph may reuse the name (a DQ'd bias)
                if name not in added:
                    tensor = onnx.TensorProto()
                    tensor.CopyFrom(weights[name])
                    tensor.name = name + FLOAT
                    graph.initializer.append(tensor)
                    added.add(name)
                inputs.append(name + FLOAT)
            elif not name or name in defined:
                inputs.append(name)
            else:
                break
        else:
            copy = onnx.NodeProto()
            copy.CopyFrom(node)
            copy.name = f"{node.name}{FLOAT}{len(compared)}"  # unique even where names are not
            del copy.input[:]
            copy.input.extend(inputs)
            del copy.output[:]
            copy.output.extend(o + FLOAT if o else o for o in node.output)
            graph.node.append(copy)
            compared[node.name] = (node.output[0], node.output[0] + FLOAT)
    return out, compared


def noise(fproto: onnx.ModelProto, qproto: onnx.ModelProto, nodes: list[onnx.NodeProto], batches: Iterable[Batch],
          max_samples: int, workdir: Path | None = None) -> list[float] | None:
    """The error each node's int8 form adds (see the module doc), in order; None when no node could be compared."""
    probe, compared = with_float_copies(fproto, qproto, nodes)
    if not compared:
        return None
    names = [n for pair in compared.values() for n in pair]
    err: dict[str, float] = {}
    energy: dict[str, float] = {}
    for _feed, out in exposed(probe, names, batches, workdir=workdir, max_samples=max_samples,
                              opt_level=ort.GraphOptimizationLevel.ORT_DISABLE_ALL):
        for node, (q, f) in compared.items():
            got, ref = out[q].astype(np.float64), out[f].astype(np.float64)
            if got.shape == ref.shape:
                err[node] = err.get(node, 0.0) + float(np.sum((got - ref) ** 2))
                energy[node] = energy.get(node, 0.0) + float(np.sum(ref**2))
    return [err.get(n.name, 0.0) / max(energy.get(n.name, 0.0), 1e-30) for n in nodes]
