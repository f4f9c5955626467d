"""A folder of images as calibration/eval data, with the preprocessing declared in the recipe."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np

from edgepipe.core.errors import BadInput
from edgepipe.recipe import ImagePreprocess

SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
BATCH = 32


def image_files(folder: Path) -> tuple[list[Path], list[int] | None, list[str]]:
    """Images directly in ``folder`` (no labels), or in one sub-folder per class (labels = sorted class index)."""
    if not folder.is_dir():
        raise BadInput(f"image folder {folder} not found (paths are relative to the recipe)")
    classes = sorted(p.name for p in folder.iterdir() if p.is_dir())
    if classes:
        files, labels = [], []
        for index, name in enumerate(classes):
            found = sorted(p for p in (folder / name).iterdir() if p.suffix.lower() in SUFFIXES)
            files += found
            labels += [index] * len(found)
        result: tuple[list[Path], list[int] | None, list[str]] = (files, labels, classes)
    else:
        result = (sorted(p for p in folder.iterdir() if p.suffix.lower() in SUFFIXES), None, [])
    if not result[0]:
        raise BadInput(f"{folder}: no images ({', '.join(sorted(SUFFIXES))}) in it or in its class sub-folders")
    return result


def load_image(path: Path, spec: ImagePreprocess) -> np.ndarray:
    """Decode, convert, resize, scale, normalise: one float32 array in the declared layout."""
    try:
        from PIL import Image
    except ImportError:
        raise BadInput("image folders need Pillow: pip install pillow") from None
    try:
        with Image.open(path) as img:
            img = img.convert(spec.mode).resize((spec.size[1], spec.size[0]), Image.BILINEAR)
            arr = np.asarray(img, dtype=np.float32)
    except OSError as exc:
        raise BadInput(f"{path}: not a readable image ({exc})") from None
    arr = arr[..., None] if arr.ndim == 2 else arr  # HWC
    arr = (arr * spec.scale - np.asarray(spec.mean, np.float32)) / np.asarray(spec.std, np.float32)
    return arr.transpose(2, 0, 1) if spec.layout == "NCHW" else arr


def image_batches(folder: Path, spec: ImagePreprocess, input_name: str) -> Iterator[tuple[dict[str, np.ndarray], np.ndarray | None]]:
    files, labels, _ = image_files(folder)
    for i in range(0, len(files), BATCH):
        arrays = np.stack([load_image(p, spec) for p in files[i : i + BATCH]]).astype(np.float32)
        yield {input_name: arrays}, (None if labels is None else np.asarray(labels[i : i + BATCH], np.int64))
