"""Calibration and evaluation data: Python loaders, .npz files or text files, checked against the model."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np

from edgepipe.core.errors import BadInput
from edgepipe.core.loader import load_callable

Batch = dict[str, np.ndarray]
Labelled = tuple[Batch, np.ndarray | None]
Encoder = Callable[[list[str]], Batch]  # texts -> model inputs (an HF tokenizer)
NPZ_BATCH = 32
TEXT_BATCH = 32
TEXT_SUFFIXES = (".txt", ".text")


def calibration_source(ref: str, base: Path, encoder: Encoder | None = None, images: tuple | None = None) -> Callable[[], Iterator[Batch]]:
    """A re-iterable calibration source (each call starts over); ``images``: (preprocess, input name)."""
    if (base / ref).is_dir():
        from edgepipe.sources.images import image_batches

        folder, spec, name = (base / ref).resolve(), *_image_spec(images, ref)
        return lambda: (inputs for inputs, _ in image_batches(folder, spec, name))
    if ref.endswith(".npz"):
        path = (base / ref).resolve()
        return lambda: (inputs for inputs, _ in _npz_batches(path))
    if ref.endswith(TEXT_SUFFIXES):
        batches = [inputs for inputs, _ in _text_batches((base / ref).resolve(), encoder)]
        return lambda: iter(batches)
    fn = load_callable(ref, base)
    return lambda: iter(_call(fn, ref))


def eval_batches(ref: str, base: Path, encoder: Encoder | None = None, images: tuple | None = None) -> list[Labelled]:
    """All evaluation batches, in memory: (inputs, labels or None; class sub-folders give labels)."""
    if (base / ref).is_dir():
        from edgepipe.sources.images import image_batches

        return list(image_batches((base / ref).resolve(), *_image_spec(images, ref)))
    if ref.endswith(".npz"):
        return list(_npz_batches((base / ref).resolve()))
    if ref.endswith(TEXT_SUFFIXES):
        return list(_text_batches((base / ref).resolve(), encoder))
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


def _image_spec(images: tuple | None, ref: str) -> tuple:
    if images is None or images[0] is None:
        raise BadInput(f"data '{ref}' is a folder of images: declare its preprocessing under data.images (size, mode, scale, mean, std, layout)")
    spec, name = images
    if not (spec.input or name):
        raise BadInput("data.images.input: name the model input the images feed (the recipe declares no single input)")
    return spec, spec.input or name


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


def read_lines(path: Path) -> list[str]:
    """One example per line; blank lines and lines starting with '#' (source notes) are skipped."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise BadInput(f"text data file {path} not found (paths are relative to the recipe)") from None
    except UnicodeDecodeError:
        raise BadInput(f"{path}: not a UTF-8 text file") from None
    lines = [line.strip() for line in text.splitlines()]
    return [line for line in lines if line and not line.startswith("#")]


def _text_batches(path: Path, encoder: Encoder | None) -> Iterator[Labelled]:
    if encoder is None:
        raise BadInput(f"{path.name}: text data (one example per line) needs a model with a tokenizer (model.hf)")
    lines = read_lines(path)
    if not lines:
        raise BadInput(f"{path}: holds no examples (one per line; '#' lines are comments)")
    for i in range(0, len(lines), TEXT_BATCH):
        yield encoder(lines[i : i + TEXT_BATCH]), None


def count_samples(batches: Iterable[Batch]) -> int:
    """Samples (first-axis length) over all batches."""
    return sum(len(next(iter(b.values()))) for b in batches if b)


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
