"""A target profile: default pass chain, how the artifact is emitted, where it is checked."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import onnx_ir as ir

from edgepipe.passes.base import save

if TYPE_CHECKING:  # annotations only: the recipe layer sits above the targets it names
    from edgepipe.recipe import AccuracySpec, Recipe, TargetSpec


@dataclasses.dataclass
class TargetContext:
    recipe: Recipe
    spec: TargetSpec
    has_calibration: bool
    # {input: [1, longest, ...]} for inputs with dynamic dims past the batch, from the eval/calibration data
    data_shapes: dict[str, list[int]] = dataclasses.field(default_factory=dict)
    # the source graph, read (never changed) by default chains that depend on the kind of model; None: not exported yet
    source: ir.Model | None = None


@dataclasses.dataclass
class Emitted:
    """What ``emit`` wrote: the deployable file, how to run it, and manifest extras."""

    model_file: str
    providers: list[str]
    session_config: dict[str, str] = dataclasses.field(default_factory=dict)
    extras: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class Variant:
    """One deployable model of a target: its pass chain; ``main`` is the folder's primary model."""

    key: str
    passes: list[dict[str, Any]]


def deployable(model: ir.Model) -> ir.Model:
    """Drop intermediate value_info: the runtime infers it, the device need not store it."""
    proto = ir.to_proto(model)
    del proto.graph.value_info[:]
    return ir.from_proto(proto)


class Target:
    """Base profile: ONNX Runtime on CPU, the model saved as model.onnx."""

    name: ClassVar[str]
    description: ClassVar[str]
    providers: ClassVar[list[str]] = ["CPUExecutionProvider"]
    quantized: ClassVar[bool] = True
    speed_checked: ClassVar[bool] = False  # int8 vs float timed before shipping (targets/speed.py)
    reads_source: ClassVar[bool] = False  # default_passes depends on the source graph (TargetContext.source)

    def default_passes(self, ctx: TargetContext) -> list[dict[str, Any]]:
        raise NotImplementedError

    def passes(self, ctx: TargetContext) -> list[dict[str, Any]]:
        """The recipe's chain if it gives one, else the profile's default."""
        return list(ctx.spec.passes) if ctx.spec.passes is not None else self.default_passes(ctx)

    def variants(self, ctx: TargetContext) -> list[Variant]:
        """The models this target ships, each checked on its own; most targets ship one."""
        return [Variant("main", self.passes(ctx))]

    def accuracy(self, ctx: TargetContext) -> AccuracySpec:
        """Recipe accuracy, with the target's overrides applied over it."""
        base = ctx.recipe.accuracy
        if ctx.spec.accuracy is None:
            return base
        override = ctx.spec.accuracy.model_dump(exclude_unset=True)
        return base.model_copy(update=override)

    def emit(self, model: ir.Model, folder: Path, ctx: TargetContext, variant: str = "main") -> Emitted:
        save(deployable(model), folder / "model.onnx")
        return Emitted("model.onnx", list(self.providers))

    def golden_tolerance(self, quantized: bool) -> tuple[float, float]:
        """(atol as a share of the output's max |value|, rtol) for verify's golden check."""
        return (0.01, 1e-2) if quantized else (1e-5, 1e-3)
