"""Is a source graph a text transformer encoder (BERT-like)? The cpu and mobile targets give those their own default int8."""

from __future__ import annotations

import onnx_ir as ir

INTEGER = {ir.DataType.INT64, ir.DataType.INT32}
FUSED_ATTENTION = {"Attention", "MultiHeadAttention"}  # com.microsoft: an already-fused export
# between the scores' MatMul and the Softmax: scaling, the mask, casts and reshapes
SCORE_OPS = {"Div", "Mul", "Add", "Sub", "Where", "Cast", "Reshape", "Transpose"}
PROBS_OPS = {"Cast", "Dropout", "Where", "Identity", "Reshape", "Transpose"}  # between the Softmax and ·V (DeBERTa: a Reshape)
MAX_HOPS = 6


def text_encoder(model: ir.Model | None) -> bool:
    """Token inputs (integer ids) and self-attention: a Softmax over the product of two activations (Q·Kᵀ) whose
    probabilities multiply another activation (·V), or ORT's fused Attention. A vision transformer (float pixels)
    or a CNN is not one."""
    if model is None or not any(v.dtype in INTEGER for v in model.graph.inputs):
        return False
    return any(n.op_type in FUSED_ATTENTION or (n.op_type == "Softmax" and _attention(n)) for n in model.graph)


def _activation_product(node: ir.Node) -> bool:
    """A MatMul of two computed values (no weight initializer or constant on either side)."""
    return node.op_type == "MatMul" and all(v is not None and v.const_value is None and not _constant(v) for v in node.inputs)


def _constant(value: ir.Value) -> bool:
    producer = value.producer()
    return producer is not None and producer.op_type == "Constant"


def _attention(softmax: ir.Node) -> bool:
    return _reaches(softmax.inputs, lambda v: [v.producer()] if v.producer() is not None else [], SCORE_OPS, lambda n: n.inputs) \
        and _reaches(softmax.outputs, lambda v: [u for u, _ in v.uses()], PROBS_OPS, lambda n: n.outputs)


def _reaches(start, step, through: set[str], onward) -> bool:
    """A product of two activations within MAX_HOPS nodes of ``start`` (backwards to Q·Kᵀ through scaling and
    masking, or forwards to ·V), passing only ``through`` ops."""
    frontier = [v for v in start if v is not None]
    for _ in range(MAX_HOPS):
        nxt = []
        for value in frontier:
            for node in step(value):
                if _activation_product(node):
                    return True
                if node.op_type in through:
                    nxt.extend(v for v in onward(node) if v is not None and v.const_value is None)
        frontier = nxt
    return False
