"""shapes.fix: fixed input shapes (NNAPI and CoreML need them), with ORT's own model utilities."""

from __future__ import annotations

import onnx
import onnx_ir as ir
from pydantic import Field

from edgepipe.core.errors import BadInput
from edgepipe.passes.base import EdgepipePass, PassConfig, StatsResult, clone


class FixShapesConfig(PassConfig):
    # {input name: full shape}; inputs not named get every dynamic dim set to default_dim.
    shapes: dict[str, list[int]] = {}
    default_dim: int = Field(default=1, ge=1)


class FixShapes(EdgepipePass):
    """Makes every graph input shape static, then lets shape inference fix the outputs."""

    name = "shapes.fix"
    Config = FixShapesConfig

    def call(self, model: ir.Model) -> StatsResult:
        # Here, not at the top: `onnxruntime.tools` imports torch when it is installed (1.3 s), and every driver
        # process imports the passes (the build's preflight) without needing torch.
        from onnxruntime.tools.onnx_model_utils import fix_output_shapes, make_dim_param_fixed, make_input_shape_fixed

        proto = ir.to_proto(model)
        graph = proto.graph
        inits = {i.name for i in graph.initializer}
        inputs = {i.name: i for i in graph.input if i.name not in inits}
        unknown = sorted(set(self.config.shapes) - set(inputs))
        if unknown:
            raise BadInput(f"shapes.fix: {unknown} are not model inputs; inputs: {sorted(inputs)}")
        fixed: dict[str, list[int]] = {}
        for name, shape in self.config.shapes.items():
            try:
                make_input_shape_fixed(graph, name, list(shape))
            except ValueError as exc:
                raise BadInput(f"shapes.fix: input '{name}' cannot take shape {list(shape)}: {exc}") from None
            fixed[name] = list(shape)
        for name, value in inputs.items():
            if name in fixed:
                continue
            for dim in value.type.tensor_type.shape.dim:
                if dim.HasField("dim_param"):
                    make_dim_param_fixed(graph, dim.dim_param, self.config.default_dim)
                elif not dim.HasField("dim_value"):
                    dim.dim_value = self.config.default_dim
            fixed[name] = [d.dim_value for d in value.type.tensor_type.shape.dim]
        try:
            fix_output_shapes(proto)
        except onnx.checker.ValidationError as exc:
            raise BadInput(f"shapes.fix: the model does not check after fixing shapes {fixed}: {exc}") from None
        before = {v.name: [d if isinstance(d, int) else str(d) for d in (v.shape or [])] for v in model.graph.inputs}
        result = ir.from_proto(proto) if fixed else clone(model)
        return StatsResult(result, modified=before != fixed, stats={"inputs": fixed})
