"""Run a model with every intermediate float tensor exposed as an output, and summarise each."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
from onnx_ir.passes import common

from edgepipe.core.logs import muted
from edgepipe.core.runtime import exposed
from edgepipe.passes.base import Batch, clone

FLOATS = (ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.DOUBLE)


@dataclasses.dataclass
class TensorStats:
    """Per-tensor max |x| and whether any NaN/Inf was seen, over all probed batches."""

    max_abs: dict[str, float]
    nonfinite: set[str]
    samples: int
    unmeasured: int  # float-typed values whose type shape inference could not give


def probe(model: ir.Model, batches: Iterable[Batch], max_samples: int, workdir: Path, infer: bool = True) -> TensorStats:
    """Expose every node output of a known float type (onnx-ir edit), run ORT on ``batches``.

    Graph inputs are measured from the feeds themselves.
    """
    probe_model = clone(model)
    if infer:
        _infer_quietly(probe_model)
    names = [v.name for v in probe_model.graph.outputs]
    unmeasured = 0
    for node in probe_model.graph:
        for value in node.outputs:
            if not value.name or value.name in names:
                continue
            if value.dtype in FLOATS:
                names.append(value.name)
            elif value.dtype is None:
                unmeasured += 1
    max_abs: dict[str, float] = {}
    nonfinite: set[str] = set()
    samples = 0
    # No graph rewrites: the tensors measured are the ones the converter will see.
    for feed, results in exposed(probe_model, names, batches, workdir=workdir, max_samples=max_samples,
                                 opt_level=ort.GraphOptimizationLevel.ORT_DISABLE_ALL):
        samples += len(next(iter(feed.values())))
        for name, arr in [*feed.items(), *results.items()]:
            if not np.issubdtype(arr.dtype, np.floating) or arr.size == 0:
                continue
            finite = np.isfinite(arr)
            if not finite.all():
                nonfinite.add(name)
            peak = float(np.abs(np.where(finite, arr, 0)).max())
            max_abs[name] = max(max_abs.get(name, 0.0), peak)
    return TensorStats(max_abs, nonfinite, samples, unmeasured)


def _infer_quietly(model: ir.Model) -> None:
    """Fill in value types where onnx can; where it cannot, the types already there serve."""
    with muted("onnx_ir.passes.common.shape_inference", level=logging.CRITICAL), contextlib.suppress(Exception):
        common.ShapeInferencePass()(model)
