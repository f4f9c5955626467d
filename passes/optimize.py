"""optimize.ort: ONNX Runtime's offline graph optimizations, saved to a portable model."""

from __future__ import annotations

from typing import Literal

import onnx_ir as ir
import onnxruntime as ort
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
        options = ort.SessionOptions()
        options.graph_optimization_level = LEVELS[self.config.level]
        options.optimized_model_filepath = str(out)
        options.log_severity_level = 3
        if is_large(model):
            options.add_session_config_entry("session.optimized_model_external_initializers_file_name", out.name + ".data")
            options.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "64")
        ort.InferenceSession(str(src), options, providers=["CPUExecutionProvider"])
        result = load(out)
        before = [n.op_type for n in model.graph]
        return StatsResult(result, modified=[n.op_type for n in result.graph] != before)
