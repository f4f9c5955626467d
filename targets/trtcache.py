"""TensorRT's native calibration cache (implicit INT8): written from calibration ranges with abs-max."""

from __future__ import annotations

import struct
from pathlib import Path

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
    """Write ``name: hexscale`` lines under the TRT header; returns the scales written."""
    scales = {name: scale_of(*ranges[name]) for name in sorted(ranges)}
    lines = [HEADER, *(f"{name}: {encode(s)}" for name, s in scales.items())]
    path.write_text("\n".join(lines) + "\n", encoding="ascii")
    return scales


def read_cache(path: Path) -> dict[str, float]:
    """Parse a native cache the way ORT's TensorRT provider does (ReadDynamicRange): name → scale."""
    lines = path.read_text(encoding="ascii").splitlines()
    if not lines or not lines[0].startswith("TRT-"):
        raise ValueError(f"{path}: not a TensorRT calibration cache (no TRT- header)")
    scales = {}
    for line in lines[1:]:
        name, _, hexbits = line.rpartition(": ")
        scales[name] = struct.unpack(">f", struct.pack(">I", int(hexbits, 16)))[0]
    return scales
