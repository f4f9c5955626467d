"""The manifest as types: what ``manifest.json`` holds (shared/DESIGN.md) and what every reader goes through.

Frozen dataclasses for the main parts (runtime, golden, size, accuracy, one model's entry, the whole manifest);
``from_json`` / ``to_json`` convert. A part keeps the keys it does not name in ``extra`` (a target's extras, a
decoder's generation checks, keys a later edgepipe adds) and remembers which named keys were present, so
``Part.from_json(d).to_json() == d`` for every manifest: the JSON on disk, its digest and ``content_sha256`` do
not depend on whether a dict went through the type.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, ClassVar, TypeVar

from edgepipe.core.artifact import SCHEMA_VERSION

P = TypeVar("P", bound="Part")
JSON = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class Part:
    """A JSON object with named, typed fields; ``present``: which of them the object had; ``extra``: the rest."""

    PARTS: ClassVar[dict[str, type[Part]]] = {}  # field name → part type, for nested parts
    present: frozenset[str] = dataclasses.field(default=frozenset(), repr=False)
    extra: Mapping[str, Any] = dataclasses.field(default_factory=dict, repr=False)

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls) if f.name not in ("present", "extra"))

    @classmethod
    def from_json(cls: type[P], data: Mapping[str, Any] | None) -> P:
        data = data or {}
        names = cls.names()
        values = {}
        for k in names:
            if k in data:
                part = cls.PARTS.get(k)
                values[k] = part.from_json(data[k]) if part is not None and isinstance(data[k], Mapping) else data[k]
        return cls(**values, present=frozenset(values), extra={k: v for k, v in data.items() if k not in names})

    def to_json(self) -> JSON:
        out: JSON = {}
        for k in self.names():
            if k in self.present:
                v = getattr(self, k)
                out[k] = v.to_json() if isinstance(v, Part) else v
        return {**out, **self.extra}

    def get(self, key: str, default: Any = None) -> Any:
        """A key this type does not name (a target's extra), or a named one that was present."""
        if key in self.present:
            return getattr(self, key)
        return self.extra.get(key, default)


@dataclasses.dataclass(frozen=True)
class Runtime(Part):
    name: str = "onnxruntime"
    version: str = ""
    providers: list[str] | None = None  # what the session ran on (None: ORT's default)
    requested_providers: list[str] | None = None
    session_config: dict[str, str] | None = None


@dataclasses.dataclass(frozen=True)
class Golden(Part):
    file: str = "golden.npz"
    samples: int = 0
    atol: float = 1e-4
    rtol: float = 1e-3


@dataclasses.dataclass(frozen=True)
class Size(Part):
    model_bytes: int = 0
    fp32_bytes: int = 0
    ratio: float = 0.0


@dataclasses.dataclass(frozen=True)
class Accuracy(Part):
    metric: str = ""
    output: str = ""
    reference: float = 0.0
    value: float = 0.0
    drop: float = 0.0
    budget: dict[str, float] | None = None
    passed: bool = True
    samples: int = 0
    outputs: dict[str, dict] | None = None  # every output's shape/dtype/finite/closeness check
    reason: str | None = None  # why a check failed that the budget alone would pass
    data: str = ""  # eval | calibration | synthetic


@dataclasses.dataclass(frozen=True)
class ModelEntry(Part):
    """One model of an artifact folder (the primary one's fields sit at the manifest's top level)."""

    PARTS: ClassVar[dict[str, type[Part]]] = {"runtime": Runtime, "golden": Golden, "size": Size, "accuracy": Accuracy}
    model_file: str = ""
    runtime: Runtime = dataclasses.field(default_factory=Runtime)
    inputs: list[dict] | None = None
    outputs: list[dict] | None = None
    opset: int = 0
    ir_version: int = 0
    size: Size = dataclasses.field(default_factory=Size)
    passes: list[dict] | None = None
    accuracy: Accuracy = dataclasses.field(default_factory=Accuracy)
    golden: Golden = dataclasses.field(default_factory=Golden)
    latency: dict[str, Any] | None = None
    variant: str = "main"  # in ``models``: main, int8.qdq, ...

    @property
    def label(self) -> str:
        """The model's name in a report or a table: its file without ``model.`` and ``.onnx``."""
        return self.model_file.removeprefix("model.").removesuffix(".onnx")


COMMON = ("schema_version", "name", "target", "task", "description", "status", "source", "versions", "warnings", "models",
          "files", "content_sha256", "digest")


@dataclasses.dataclass(frozen=True)
class Manifest:
    """A target's manifest: its common fields, its primary model (top level) and every model it ships."""

    primary: ModelEntry
    models: tuple[ModelEntry, ...] | None = None  # present when the folder ships several models
    schema_version: int = SCHEMA_VERSION
    name: str = ""
    target: str = ""
    task: str | None = None  # text-generation for a decoder
    description: str | None = None
    status: str | None = None  # passed | failed
    source: dict[str, Any] | None = None
    versions: dict[str, str] | None = None
    warnings: list[str] | None = None
    files: dict[str, str] | None = None  # path → sha256 (written by write_manifest)
    content_sha256: str | None = None
    digest: str | None = None
    present: frozenset[str] = dataclasses.field(default=frozenset(), repr=False)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Manifest:
        common = {k: data[k] for k in COMMON if k in data}
        if "models" in common:
            common["models"] = tuple(ModelEntry.from_json(m) for m in common["models"])
        primary = ModelEntry.from_json({k: v for k, v in data.items() if k not in COMMON})
        return cls(primary=primary, **common, present=frozenset(common))

    def to_json(self) -> JSON:
        out = self.primary.to_json()
        for k in COMMON:
            if k in self.present:
                v = getattr(self, k)
                out[k] = [m.to_json() for m in v] if k == "models" else v
        return out

    @property
    def entries(self) -> tuple[ModelEntry, ...]:
        """Every model the folder ships, the primary one first."""
        return self.models or (self.primary,)

    @property
    def is_decoder(self) -> bool:
        return self.task == "text-generation"

    def get(self, key: str, default: Any = None) -> Any:
        """A top-level key: a common field, or one of the primary model's."""
        if key in COMMON:
            return getattr(self, key) if key in self.present else default
        return self.primary.get(key, default)


__all__ = ["Accuracy", "Golden", "Manifest", "ModelEntry", "Part", "Runtime", "Size"]
