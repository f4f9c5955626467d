"""optimize.ort: ONNX Runtime's offline graph optimizations, saved to a portable model."""

from __future__ import annotations

from typing import Literal

import onnx_ir as ir
import onnxruntime as ort

from edgepipe.core.runtime import session
from edgepipe.passes.base import EdgepipePass, PassConfig, StatsResult, is_large, load, save

LEVELS = {
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
}


class OrtOptimizeConfig(PassConfig):
    # "basic" (constant folding, Conv+BN, redundant nodes) stays portable across
    # providers; "extended" adds CPU-specific fused contrib ops.
    level: Literal["basic", "extended"] = "basic"


class OrtOptimize(EdgepipePass):
    """Runs ORT's graph optimizer once, offline, and keeps the optimized graph."""

    name = "optimize.ort"
    Config = OrtOptimizeConfig

    def call(self, model: ir.Model) -> StatsResult:
        folder = self.context.scratch("ortopt")
        src = save(model, folder / "in.onnx")
        out = folder / "out.onnx"
        config = {
            "session.optimized_model_external_initializers_file_name": out.name + ".data",
            "session.optimized_model_external_initializers_min_size_in_bytes": "64",
        } if is_large(model) else {}
        session(src, opt_level=LEVELS[self.config.level], config=config, optimized_path=out)
        result = load(out)
        before = [n.op_type for n in model.graph]
        return StatsResult(result, modified=[n.op_type for n in result.graph] != before)
