"""quantize.int4: weight-only 4-bit MatMulNBits (and optionally GatherBlockQuantized) via ORT's quantizer."""

from __future__ import annotations

import logging
from typing import Literal

import onnx
import onnx_ir as ir
from pydantic import Field, field_validator

from edgepipe.core.logs import quiet
from edgepipe.passes.base import EdgepipePass, PassConfig, StatsResult, clone
from edgepipe.passes.quantize import _already_quantized


class Int4Config(PassConfig):
    block_size: int = Field(32, ge=16)  # power of two; ORT supports 16..256
    symmetric: bool = True
    accuracy_level: int | None = Field(4, ge=0, le=4)  # 4: int8 compute for the activations (fastest on CPU)
    gather: bool = False  # also embeddings: GatherBlockQuantized (forces opset 21)
    gemm: bool = True  # rewrite Gemm with a constant weight as MatMul (+ Add) so it is quantized too
    nodes_to_exclude: list[str] = []
    bits: Literal[4, 8] = 4  # 8: int8 weight-only (MatMulNBits bits=8)
    mixed: bool = True  # text-generation: keep the most sensitive blocks at int8 when the budget fails
    max_int8_groups: int = Field(4, ge=0)  # text-generation: at most this many blocks at int8 (each adds ~6 % size)
    # text-generation: every block int4 at these larger block sizes is tried first, in order (fewer scale bytes read
    # per decode step); the first that meets the budget ships, else block_size with int8 blocks where needed
    try_block_sizes: list[int] = []
    search_scales: bool = True  # text-generation: int4 block scales searched on calibration activations (False: round-to-nearest)

    @field_validator("block_size")
    @classmethod
    def _power_of_two(cls, v: int) -> int:
        if v < 16 or v & (v - 1):
            raise ValueError(f"block_size must be a power of two (16, 32, 64, 128, 256), got {v}")
        return v

    @field_validator("try_block_sizes")
    @classmethod
    def _powers_of_two(cls, v: list[int]) -> list[int]:
        return [cls._power_of_two(size) for size in v]


class QuantizeInt4(EdgepipePass):
    """Weight-only int4: MatMuls with constant weights become com.microsoft MatMulNBits.

    Wraps ``onnxruntime.quantization.matmul_nbits_quantizer.MatMulNBitsQuantizer``
    (round-to-nearest, per block of ``block_size`` along K). Activations stay
    float. On ORT CPU this is a size win (≈ 1/7 of fp32 weights), not a speed
    win at small batch (measured on MiniLM; see the research notes). Idempotent:
    a model with quantized nodes is returned unchanged.
    """

    name = "quantize.int4"
    Config = Int4Config

    def call(self, model: ir.Model) -> StatsResult:
        if (done := _already_quantized(model)) is not None:
            return done
        c = self.config
        op_types = ("MatMul", "Gather") if c.gather else ("MatMul",)
        axes = (("MatMul", 0), ("Gather", 1)) if c.gather else (("MatMul", 0),)
        MatMulNBitsQuantizer = _quantizer_class()  # noqa: N806
        work = clone(model)
        gemms = gemm_to_matmul(work) if c.gemm else 0
        quantizer = MatMulNBitsQuantizer(
            ir.to_proto(work),
            bits=c.bits,
            block_size=c.block_size,
            is_symmetric=c.symmetric,
            accuracy_level=c.accuracy_level,
            nodes_to_exclude=list(c.nodes_to_exclude),
            op_types_to_quantize=op_types,
            quant_axes=axes,
        )
        with quiet():
            quantizer.process()
        proto: onnx.ModelProto = quantizer.model.model
        result = ir.from_proto(proto)
        counts = {op: sum(1 for n in result.graph.all_nodes() if n.op_type == op) for op in ("MatMulNBits", "GatherBlockQuantized")}
        return StatsResult(result, modified=any(counts.values()), stats={"block_size": c.block_size, "gemm_rewritten": gemms, **counts})


def _quantizer_class() -> type:
    """Import ORT's int4 quantizer without its import-time ``logging.basicConfig(level=INFO)``.

    That call would turn on INFO logs of every library (onnx-ir prints each
    rewrite) for the whole process, e.g. the CLI's output.
    """
    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    root.setLevel(level)
    for handler in root.handlers[:]:
        if handler not in handlers:
            root.removeHandler(handler)
    return MatMulNBitsQuantizer


def gemm_to_matmul(model: ir.Model) -> int:
    """Gemm(A, const B, C) with alpha = beta = 1 and no transA → MatMul(A, B') + C (B' = B.T if transB)."""
    count = 0
    for node in list(model.graph):
        if node.op_type != "Gemm" or node.domain != "":
            continue
        attrs = {k: v.value for k, v in node.attributes.items()}
        b = node.inputs[1]
        if attrs.get("transA", 0) or attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0:
            continue
        if b is None or b.const_value is None or not b.is_initializer() or len(b.uses()) != 1:
            continue
        if attrs.get("transB", 0):
            array = b.const_value.numpy().T.copy()
            b.const_value = ir.tensor(array, name=b.name)
            b.shape = ir.Shape(array.shape)
        matmul = ir.node("MatMul", [node.inputs[0], b], name=f"{node.name}/matmul")
        last = matmul
        if len(node.inputs) > 2 and node.inputs[2] is not None:
            last = ir.node("Add", [matmul.outputs[0], node.inputs[2]], name=f"{node.name}/bias")
        model.graph.insert_before(node, [matmul] if last is matmul else [matmul, last])
        out = node.outputs[0]
        last.outputs[0].shape, last.outputs[0].type = out.shape, out.type
        name = out.name
        out.replace_all_uses_with(last.outputs[0], replace_graph_outputs=True)
        out.name, last.outputs[0].name = f"{name}__gemm", name  # graph outputs keep their names
        model.graph.remove(node, safe=True)
        count += 1
    return count
