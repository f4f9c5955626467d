"""Model sources to a float32 ONNX reference, checked against the source framework."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import re
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx

from edgepipe.core.artifact import sha256_file
from edgepipe.core.errors import BadInput, CheckFailed, explain, one_line
from edgepipe.core.loader import load_callable
from edgepipe.core.logs import muted
from edgepipe.core.modelio import external_threshold
from edgepipe.core.runtime import Runner
from edgepipe.recipe import Recipe
from edgepipe.sources.accuracy import compare

Batch = dict[str, np.ndarray]
Outputs = dict[str, np.ndarray]
InputSpecs = dict[str, tuple[str, list[int | str]]]
EXPORT_ATOL, EXPORT_RTOL = 1e-4, 1e-3
# TracerWarnings that mean a tensor value decided Python control flow during tracing.
_FROZEN = re.compile(r"Python (boolean|value|index|integer|float)|might cause the trace to be incorrect")
ONNX_TO_NP = {1: "float32", 10: "float16", 11: "float64", 7: "int64", 6: "int32", 3: "int8", 2: "uint8", 9: "bool"}


@dataclasses.dataclass
class Source:
    """The float32 ONNX model every target starts from, and how to get reference outputs."""

    onnx_path: Path
    reference: Callable[[Batch], Outputs]
    inputs: InputSpecs
    outputs: list[str]
    kind: str
    sha256: str
    export_check: list[dict] = dataclasses.field(default_factory=list)
    extra_files: dict[str, Path] = dataclasses.field(default_factory=dict)  # e.g. tokenizer files
    distill: dict = dataclasses.field(default_factory=dict)  # teacher/student/metrics when distilled


def onnx_io(path: Path) -> tuple[InputSpecs, list[str]]:
    """Input specs (dtype, shape with names for dynamic dims) and output names of an ONNX file."""
    model = onnx.load(str(path), load_external_data=False)
    inits = {i.name for i in model.graph.initializer}
    specs: InputSpecs = {}
    for value in model.graph.input:
        if value.name in inits:
            continue
        t = value.type.tensor_type
        shape = [d.dim_value if d.HasField("dim_value") else (d.dim_param or f"dim{i}") for i, d in enumerate(t.shape.dim)]
        specs[value.name] = (ONNX_TO_NP.get(t.elem_type, "float32"), shape)
    return specs, [o.name for o in model.graph.output]


def check_onnx_file(path: Path) -> None:
    """onnx.checker on a file, every failure (corrupt bytes included) as one BadInput line."""
    if path.is_file() and path.stat().st_size == 0:
        raise BadInput(f"{path} is empty (0 bytes); re-export the model")
    try:
        onnx.checker.check_model(str(path))
    except Exception as exc:
        detail = "; ".join(line.strip() for line in str(exc).splitlines() if line.strip())  # the checker's lines as one
        raise BadInput(f"{path} is not a valid ONNX model: {detail}") from None


def load_onnx_source(recipe: Recipe, workdir: Path) -> Source:
    path = recipe.path(recipe.model.onnx or "")
    check_onnx_file(path)
    inputs, outputs = onnx_io(path)
    _check_declared(recipe, inputs, outputs, path.name)
    runner = Runner(path)
    return Source(path, runner.run, inputs, outputs, "onnx", sha256_file(path))


def _check_declared(recipe: Recipe, inputs: InputSpecs, outputs: list[str], what: str) -> None:
    if recipe.inputs:
        declared = [i.name for i in recipe.inputs]
        if sorted(declared) != sorted(inputs):
            raise BadInput(f"recipe inputs {declared} do not match {what}'s inputs {list(inputs)}; rename them to match")
    if recipe.outputs and sorted(recipe.outputs) != sorted(outputs):
        raise BadInput(f"recipe outputs {recipe.outputs} do not match {what}'s outputs {outputs}; rename them to match")


def sample_batch(specs: InputSpecs, real: Batch | None, sizes: dict[str, int], seed: int = 0) -> Batch:
    """A batch with the given sizes for named dims: real data resized where given, else random."""
    rng = np.random.default_rng(seed)
    batch: Batch = {}
    for name, (dtype, shape) in specs.items():
        want = [d if isinstance(d, int) else sizes[d] for d in shape]
        if real is not None and name in real and real[name].ndim == len(want):
            arr = real[name]
            for axis, n in enumerate(want):
                reps = -(-n // arr.shape[axis])
                arr = np.take(np.concatenate([arr] * reps, axis=axis) if reps > 1 else arr, range(n), axis=axis)
            batch[name] = arr.astype(dtype)
        elif np.issubdtype(np.dtype(dtype), np.floating):
            batch[name] = rng.standard_normal(want).astype(dtype)
        else:
            batch[name] = rng.integers(0, 2, size=want).astype(dtype)
    return batch


def check_sizes(specs: InputSpecs, export_sizes: dict[str, int]) -> list[dict[str, int]]:
    """The export size, then two other sizes of every dynamic dim, one dim varied at a time."""
    plans = [dict(export_sizes)]
    for dim, size in export_sizes.items():
        for other in (1 if size > 1 else 2, size + 3):
            plans.append({**export_sizes, dim: other})
    return plans


def verify_export(
    onnx_path: Path, reference: Callable[[Batch], Outputs], specs: InputSpecs, real: Batch | None, export_sizes: dict[str, int]
) -> list[dict]:
    """Run ONNX (ORT) and the source on each size plan; a divergence is a CheckFailed."""
    runner = Runner(onnx_path)
    results = []
    for sizes in check_sizes(specs, export_sizes):
        feed = sample_batch(specs, real, sizes)
        got, want = runner.run(feed), reference(feed)
        for name, ref in want.items():
            cmp = compare(got[name], ref, EXPORT_ATOL, EXPORT_RTOL)
            results.append({"sizes": sizes, "output": name, **{k: cmp[k] for k in ("passed", "max_abs", "max_rel")}})
            if not cmp["passed"]:
                raise CheckFailed(
                    f"export check failed: output '{name}' at sizes {sizes} differs from the source model "
                    f"(max abs {cmp['max_abs']:.3g}, max rel {cmp['max_rel']:.3g}; tolerance atol {EXPORT_ATOL}, "
                    f"rtol {EXPORT_RTOL}); data-dependent control flow or an unsupported op may be frozen into the graph"
                )
    return results


def call_factory(recipe: Recipe) -> object:
    """The recipe's torch factory called with its ``args`` (keyword arguments)."""
    factory = load_callable(recipe.model.torch or "", recipe.base_dir)
    args = dict(recipe.model.args or {})
    try:
        return factory(**args)
    except TypeError as exc:
        if args and "argument" in str(exc):
            raise BadInput(f"model factory '{recipe.model.torch}' does not take model.args {sorted(args)}: {exc}") from None
        raise BadInput(f"model factory '{recipe.model.torch}' failed: {type(exc).__name__}: {exc}") from None
    except Exception as exc:
        raise BadInput(f"model factory '{recipe.model.torch}' failed: {type(exc).__name__}: {exc}") from None


