"""The pass contract: onnx-ir passes with a typed config, a context, and stats."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import logging
import os
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import onnx
import onnx_ir as ir
from pydantic import BaseModel, ConfigDict

from edgepipe.errors import BadInput
from edgepipe.executor import Mapper, local_map

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
    map: Mapper = local_map  # map(fn, items) -> list: fans out over the build's executor (docs/executor.md)

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
        if context is None:  # used on its own (API, tests): a scratch folder removed with the pass (or at exit)
            self._scratch = tempfile.TemporaryDirectory(prefix="edgepipe-")
            context = PassContext(workdir=Path(self._scratch.name))
        self.context = context

    def require_calibration(self) -> Callable[[], Iterable[Batch]]:
        """The calibration source, or one line telling the user to give one."""
        if self.context.calibration is None:
            raise BadInput(f"{self.name} needs calibration data: set data.calibration in the recipe")
        return self.context.calibration

    def ensures(self, model: ir.Model) -> None:
        onnx.checker.check_model(ir.to_proto(model), full_check=False)


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """ORT's tools log to the root logger and print freely; keep the user's terminal for our progress."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        root.setLevel(level)


def default_opset(proto: onnx.ModelProto) -> int | None:
    """The model's ai.onnx opset version (None when it imports none)."""
    return next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)


def clone(model: ir.Model) -> ir.Model:
    """A deep copy (round trip through the proto; weights are copied)."""
    return ir.from_proto(ir.to_proto(model))


def external_threshold() -> int:
    """Weight bytes above which models are saved with external data (protobuf's limit is 2 GB).

    ``EDGEPIPE_EXTERNAL_DATA_THRESHOLD`` lowers it, so tests run the large-model path on small models.
    """
    return int(os.environ.get("EDGEPIPE_EXTERNAL_DATA_THRESHOLD", 1_500_000_000))


def is_large(model: ir.Model) -> bool:
    return weight_bytes(model) > external_threshold()


def weight_bytes(model: ir.Model) -> int:
    return sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None)


def save(model: ir.Model, path: Path) -> Path:
    """Write a model; large ones put their weights in ``<file>.data`` beside it (a stable name)."""
    if is_large(model):
        ir.save(model, path, external_data=path.name + ".data")
    else:
        onnx.save_model(ir.to_proto(model), str(path))
    return path


def load(path: Path) -> ir.Model:
    """Read a model with its weights in memory (external data included, so copies stay valid)."""
    model = ir.load(path)
    return ir.external_data.load_to_model(model)


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
