"""cpu: ONNX Runtime CPU provider; ORT graph optimization, then int8."""

from __future__ import annotations

from typing import Any

from edgepipe.targets.base import Target, TargetContext
from edgepipe.targets.encoder import transformer_encoder


class CpuTarget(Target):
    """Static QDQ int8 (per-channel weights) with calibration data, dynamic int8 without; a transformer encoder
    (text, or a vision transformer) gets dynamic int8 either way (docs/decisions.md)."""

    name = "cpu"
    description = "ONNX Runtime, CPU provider, int8"
    speed_checked = True  # int8 ships only where it is not slower than float (targets/speed.py)
    reads_source = True  # a transformer encoder's default int8 is dynamic (targets/encoder.py)

    def default_passes(self, ctx: TargetContext) -> list[dict[str, Any]]:
        dynamic = not ctx.has_calibration or transformer_encoder(ctx.source)
        quantize = {"name": "quantize.dynamic"} if dynamic else {"name": "quantize.static"}
        return [{"name": "cleanup"}, {"name": "optimize.ort", "level": "basic"}, quantize]
