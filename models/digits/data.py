"""Real data for the digits model: scikit-learn's load_digits, fixed split."""

from __future__ import annotations

import functools
from collections.abc import Iterator

import numpy as np

SEED = 0
TEST_SHARE = 0.2


@functools.cache
def _load() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits (images, labels), parsed once per process: a build reads the data several times."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    return digits.images, digits.target


def split() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(x_train, y_train, x_test, y_test); images float32 [N, 1, 8, 8] in [0, 1]; new arrays every call."""
    from sklearn.model_selection import train_test_split

    images, target = _load()
    x = (images / 16.0).astype(np.float32)[:, None, :, :]
    y = target.astype(np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(
        x, y, test_size=TEST_SHARE, random_state=SEED, stratify=y
    )
    return x_tr, y_tr, x_te, y_te


def calibration(samples: int = 256, batch: int = 32) -> Iterator[dict[str, np.ndarray]]:
    """Training images (never test images) for quantization calibration."""
    x_tr, _, _, _ = split()
    for i in range(0, min(samples, len(x_tr)), batch):
        yield {"image": x_tr[i : i + batch]}


def evaluation(batch: int = 64) -> Iterator[tuple[dict[str, np.ndarray], np.ndarray]]:
    """The held-out test split with labels."""
    _, _, x_te, y_te = split()
    for i in range(0, len(x_te), batch):
        yield {"image": x_te[i : i + batch]}, y_te[i : i + batch]


def training(batch: int = 64) -> Iterator[dict[str, np.ndarray]]:
    """All training images, unlabeled (distillation data: the teacher labels them)."""
    x_tr, _, _, _ = split()
    for i in range(0, len(x_tr), batch):
        yield {"image": x_tr[i : i + batch]}
