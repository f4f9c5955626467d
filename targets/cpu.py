"""cpu: ONNX Runtime CPU provider; ORT graph optimization, then int8."""

from __future__ import annotations

from typing import Any

from edgepipe.targets.base import Target, TargetContext


class CpuTarget(Target):
    """Static QDQ int8 (per-channel weights) with calibration data, dynamic int8 without."""

    name = "cpu"
    description = "ONNX Runtime, CPU provider, int8"
    speed_checked = True  # int8 ships only where it is not slower than float (targets/speed.py)

    def default_passes(self, ctx: TargetContext) -> list[dict[str, Any]]:
        quantize = {"name": "quantize.static"} if ctx.has_calibration else {"name": "quantize.dynamic"}
        return [{"name": "cleanup"}, {"name": "optimize.ort", "level": "basic"}, quantize]
