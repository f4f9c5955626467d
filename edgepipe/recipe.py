"""The recipe: a YAML file validated into typed objects, errors as one actionable line."""

from __future__ import annotations

import difflib
import re
import typing
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from edgepipe.core.errors import BadInput, one_line
from edgepipe.core.loader import is_module_ref

DTYPES = ("float32", "float16", "int64", "int32", "int8", "uint8", "bool")
BUILTIN_METRICS = ("top1", "top5", "cosine", "cosine_min", "knn10", "rel_l2", "max_abs", "perplexity")
GENERATION_METRICS = ("perplexity", "top1")  # task text-generation: perplexity on eval text; top1 = next-token agreement


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelSource(Strict):
    """Where the model comes from: exactly one of torch / hf / onnx / gguf (gguf may name a file inside hf)."""

    torch: str | None = None  # path.py:function (relative to the recipe) or package.module:function
    args: dict[str, Any] | None = None  # keyword arguments of the torch factory, e.g. {num_classes: 10}
    hf: str | None = None
    onnx: str | None = None
    gguf: str | None = None  # a GGUF causal LM (task text-generation): a path, or a file name inside model.hf
    task: str | None = None
    exporter: Literal["dynamo", "torchscript"] = "dynamo"
    opset: int | None = Field(default=None, ge=7, le=23)

    @model_validator(mode="before")
    @classmethod
    def _gguf_task(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("gguf") and data.get("task") is None:
            data = {**data, "task": "text-generation"}  # a GGUF file is a causal LM
        return data

    @model_validator(mode="after")
    def _exactly_one(self) -> ModelSource:
        given = [k for k in ("torch", "hf", "onnx", "gguf") if getattr(self, k)]
        if given != ["hf", "gguf"] and len(given) != 1:
            raise ValueError(f"give exactly one of torch / hf / onnx / gguf, or hf + gguf (a GGUF file in that folder) (got {given or 'none'})")
        if self.gguf and self.task not in (None, "text-generation"):
            raise ValueError(f"a GGUF source is a causal LM: use task text-generation (got task {self.task!r})")
        if self.task == "text-generation" and not (self.hf or self.gguf):
            raise ValueError("task text-generation needs model.hf (a causal-LM folder) or model.gguf (a GGUF file)")
        if self.args is not None and not self.torch:
            raise ValueError("args are the keyword arguments of a torch factory; use them with model.torch")
        return self

    @property
    def kind(self) -> str:
        return next(k for k in ("torch", "hf", "onnx", "gguf") if getattr(self, k))


class InputSpec(Strict):
    name: str
    shape: list[int | str]
    dtype: Literal[DTYPES] = "float32"  # type: ignore[valid-type]

    @field_validator("shape")
    @classmethod
    def _dims(cls, shape: list[int | str]) -> list[int | str]:
        for d in shape:
            if isinstance(d, int) and d < 1:
                raise ValueError(f"dimension {d} must be >= 1 (or a name for a dynamic dim)")
            if isinstance(d, str) and not d.isidentifier():
                raise ValueError(f"dynamic dimension name '{d}' must be an identifier")
        return shape

    @property
    def dynamic(self) -> dict[int, str]:
        return {i: d for i, d in enumerate(self.shape) if isinstance(d, str)}


class ImagePreprocess(Strict):
    """How a folder of images becomes model input: decode, convert, resize, x*scale, (x-mean)/std, layout."""

    size: list[int] = Field(min_length=2, max_length=2)  # [height, width]
    mode: Literal["L", "RGB"] = "RGB"
    scale: float = 1 / 255
    mean: list[float] = [0.0]
    std: list[float] = [1.0]
    layout: Literal["NCHW", "NHWC"] = "NCHW"
    input: str | None = None  # model input name; default: the recipe's only input


class DataSpec(Strict):
    calibration: str | None = None
    eval: str | None = None
    max_length: int | None = Field(default=None, ge=1)  # text data: tokens per example (truncation)
    images: ImagePreprocess | None = None  # image folders: the preprocessing (needed when a path is a folder)
    prompts: str | None = None  # text-generation: .txt prompts, one per line (greedy generation is checked on them)
    max_new_tokens: int = Field(default=32, ge=1, le=1024)  # text-generation: greedy tokens per prompt


class AccuracySpec(Strict):
    """What is measured and the budget, relative to the reference (Olive's vocabulary)."""

    metric: str = "top1"
    max_drop: float | None = Field(default=None, ge=0)
    percent_max_drop: float | None = Field(default=None, ge=0, le=100)
    min_value: float | None = None
    output: str | None = None
    # Every graph output, whichever the metric reads, must match the reference's shape and dtype, stay
    # finite, and reach this mean per-sample cosine (share of equal elements for integer outputs). 0.95
    # passes int8 noise on outputs the budget does not govern (MiniLM token embeddings, dynamic int8:
    # 0.978; bundled artifacts: >= 0.997) and fails outputs that are broken rather than rounded.
    outputs_min_cosine: float = Field(default=0.95, ge=-1, le=1)

    @field_validator("metric")
    @classmethod
    def _metric(cls, metric: str) -> str:
        if metric not in BUILTIN_METRICS and not re.fullmatch(r".+\.py:\w+", metric):
            raise ValueError(f"unknown metric '{metric}'; use one of {', '.join(BUILTIN_METRICS)} or path.py:function")
        return metric


class TargetSpec(Strict):
    """Per-target overrides; anything left out takes the target's defaults."""

    passes: list[dict[str, Any]] | None = None
    # gpu only: the chain of the TensorRT int8 model (default: cleanup, optimize.ort basic, quantize.tensorrt)
    int8_passes: list[dict[str, Any]] | None = None
    shapes: dict[str, list[int]] | None = None
    accuracy: AccuracySpec | None = None
    runtime: dict[str, str] | None = None
    # cpu/mobile: time int8 against float and ship float where int8 is slower (the default); false ships the
    # chain's int8 model untimed, so a rebuild on a loaded machine makes the same bytes
    speed_check: bool = True

    @field_validator("passes", "int8_passes")
    @classmethod
    def _passes(cls, passes: list[dict[str, Any]] | None) -> list[dict[str, Any]] | None:
        from edgepipe.passes import validate_spec

        for spec in passes or []:
            validate_spec(spec)
        return passes


class ShrinkSpec(Strict):
    """Automatic student: hidden widths × ``width``, the widest under ``params`` × teacher, or ``layers`` kept."""

    width: float | None = Field(default=None, gt=0, lt=1)
    params: float | None = Field(default=None, gt=0, lt=1)
    layers: int | list[int] | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> ShrinkSpec:
        given = [k for k in ("width", "params", "layers") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of width / params / layers (got {given or 'none'})")
        return self


class DistillSpec(Strict):
    """Train a smaller student on the teacher's outputs before export (see docs/distill.md)."""

    student: str | None = None
    shrink: ShrinkSpec | None = None
    data: str = "calibration"
    loss: Literal["kl", "mse", "cosine"] = "kl"
    temperature: float = Field(default=4.0, gt=0)
    epochs: int = Field(default=20, ge=1)
    lr: float = Field(default=2e-3, gt=0)
    batch_size: int = Field(default=64, ge=1)
    seed: int = 0
    threads: int = Field(default=2, ge=1)
    max_drop: float | None = Field(default=None, ge=0)

    @field_validator("student")
    @classmethod
    def _factory(cls, ref: str | None) -> str | None:
        if ref is not None and not re.fullmatch(r".+\.py:\w+", ref) and not is_module_ref(ref):
            raise ValueError("must be path.py:function or package.module:function (a factory returning the student nn.Module)")
        return ref

    @model_validator(mode="after")
    def _one_student(self) -> DistillSpec:
        if (self.student is None) == (self.shrink is None):
            raise ValueError("give exactly one of student (path.py:function) / shrink ({params: 0.25} ...)")
        return self


class Recipe(Strict):
    name: str
    model: ModelSource
    inputs: list[InputSpec] | None = None
    outputs: list[str] | None = None
    data: DataSpec = DataSpec()
    accuracy: AccuracySpec = AccuracySpec(max_drop=0.01)
    targets: dict[str, TargetSpec] = Field(default_factory=lambda: {"cpu": TargetSpec()})
    distill: DistillSpec | None = None
    base_dir: Path = Field(default=Path("."), exclude=True)

    @field_validator("name")
    @classmethod
    def _name(cls, name: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}", name):
            raise ValueError("use letters, digits, '.', '_' and '-' only (it names the output folder)")
        return name

    @field_validator("targets", mode="before")
    @classmethod
    def _targets(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = [value]
        if isinstance(value, list):
            value = {str(t): {} for t in value}
        if isinstance(value, dict):
            from edgepipe.targets import TARGETS

            for name in value:
                if name not in TARGETS:
                    raise ValueError(f"unknown target '{name}'; valid targets: {', '.join(TARGETS)}")
            value = {k: (v if v is not None else {}) for k, v in value.items()}
        return value

    @model_validator(mode="after")
    def _consistent(self) -> Recipe:
        if self.model.kind == "torch" and not self.inputs:
            raise ValueError("a torch model needs 'inputs' (name, shape, dtype of each input)")
        names = [i.name for i in self.inputs or []]
        if len(set(names)) != len(names):
            raise ValueError(f"input names repeat: {names}")
        for target, spec in self.targets.items():
            if spec.int8_passes is not None and target != "gpu":
                raise ValueError(f"targets.{target}.int8_passes is for the gpu target's int8 model; move it under targets.gpu")
            if spec.int8_passes is not None and [p.get("name") for p in spec.int8_passes][-1:] != ["quantize.tensorrt"]:
                raise ValueError("targets.gpu.int8_passes must end with {name: quantize.tensorrt} (it makes the int8 model)")
            for key in spec.shapes or {}:
                if self.inputs and key not in names:
                    raise ValueError(f"targets.{target}.shapes names '{key}', not an input; inputs: {names}")
        generation = self.model.task == "text-generation" or bool(self.model.gguf)
        metrics = [self.accuracy.metric] + [t.accuracy.metric for t in self.targets.values() if t.accuracy]
        if generation and any(m not in GENERATION_METRICS for m in metrics):
            raise ValueError(f"task text-generation measures accuracy.metric {' or '.join(GENERATION_METRICS)} (got {metrics})")
        if not generation and "perplexity" in metrics:
            raise ValueError("accuracy.metric perplexity is for task text-generation (a causal LM)")
        if generation and self.distill:
            raise ValueError("distill is not supported for task text-generation; remove the distill section")
        if self.distill and self.model.kind == "onnx":
            raise ValueError("distill needs the teacher's weights: use a torch or hf model source, not onnx")
        if self.distill and self.distill.data == "calibration" and not self.data.calibration:
            raise ValueError("distill.data is 'calibration' but data.calibration is not set; set one of them")
        return self

    def path(self, text: str) -> Path:
        """A path from the recipe, relative to the recipe file; ``pkg://package/sub/dir`` is inside an installed package."""
        if text.startswith(PKG_SCHEME):
            return package_path(text)
        return (self.base_dir / text).resolve()


PKG_SCHEME = "pkg://"


def package_path(text: str) -> Path:
    """``pkg://package/sub/path`` → that path inside the installed package (e.g. bundled model weights)."""
    import importlib.util

    package, _, rest = text.removeprefix(PKG_SCHEME).partition("/")
    try:
        spec = importlib.util.find_spec(package) if package.isidentifier() else None
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise BadInput(f"recipe: {text}: no installed Python package '{package}'; pip install it (pkg:// names a package)")
    return (Path(next(iter(spec.submodule_search_locations))) / rest).resolve()


def _unwrap(annotation: Any) -> type[BaseModel] | None:
    """The pydantic model inside an annotation like ``list[X] | None``."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = _unwrap(arg)
        if found is not None:
            return found
    return None


def _model_at(loc: tuple[Any, ...]) -> type[BaseModel] | None:
    """The recipe class whose fields live at ``loc`` (for did-you-mean)."""
    cls: type[BaseModel] | None = Recipe
    parts = list(loc)
    while parts and cls is not None:
        part = parts.pop(0)
        if isinstance(part, int):
            continue
        field = cls.model_fields.get(str(part))
        if field is None:
            return None
        cls = _unwrap(field.annotation)
        if cls is TargetSpec and parts:
            parts.pop(0)  # targets.<name>: the target name is a key, not a field
    return cls


def _format_error(err: dict[str, Any]) -> str:
    loc = tuple(err.get("loc", ()))
    where = ".".join(str(p) for p in loc) or "recipe"
    if err["type"] == "extra_forbidden":
        owner = _model_at(loc[:-1])
        known = [f for f in (owner.model_fields if owner else {}) if f != "base_dir"]
        close = difflib.get_close_matches(str(loc[-1]), known, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else (f"; valid keys: {', '.join(known)}" if known else "")
        return f"recipe: unknown key '{where}'{hint}"
    if err["type"] == "missing":
        return f"recipe: '{where}' is required"
    msg = err.get("msg", "invalid").removeprefix("Value error, ")
    value = err.get("input")
    shown = f" (got {value!r})" if not isinstance(value, dict | list) and value is not None else ""
    return f"recipe: {where}: {msg}{shown}" if loc else f"recipe: {msg}"  # whole-recipe checks name their own keys


def parse_recipe(data: Any, base_dir: Path) -> Recipe:
    """Validate a recipe mapping; the first problem becomes a BadInput line."""
    if not isinstance(data, dict):
        raise BadInput("recipe: the file must be a YAML mapping (name:, model:, ...)")
    try:
        recipe = Recipe.model_validate({**data, "base_dir": base_dir})
    except ValidationError as exc:
        raise BadInput(one_line(_format_error(exc.errors()[0]))) from None
    _check_files(recipe)
    return recipe


def load_recipe(path: str | Path) -> Recipe:
    """Read and validate a recipe file; paths inside it are relative to it."""
    path = Path(path)
    if not path.is_file():
        raise BadInput(f"recipe {path} not found")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise BadInput(f"recipe {path}: not valid YAML{where}: {getattr(exc, 'problem', exc)}") from None
    except UnicodeDecodeError:
        raise BadInput(f"recipe {path}: not a UTF-8 text file") from None
    return parse_recipe(data, path.parent.resolve())


def _check_files(recipe: Recipe) -> None:
    src = recipe.model
    if src.onnx and not recipe.path(src.onnx).is_file():
        raise BadInput(f"recipe: model.onnx file {recipe.path(src.onnx)} not found")
    if src.gguf and not (recipe.path(src.hf) / src.gguf if src.hf else recipe.path(src.gguf)).is_file():
        where = recipe.path(src.hf) / src.gguf if src.hf else recipe.path(src.gguf)
        raise BadInput(f"recipe: model.gguf file {where} not found")
    if src.hf and not recipe.path(src.hf).is_dir():  # pkg:// names a folder inside an installed package
        raise BadInput(f"recipe: model.hf folder {recipe.path(src.hf)} not found")
    refs = {
        "model.torch": src.torch,
        "data.calibration": recipe.data.calibration,
        "data.eval": recipe.data.eval,
        "data.prompts": recipe.data.prompts,
        "accuracy.metric": recipe.accuracy.metric if ".py:" in recipe.accuracy.metric else None,
        "distill.student": recipe.distill.student if recipe.distill else None,
        "distill.data": recipe.distill.data if recipe.distill and recipe.distill.data != "calibration" else None,
    }
    for key, ref in refs.items():
        if not ref:
            continue
        if is_module_ref(ref):
            _check_module(key, ref)
            continue
        file_part = ref.rpartition(":")[0] if ".py:" in ref else ref
        if not recipe.path(file_part).exists():
            raise BadInput(f"recipe: {key} file {recipe.path(file_part)} not found (paths are relative to the recipe)")


def _check_module(key: str, ref: str) -> None:
    """``package.module:function``: its top-level package must be installed (found without importing it)."""
    import importlib.util

    top = ref.partition(":")[0].partition(".")[0]
    try:
        found = importlib.util.find_spec(top) is not None
    except (ImportError, ValueError):
        found = False
    if not found:
        raise BadInput(f"recipe: {key} '{ref}': no installed module '{top}'; pip install it, or name a file as path.py:function")
