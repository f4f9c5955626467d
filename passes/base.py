"""The pass contract: onnx-ir passes with a typed config, a context, and stats."""

from __future__ import annotations

import dataclasses
import shutil
import tempfile
import uuid
import weakref
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import onnx
import onnx_ir as ir
from pydantic import BaseModel, ConfigDict

from edgepipe.core.errors import BadInput
from edgepipe.core.fanout import Mapper, local_map
from edgepipe.core.modelio import (
    clone,
    default_opset,
    external_threshold,
    is_large,
    load,
    model_stats,
    save,
    weight_bytes,
)

__all__ = [  # the model helpers are re-exported: every pass imports them from here
    "Batch", "EdgepipePass", "PassConfig", "PassContext", "StatsResult", "clone", "default_opset", "external_threshold",
    "is_large", "load", "model_stats", "save", "weight_bytes",
]

Batch = dict[str, np.ndarray]


class PassConfig(BaseModel):
    """Base of every pass's options: unknown keys are errors."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    # Options added later whose default leaves the pass's output as it was: left out of the manifest's params while
    # at that default, so adding an option does not move the content_sha256 of artifacts whose recipes don't use it.
    QUIET_DEFAULTS: ClassVar[frozenset[str]] = frozenset()

    def record(self) -> dict[str, Any]:
        """The params a manifest records: every option, less the QUIET_DEFAULTS still at their default."""
        data = self.model_dump()
        for name in self.QUIET_DEFAULTS:
            if getattr(self, name) == type(self).model_fields[name].default:
                data.pop(name, None)
        return data


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
    # node_costs(float model, int8 model) -> {float node name: {"int8_ms", "float_ms"}}: what each node costs in either
    # form as the target ships it (targets/nodecost.py); set on speed-checked targets, None elsewhere
    node_costs: Callable[[ir.Model, ir.Model], dict[str, dict[str, float]]] | None = None

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
        if context is None:  # used on its own (API, tests): a scratch folder made on first use, removed with the pass
            workdir = Path(tempfile.gettempdir()) / f"edgepipe-{uuid.uuid4().hex[:12]}"
            weakref.finalize(self, shutil.rmtree, workdir, ignore_errors=True)
            context = PassContext(workdir=workdir)
        self.context = context

    def require_calibration(self) -> Callable[[], Iterable[Batch]]:
        """The calibration source, or one line telling the user to give one."""
        if self.context.calibration is None:
            raise BadInput(f"{self.name} needs calibration data: set data.calibration in the recipe")
        return self.context.calibration

    def ensures(self, model: ir.Model) -> None:
        onnx.checker.check_model(ir.to_proto(model), full_check=False)
