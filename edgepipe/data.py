"""Calibration and evaluation data: Python loaders or .npz files, checked against the model."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np

from edgepipe.errors import BadInput
from edgepipe.loader import load_callable

Batch = dict[str, np.ndarray]
Labelled = tuple[Batch, np.ndarray | None]
NPZ_BATCH = 32


def calibration_source(ref: str, base: Path) -> Callable[[], Iterator[Batch]]:
    """A re-iterable calibration source (each call starts over)."""
    if ref.endswith(".npz"):
        path = (base / ref).resolve()
        return lambda: (inputs for inputs, _ in _npz_batches(path))
    fn = load_callable(ref, base)
    return lambda: iter(_call(fn, ref))


def eval_batches(ref: str, base: Path) -> list[Labelled]:
    """All evaluation batches, in memory: (inputs, labels or None)."""
    if ref.endswith(".npz"):
        return list(_npz_batches((base / ref).resolve()))
    fn = load_callable(ref, base)
    out: list[Labelled] = []
    for item in _call(fn, ref):
        if isinstance(item, tuple) and len(item) == 2:
            inputs, labels = item
        elif isinstance(item, dict):
            inputs, labels = item, None
        else:
            raise BadInput(f"data.eval '{ref}' must yield (inputs_dict, labels) or inputs_dict, got {type(item).__name__}")
        out.append((_as_batch(inputs, ref), None if labels is None else np.asarray(labels)))
    if not out:
        raise BadInput(f"data.eval '{ref}' yielded no batches")
    return out


def _call(fn: Callable[[], Iterable], ref: str) -> Iterable:
    try:
        result = fn()
        iter(result)
    except BadInput:
        raise
    except Exception as exc:
        raise BadInput(f"data loader '{ref}' failed: {type(exc).__name__}: {exc}") from None
    return result


def _as_batch(inputs: object, ref: str) -> Batch:
    if not isinstance(inputs, dict) or not inputs:
        raise BadInput(f"data '{ref}' must yield dicts of {{input_name: array}}")
    return {str(k): np.asarray(v) for k, v in inputs.items()}


def _npz_batches(path: Path) -> Iterator[Labelled]:
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except (OSError, ValueError) as exc:
        why = "corrupt, or holds pickled objects, which edgepipe never loads" if "pickle" in str(exc) else str(exc)
        raise BadInput(f"{path}: not a readable .npz file ({why}); save plain arrays with numpy.savez") from None
    labels = arrays.pop("labels", None)
    if not arrays:
        raise BadInput(f"{path}: holds no input arrays")
    counts = {len(a) for a in arrays.values()}
    if len(counts) != 1:
        raise BadInput(f"{path}: arrays differ in sample count (first axis): {sorted(counts)}")
    n = counts.pop()
    for i in range(0, n, NPZ_BATCH):
        yield {k: a[i : i + NPZ_BATCH] for k, a in arrays.items()}, (None if labels is None else labels[i : i + NPZ_BATCH])


def check_batch(batch: Batch, specs: dict[str, tuple[str, list[int | str]]], where: str) -> None:
    """Names, dtypes and ranks of a data batch against the model's inputs."""
    if set(batch) != set(specs):
        raise BadInput(
            f"{where}: data has inputs {sorted(batch)} but the model takes {sorted(specs)}; rename the keys to match"
        )
    for name, (dtype, shape) in specs.items():
        arr = batch[name]
        kind_ok = np.issubdtype(arr.dtype, np.floating) == np.issubdtype(np.dtype(dtype), np.floating)
        if not kind_ok:
            raise BadInput(f"{where}: input '{name}' is {arr.dtype} but the model wants {dtype}")
        if arr.ndim != len(shape):
            raise BadInput(f"{where}: input '{name}' has shape {list(arr.shape)} but the model wants {shape}")
        for axis, (got, want) in enumerate(zip(arr.shape, shape, strict=True)):
            if isinstance(want, int) and got != want:
                raise BadInput(f"{where}: input '{name}' has shape {list(arr.shape)}; axis {axis} must be {want}")
