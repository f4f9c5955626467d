"""cleanup: constant folding, dead code, identities, unused initializers, shape inference."""

from __future__ import annotations

import onnx_ir as ir
import onnxscript.optimizer
from onnx_ir.passes import common

from edgepipe.passes.base import EdgepipePass, PassConfig, StatsResult, clone


class CleanupConfig(PassConfig):
    fold_constants: bool = True
    shape_inference: bool = True
    # The exporter attaches stack traces to every node: bytes a device never needs.
    strip_metadata: bool = True


class Cleanup(EdgepipePass):
    """Folds constants and removes dead nodes, identities and unused values.

    Reuses onnxscript's optimizer (folding, on the same IR) and onnx-ir's
    common passes; adds nothing of its own.
    """

    name = "cleanup"
    Config = CleanupConfig

    def call(self, model: ir.Model) -> StatsResult:
        out = clone(model)
        before = _fingerprint(out)
        if self.config.fold_constants:
            onnxscript.optimizer.optimize(out, onnx_shape_inference=self.config.shape_inference)
        steps = [
            common.IdentityEliminationPass(),
            common.RemoveUnusedNodesPass(),
            common.RemoveUnusedFunctionsPass(),
            common.RemoveUnusedOpsetsPass(),
            common.DeduplicateInitializersPass(),
        ]
        if self.config.strip_metadata:
            steps.append(common.ClearMetadataAndDocStringPass())
        if self.config.shape_inference:
            steps.append(common.ShapeInferencePass())
        steps.append(common.TopologicalSortPass())
        ir.passes.PassManager(steps, steps=2)(out)
        return StatsResult(out, modified=_fingerprint(out) != before)


def _fingerprint(model: ir.Model) -> tuple:
    return (
        tuple((n.op_type, len(n.metadata_props), n.doc_string) for n in model.graph),
        tuple(sorted(model.graph.initializers)),
    )
