"""The pass contract: onnx-ir passes with a typed config, a context, and stats."""

from __future__ import annotations

import dataclasses
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import onnx
import onnx_ir as ir
from pydantic import BaseModel, ConfigDict

Batch = dict[str, np.ndarray]


class PassConfig(BaseModel):
    """Base of every pass's options: unknown keys are errors."""

    model_config = ConfigDict(extra="forbid", frozen=True)


@dataclasses.dataclass
class PassContext:
    """What a pass may use besides the model: data it was given and a scratch folder."""

    workdir: Path
    calibration: Callable[[], Iterable[Batch]] | None = None
    # metric of a candidate model (ir.Model or onnx.ModelProto) on the eval data, higher is better;
    # evaluate(model, samples=N) uses the first N samples only
    evaluate: Callable[..., float] | None = None
    accept: Callable[[float], bool] | None = None  # does an ``evaluate`` score meet the target's budget?
    target: str = "cpu"

    def scratch(self, stem: str) -> Path:
        self.workdir.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=f"{stem}-", dir=self.workdir))


@dataclasses.dataclass
class StatsResult(ir.passes.PassResult):
    """A pass result that also carries what the pass did (names → numbers/strings)."""

    stats: dict[str, Any] = dataclasses.field(default_factory=dict)


class EdgepipePass(ir.passes.FunctionalPass):
    """Functional pass: returns a new model, never edits its input.

    Subclasses set ``name`` (the recipe name, e.g. ``quantize.static``) and
    ``Config``, and implement ``call(model) -> StatsResult``.
    """

    name: ClassVar[str]
    Config: ClassVar[type[PassConfig]] = PassConfig

    def __init__(self, config: PassConfig | None = None, context: PassContext | None = None) -> None:
        self.config = config if config is not None else self.Config()
        self.context = context or PassContext(workdir=Path(tempfile.mkdtemp(prefix="edgepipe-")))

    def ensures(self, model: ir.Model) -> None:
        onnx.checker.check_model(ir.to_proto(model), full_check=False)


def clone(model: ir.Model) -> ir.Model:
    """A deep copy (round trip through the proto; weights are copied)."""
    return ir.from_proto(ir.to_proto(model))


def save(model: ir.Model, path: Path) -> Path:
    """Write a model as one file (external data above 1.5 GB, beside it)."""
    proto = ir.to_proto(model)
    if proto.ByteSize() > 1_500_000_000:
        ir.save(model, path, external_data=path.name + ".data")
    else:
        onnx.save_model(proto, str(path))
    return path


def load(path: Path) -> ir.Model:
    return ir.load(path)


def model_stats(model: ir.Model) -> dict[str, float | int]:
    """Nodes, parameters, bytes and sparsity (zero share of float weights)."""
    params = nbytes = zeros = float_params = 0
    for value in model.graph.initializers.values():
        tensor = value.const_value
        if tensor is None:
            continue
        size = int(np.prod(tensor.shape.numpy())) if tensor.shape is not None else 0
        params += size
        nbytes += tensor.nbytes
        if tensor.dtype in (ir.DataType.FLOAT, ir.DataType.FLOAT16) and size > 1:
            float_params += size
            zeros += int(size - np.count_nonzero(tensor.numpy()))
    nodes = sum(1 for _ in model.graph.all_nodes())
    return {
        "nodes": nodes,
        "params": params,
        "bytes": nbytes,
        "sparsity": round(zeros / float_params, 4) if float_params else 0.0,
    }
