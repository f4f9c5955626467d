"""Fixed input shapes from the data: batch 1, every other dynamic dim the longest the eval/calibration data holds."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np

InputSpecs = dict[str, tuple[str, list[int | str]]]
PAD_TO = 16  # token inputs: the longest sequence rounded up to a multiple of this (zero-padded at run time)


def longest_shapes(
    inputs: InputSpecs,
    eval_batches: list[tuple[dict[str, np.ndarray], object]],
    calibration: Callable[[], Iterable[dict[str, np.ndarray]]] | None,
    max_length: int | None = None,
) -> dict[str, list[int]]:
    """``{input: [1, n, ...]}`` for inputs with a dynamic dim past the batch axis (text: the sequence).

    ``n`` is the longest the data holds; integer inputs (token ids, masks) are rounded up to a multiple of
    ``PAD_TO`` (capped at ``max_length``), since shorter ones are zero-padded at run time; float inputs are
    never padded, so they keep the longest size seen. Inputs whose only dynamic dim is the batch are left
    out (a fixed-shape target sets those dims to 1).
    """
    wanted = {name: shape for name, (_, shape) in inputs.items() if any(isinstance(d, str) for d in shape[1:])}
    if not wanted:
        return {}
    longest: dict[str, list[int]] = {}
    batches = [b for b, _ in eval_batches] + (list(calibration()) if calibration is not None else [])
    for batch in batches:
        for name, shape in wanted.items():
            arr = batch.get(name)
            if arr is None or arr.ndim != len(shape):
                continue
            seen = longest.setdefault(name, [0] * len(shape))
            longest[name] = [max(a, b) for a, b in zip(seen, arr.shape, strict=True)]
    out = {}
    for name, shape in wanted.items():
        if name not in longest:
            continue
        integer = np.issubdtype(np.dtype(inputs[name][0]), np.integer)
        fixed = [1]
        for axis, dim in enumerate(shape[1:], start=1):
            if isinstance(dim, int):
                fixed.append(dim)
                continue
            n = longest[name][axis]
            if integer:
                n = -(-n // PAD_TO) * PAD_TO
                n = min(n, max_length) if max_length else n
            fixed.append(max(n, 1))
        out[name] = fixed
    return out