def export_torch(recipe: Recipe, workdir: Path, real: Batch | None, module: object | None = None) -> Source:
    """torch.onnx export with named inputs/outputs and the recipe's dynamic dims, then checked.

    ``module`` replaces the recipe's factory (a distilled student)."""
    import torch

    if module is None:
        module = call_factory(recipe)
    if not isinstance(module, torch.nn.Module):
        raise BadInput(f"model factory '{recipe.model.torch}' returned {type(module).__name__}, not a torch.nn.Module")
    module.eval()
    specs: InputSpecs = {i.name: (i.dtype, list(i.shape)) for i in recipe.inputs or []}
    dims = {d for _, shape in specs.values() for d in shape if isinstance(d, str)}
    export_sizes = {d: 2 for d in dims}  # >1: the exporter specializes sizes 0 and 1
    if real is not None:
        for name, (_, shape) in specs.items():
            for axis, d in enumerate(shape):
                if isinstance(d, str) and name in real and real[name].ndim == len(shape):
                    export_sizes[d] = max(2, min(real[name].shape[axis], 8))

    def reference(feed: Batch) -> Outputs:
        with torch.no_grad():
            result = module(*[torch.from_numpy(np.ascontiguousarray(feed[n])) for n in specs])
        return _name_outputs(result, recipe.outputs)

    example = sample_batch(specs, real, export_sizes)
    try:
        out_names = list(reference(example))
    except BadInput:
        raise
    except Exception as exc:
        shapes = {k: list(v.shape) for k, v in example.items()}
        raise BadInput(one_line(f"the model fails on inputs shaped like the recipe's {shapes}: {type(exc).__name__}: {exc}; check inputs[].shape and dtype")) from None
    dynamic_axes = {n: {a: d for a, d in enumerate(s) if isinstance(d, str)} for n, (_, s) in specs.items()}
    dynamic_axes = {k: v for k, v in dynamic_axes.items() if v}
    path = workdir / "source.onnx"
    args = tuple(torch.from_numpy(example[n]) for n in specs)
    kwargs = {"opset_version": recipe.model.opset} if recipe.model.opset else {}
    try:
        with muted("torch.onnx"), warnings.catch_warnings(record=True) as caught, contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("always")
            torch.onnx.export(
                module,
                args,
                str(path),
                input_names=list(specs),
                output_names=out_names,
                dynamic_axes=dynamic_axes or None,
                dynamo=recipe.model.exporter == "dynamo",
                external_data=_param_bytes(module) > external_threshold(),
                **kwargs,
            )
    except Exception as exc:
        why = explain(exc) or f"{type(exc).__name__}: {exc}"
        raise BadInput(f"torch.onnx export failed ({recipe.model.exporter} exporter): {why}") from None
    frozen = [w for w in caught if type(w.message).__name__ == "TracerWarning" and _FROZEN.search(str(w.message))]
    if frozen:
        w = frozen[0]
        raise CheckFailed(
            f"export check failed: the tracer froze data-dependent control flow at {Path(w.filename).name}:{w.lineno} "
            f"({str(w.message).split('.')[0]}); the ONNX graph would take one branch for every input — use torch.where, "
            "or exporter: dynamo with torch.cond"
        )
    onnx.checker.check_model(str(path))
    checks = verify_export(path, reference, specs, real, export_sizes)
    return Source(path, reference, onnx_io(path)[0], out_names, "torch", module_digest(module), checks)


def _name_outputs(result: object, names: list[str] | None) -> Outputs:
    import torch

    if isinstance(result, torch.Tensor):
        values = [result]
    elif isinstance(result, list | tuple):
        values = list(result)
    elif isinstance(result, dict):
        names = names or list(result)
        values = [result[n] for n in names]
    else:
        raise BadInput(f"the model returned {type(result).__name__}; return a tensor, a tuple or a dict of tensors")
    names = names or [f"output_{i}" for i in range(len(values))]
    if len(names) != len(values):
        raise BadInput(f"recipe names {len(names)} outputs {names} but the model returns {len(values)}")
    return {n: v.detach().cpu().numpy() for n, v in zip(names, values, strict=True)}


def _param_bytes(module: object) -> int:
    return sum(t.numel() * t.element_size() for t in module.state_dict().values())  # type: ignore[attr-defined]


def module_digest(module: object) -> str:
    """sha256 over the state dict (names, dtypes, shapes, bytes) of a torch module."""
    h = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):  # type: ignore[attr-defined]
        arr = tensor.detach().cpu().contiguous().numpy()
        h.update(f"{name}|{arr.dtype}|{arr.shape}".encode())
        h.update(arr.tobytes())
    return h.hexdigest()
