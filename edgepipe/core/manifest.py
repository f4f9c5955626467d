"""The manifest as types: what ``manifest.json`` holds (shared/DESIGN.md), what the build writes and every reader reads.

Frozen dataclasses for the main parts (runtime, golden, size, accuracy, latency, one model's entry, the whole
manifest); ``from_json`` / ``to_json`` convert, ``of`` builds a part from named fields (the writer's way in).
A part keeps the keys it does not name in ``extra`` (a target's extras such as ``gpu`` or ``mobile``, keys a later
edgepipe adds) and remembers which named keys were present, so ``Part.from_json(d).to_json() == d`` for every
manifest: the JSON on disk, its digest and ``content_sha256`` do not depend on whether a dict went through the type.

``schema_version`` is the manifest's major version: a reader refuses any other (``check_schema``, exit 2).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, ClassVar, TypeVar

from edgepipe.core.errors import BadInput

SCHEMA_VERSION = 1  # the manifest's major version: a change a reader of this one would misread raises it
P = TypeVar("P", bound="Part")
JSON = dict[str, Any]


def check_schema(version: Any, where: str) -> None:
    """A manifest of another major schema version is refused with one line (exit 2): its fields would be misread."""
    if version == SCHEMA_VERSION:
        return
    if isinstance(version, bool) or not isinstance(version, (int, float)):
        raise BadInput(f"{where}: manifest schema_version {version!r} is not a version number; rebuild the artifact")
    newer = "a newer" if version > SCHEMA_VERSION else "an older"
    raise BadInput(f"{where}: manifest schema {version} (written by {newer} edgepipe); this edgepipe reads schema "
                   f"{SCHEMA_VERSION}: rebuild the artifact or use the edgepipe that built it")


@dataclasses.dataclass(frozen=True)
class Part:
    """A JSON object with named, typed fields; ``present``: which of them the object had; ``extra``: the rest.

    (``_present`` holds the set, so that a part may name a JSON field ``present``: KvCache.)
    """

    PARTS: ClassVar[dict[str, type[Part]]] = {}  # field name → part type, for nested parts
    _present: frozenset[str] = dataclasses.field(default=frozenset(), repr=False)
    extra: Mapping[str, Any] = dataclasses.field(default_factory=dict, repr=False)

    @property
    def present(self) -> frozenset[str]:
        return self._present

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls) if f.name not in ("_present", "extra"))

    @classmethod
    def from_json(cls: type[P], data: Mapping[str, Any] | None) -> P:
        data = data or {}
        names = cls.names()
        values = {}
        for k in names:
            if k in data:
                part = cls.PARTS.get(k)
                values[k] = part.from_json(data[k]) if part is not None and isinstance(data[k], Mapping) else data[k]
        return cls(**values, _present=frozenset(values), extra={k: v for k, v in data.items() if k not in names})

    @classmethod
    def of(cls: type[P], extra: Mapping[str, Any] | None = None, **values: Any) -> P:
        """A part with exactly these fields present (a None value is written as null), plus ``extra`` keys."""
        return cls(**values, _present=frozenset(values), extra=dict(extra or {}))

    def with_(self: P, **values: Any) -> P:
        """A copy with these fields set and present."""
        return dataclasses.replace(self, **values, _present=self._present | values.keys())

    def without(self: P, *names: str) -> P:
        """A copy without these fields (absent from the JSON)."""
        return dataclasses.replace(self, _present=self._present - set(names))

    def to_json(self) -> JSON:
        out: JSON = {}
        for k in self.names():
            if k in self._present:
                v = getattr(self, k)
                out[k] = v.to_json() if isinstance(v, Part) else v
        return {**out, **self.extra}

    def get(self, key: str, default: Any = None) -> Any:
        """A key this type does not name (a target's extra), or a named one that was present."""
        if key in self._present:
            return getattr(self, key)
        return self.extra.get(key, default)


@dataclasses.dataclass(frozen=True)
class Runtime(Part):
    name: str = "onnxruntime"
    version: str = ""
    providers: list[str] | None = None  # what the session ran on (None: ORT's default)
    requested_providers: list[str] | None = None
    session_config: dict[str, str] | None = None
    requested: dict[str, str] | None = None  # the runtime version a recipe asked for (ops capped to it)
    genai_config: str | None = None  # a decoder's onnxruntime-genai config file


@dataclasses.dataclass(frozen=True)
class Golden(Part):
    file: str = "golden.npz"
    samples: int = 0
    atol: float = 1e-4
    rtol: float = 1e-3
    # a decoder's golden file holds prompts and their greedy tokens
    prompts: int | None = None
    max_new_tokens: int | None = None
    eos_token_ids: list[int] | None = None
    threads: int | None = None
    # what atol covers beyond the target's share of the outputs (a runtime cap's release: float_rounding)
    tolerance: dict[str, Any] | None = None


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
    percent_drop: float | None = None  # a decoder's perplexity budget
    budget: dict[str, float] | None = None
    passed: bool = True
    samples: int = 0
    outputs: dict[str, dict] | None = None  # every output's shape/dtype/finite/closeness check
    reason: str | None = None  # why a check failed that the budget alone would pass
    data: str = ""  # eval | calibration | synthetic


@dataclasses.dataclass(frozen=True)
class ExportCheck(Part):
    """The exported graph compared with the framework model on sample inputs."""

    cases: int = 0
    passed: bool = True
    max_abs: float = 0.0
    max_rel: float | None = None
    sizes: list | None = None  # the input sizes the cases used
    checks: list[dict] | None = None  # a decoder's cases, each in full


@dataclasses.dataclass(frozen=True)
class ModelSource(Part):
    """Where the float model came from: ``kind`` (torch, onnx, hf, gguf...), its digest or origin, the export check."""

    PARTS: ClassVar[dict[str, type[Part]]] = {"export_check": ExportCheck}
    kind: str = ""
    sha256: str | None = None
    origin: str | None = None  # a decoder's model id or path
    export: str | None = None  # a decoder's exporter (fused, genai...)
    export_check: ExportCheck = dataclasses.field(default_factory=ExportCheck)


@dataclasses.dataclass(frozen=True)
class KvCache(Part):
    """A decoder's cache geometry and the names of its past / present inputs and outputs (``%d``: the layer)."""

    layers: int = 0
    kv_heads: int = 0
    head_size: int = 0
    past: str = ""
    present: str = ""


@dataclasses.dataclass(frozen=True)
class Precision(Part):
    """A decoder model's number formats and batch."""

    activations: str = "float32"
    kv_cache: str = "float32"
    weights: str = "float32"
    batch: int | str = "dynamic"


@dataclasses.dataclass(frozen=True)
class Generation(Part):
    """A decoder model's generation checks against the framework model."""

    perplexity: dict[str, float] | None = None  # reference, artifact, increase
    next_token: dict[str, Any] | None = None  # top-1 agreement and logits cosine
    greedy: dict[str, Any] | None = None  # greedy tokens matched on the golden prompts
    eos_token_ids: list[int] | None = None


@dataclasses.dataclass(frozen=True)
class Latency(Part):
    """Batch-1 timing on the artifact's runtime (a decoder adds its prefill / decode figures as extra keys)."""

    batch: int = 1
    runs: int = 0
    p50_ms: float = 0.0
    p90_ms: float = 0.0
    p99_ms: float = 0.0
    throughput_per_s: float = 0.0
    float_p50_ms: float | None = None  # the float model on the same runtime and feed (speed check)
    note: str | None = None  # why a figure is not what the device would show (e.g. TensorRT int8 on CPU)


@dataclasses.dataclass(frozen=True)
class ModelEntry(Part):
    """One model of an artifact folder (the primary one's fields sit at the manifest's top level)."""

    PARTS: ClassVar[dict[str, type[Part]]] = {"runtime": Runtime, "golden": Golden, "size": Size, "accuracy": Accuracy,
                                              "latency": Latency, "precision": Precision, "generation": Generation}
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
    latency: Latency = dataclasses.field(default_factory=Latency)
    variant: str = "main"  # in ``models``: main, int8.qdq, ...
    warnings: list[str] | None = None  # this model's (in ``models``; the folder's are the manifest's)
    distill: dict[str, Any] | None = None  # the student's training, when the recipe distills
    # a decoder's model: its form, precision, status and generation checks (and where fp16 really ran)
    form: str | None = None
    status: str | None = None
    precision: Precision = dataclasses.field(default_factory=Precision)
    generation: Generation = dataclasses.field(default_factory=Generation)
    checked_on: dict[str, Any] | None = None

    @property
    def label(self) -> str:
        """The model's name in a report or a table: its file without ``model.`` and ``.onnx``."""
        return self.model_file.removeprefix("model.").removesuffix(".onnx")


COMMON = ("schema_version", "name", "target", "task", "description", "status", "source", "versions", "warnings", "kv_cache",
          "models", "files", "content_sha256", "digest")


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
    source: ModelSource = dataclasses.field(default_factory=ModelSource)
    versions: dict[str, str] | None = None
    warnings: list[str] | None = None
    kv_cache: KvCache = dataclasses.field(default_factory=KvCache)  # a decoder's cache geometry and input/output names
    files: dict[str, str] | None = None  # path → sha256 (written by write_manifest)
    content_sha256: str | None = None
    digest: str | None = None
    present: frozenset[str] = dataclasses.field(default=frozenset(), repr=False)

    @classmethod
    def of(cls, primary: ModelEntry, **values: Any) -> Manifest:
        """The writer's way in: the primary model and exactly these common fields present."""
        return cls(primary=primary, **values, present=frozenset(values))

    def with_(self, **values: Any) -> Manifest:
        return dataclasses.replace(self, **values, present=self.present | values.keys())

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Manifest:
        if "schema_version" in data:
            check_schema(data["schema_version"], "manifest")
        common = {k: data[k] for k in COMMON if k in data}
        if "models" in common and not (isinstance(common["models"], list) and all(isinstance(m, Mapping) for m in common["models"])):
            raise BadInput("manifest: 'models' is not a list of objects; rebuild the artifact")
        if "models" in common:
            common["models"] = tuple(ModelEntry.from_json(m) for m in common["models"])
        for k, part in (("source", ModelSource), ("kv_cache", KvCache)):
            if isinstance(common.get(k), Mapping):
                common[k] = part.from_json(common[k])
        primary = ModelEntry.from_json({k: v for k, v in data.items() if k not in COMMON})
        return cls(primary=primary, **common, present=frozenset(common))

    def to_json(self) -> JSON:
        out = self.primary.to_json()
        for k in COMMON:
            if k in self.present:
                v = getattr(self, k)
                out[k] = [m.to_json() for m in v] if k == "models" else v.to_json() if isinstance(v, Part) else v
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


__all__ = ["SCHEMA_VERSION", "Accuracy", "ExportCheck", "Generation", "Golden", "KvCache", "Latency", "Manifest", "ModelEntry",
           "ModelSource", "Part", "Precision", "Runtime", "Size", "check_schema"]
