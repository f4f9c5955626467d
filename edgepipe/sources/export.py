"""Model sources to a float32 ONNX reference, checked against the source framework."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import logging
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

logger = logging.getLogger(__name__)

Batch = dict[str, np.ndarray]
Outputs = dict[str, np.ndarray]
InputSpecs = dict[str, tuple[str, list[int | str]]]
# atol counts in units of the output's own scale (its largest |value|, at least 1): float32 rounding in a deep net
# grows with the size of what it sums, so an element that cancels to ~0 in a large output (fcn_resnet50: peak 2.9,
# 8.4 M elements) may differ by more than 1e-4 while the export is right; a frozen shape or a wrong op still moves
# outputs by a sizeable part of that scale.
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


def _instead(size: int, tried: int) -> list[int]:
    """Other sizes to check when the source model itself does not run at ``tried`` (a dim it pools or convolves
    down: a length of 1 is too short for a stride-2 pool): smaller ones for the small side, larger for the large."""
    if tried < size:
        return [n for n in dict.fromkeys((2, size // 2, size - 1)) if tried < n < size]
    return [n for n in dict.fromkeys((size + 1, 2 * size, 4 * size)) if n != tried]


def export_atol(ref: np.ndarray) -> float:
    """EXPORT_ATOL in units of the reference output's scale (its largest finite |value|, at least 1)."""
    finite = np.abs(ref[np.isfinite(ref)]) if np.issubdtype(ref.dtype, np.floating) else np.abs(ref)
    return EXPORT_ATOL * max(1.0, float(finite.max(initial=0.0)))


def verify_export(
    onnx_path: Path, reference: Callable[[Batch], Outputs], specs: InputSpecs, real: Batch | None, export_sizes: dict[str, int]
) -> list[dict]:
    """Run ONNX (ORT) and the source on each size plan; a divergence is a CheckFailed.

    A size the source model itself rejects is no test of the export: the next size on that side is checked instead
    (none that runs: that side is left out, and the log says so)."""
    runner = Runner(onnx_path)
    results = []
    for sizes in check_sizes(specs, export_sizes):
        varied = [d for d in sizes if sizes[d] != export_sizes[d]]
        candidates = [sizes] + [{**sizes, varied[0]: n} for n in _instead(export_sizes[varied[0]], sizes[varied[0]])] if varied else [sizes]
        for plan in candidates:
            feed = sample_batch(specs, real, plan)
            try:
                want = reference(feed)
            except Exception as exc:
                if not varied:
                    raise
                logger.info(f"export check: the source model does not run at sizes {plan} ({type(exc).__name__}: {one_line(str(exc))[:120]})")
                continue
            break
        else:
            logger.warning(f"export check: the source model runs at no size tried for '{varied[0]}' on this side "
                           f"({[c[varied[0]] for c in candidates]}); checked at the others only")
            continue
        try:
            got = runner.run(feed)
        except Exception as exc:
            raise CheckFailed(
                f"export check failed: the ONNX model does not run at sizes {plan}, where the source model does "
                f"({type(exc).__name__}: {one_line(str(exc))[:200]}); the exporter may have fixed a dynamic dim"
            ) from None
        for name, ref in want.items():
            atol = export_atol(ref)
            cmp = compare(got[name], ref, atol, EXPORT_RTOL)
            results.append({"sizes": plan, "output": name, **{k: cmp[k] for k in ("passed", "max_abs", "max_rel")}})
            if not cmp["passed"]:
                raise CheckFailed(
                    f"export check failed: output '{name}' at sizes {plan} differs from the source model "
                    f"(max abs {cmp['max_abs']:.3g}, max rel {cmp['max_rel']:.3g}; tolerance atol {atol:.3g}, "
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

    def export(dynamo: bool) -> list[warnings.WarningMessage]:
        with muted("torch.onnx"), warnings.catch_warnings(record=True) as caught, contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("always")
            torch.onnx.export(
                module,
                args,
                str(path),
                input_names=list(specs),
                output_names=out_names,
                dynamic_axes=dynamic_axes or None,
                dynamo=dynamo,
                external_data=_param_bytes(module) > external_threshold(),
                **kwargs,
            )
        return caught

    dynamo = recipe.model.exporter == "dynamo"
    try:
        try:
            caught = export(dynamo)
        except Exception as exc:
            fixed = _specialized(exc, specs)
            if not (dynamo and fixed and "exporter" not in recipe.model.model_fields_set):
                raise
            # torch.export fixed a declared dynamic dim (max_pool1d does, for one): the TorchScript tracer keeps it
            # dynamic; the export check below runs it at three sizes of every dynamic dim either way
            logger.warning(f"the dynamo exporter fixed {fixed} to the example's size; exported with the TorchScript "
                           "exporter instead (model.exporter: torchscript)")
            dynamo = False
            caught = export(dynamo)
    except Exception as exc:
        why = explain(exc) or f"{type(exc).__name__}: {exc}"
        fixed = _specialized(exc, specs) if dynamo else None
        if fixed:
            why = (f"it fixed {fixed} to the example's size (an op in the model needs that size static); "
                   "use model.exporter: torchscript, or a number for that dim in inputs[].shape")
        raise BadInput(f"torch.onnx export failed ({'dynamo' if dynamo else 'torchscript'} exporter): {why}") from None
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


_STATIC = re.compile(r"inferred a static shape of (\d+) for dimension inputs\['([^']+)'\]\.shape\[(\d+)\]")


def _specialized(exc: BaseException, specs: InputSpecs) -> str | None:
    """'input x axis 2 (time)' when torch.export turned a declared dynamic dim into a constant, else None."""
    found = _STATIC.search(str(exc))
    if found is None:
        return None
    positional = list(specs)  # torch.export names the inputs by the forward's parameters, not by the recipe
    name, axis = found.group(2), int(found.group(3))
    if name not in specs and len(positional) == 1:
        name = positional[0]
    dim = specs[name][1][axis] if name in specs and axis < len(specs[name][1]) else None
    return f"input {name} axis {axis}" + (f" ('{dim}')" if isinstance(dim, str) else "")


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
