"""TensorRT's native calibration cache (implicit INT8): written from calibration ranges with abs-max."""

from __future__ import annotations

import logging
import struct
from pathlib import Path

logger = logging.getLogger(__name__)

# The header names the TensorRT version that wrote the cache and the calibrator; trtexec's
# calibrator is EntropyCalibration2 and refuses a cache made for another, whatever edgepipe
# measured with (the real method is in the sidecar). 100000 = TensorRT 10.0.
HEADER = "TRT-100000-EntropyCalibration2"


def amax(lo: float, hi: float) -> float:
    """The symmetric range: absolute maximum of both ends (ORT's own writer uses the signed max)."""
    return max(abs(lo), abs(hi))


def scale_of(lo: float, hi: float) -> float:
    a = amax(lo, hi)
    return a / 127.0 if a > 0 else 1.0  # an all-zero tensor: ORT's quantizer also uses scale 1


def encode(scale: float) -> str:
    """A float32 scale as TensorRT writes it: the hex of its IEEE-754 bits."""
    return format(struct.unpack(">I", struct.pack(">f", scale))[0], "x")


def write_cache(path: Path, ranges: dict[str, list[float]]) -> dict[str, float]:
    """Write ``name: hexscale`` lines under the TRT header; returns the scales written.

    Readers take the name up to the first ':' (ORT's ReadDynamicRange), so a name holding ':' or a line break
    cannot be written; it is left out (TensorRT then calibrates that tensor as if it had no range).
    """
    unwritable = sorted(n for n in ranges if ":" in n or "\n" in n)
    if unwritable:
        logger.warning("calibration cache: %d tensor names hold ':' and are left out (e.g. %s)", len(unwritable), unwritable[0])
    scales = {name: scale_of(*ranges[name]) for name in sorted(ranges) if name not in unwritable}
    lines = [HEADER, *(f"{name}: {encode(s)}" for name, s in scales.items())]
    path.write_text("\n".join(lines) + "\n", encoding="ascii")
    return scales
