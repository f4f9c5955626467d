"""Is a source graph a transformer encoder (BERT-like text, or a ViT / Swin vision transformer)? The cpu and mobile
targets give those their own default int8: dynamic (docs/decisions.md)."""

from __future__ import annotations

import onnx_ir as ir

INTEGER = {ir.DataType.INT64, ir.DataType.INT32}
FUSED_ATTENTION = {"Attention", "MultiHeadAttention"}  # com.microsoft: an already-fused export
# between the scores' MatMul and the Softmax: scaling, the mask, casts and reshapes
SCORE_OPS = {"Div", "Mul", "Add", "Sub", "Where", "Cast", "Reshape", "Transpose"}
PROBS_OPS = {"Cast", "Dropout", "Where", "Identity", "Reshape", "Transpose"}  # between the Softmax and ·V (DeBERTa: a Reshape)
MAX_HOPS = 6
CONVS = {"Conv", "ConvTranspose"}
# A vision transformer's only convolution is its patch embedding (ViT, Swin); a hybrid whose convolutions carry the
# compute (MaxViT, MobileViT) or a CNN is no transformer encoder here: dynamic int8 runs a Conv as ConvInteger,
# slower than float (MaxViT-T 0.62x, SqueezeNet 1.1 0.25x on cpu; benchmarks/RESULTS.md).
MAX_CONVS = 1


def text_encoder(model: ir.Model | None) -> bool:
    """Token inputs (integer ids) and self-attention: a Softmax over the product of two activations (Q·Kᵀ) whose
    probabilities multiply another activation (·V), or ORT's fused Attention. A vision transformer (float pixels)
    or a CNN is not one."""
    if model is None or not any(v.dtype in INTEGER for v in model.graph.inputs):
        return False
    return _self_attention(model)


def transformer_encoder(model: ir.Model | None) -> bool:
    """A text encoder, or a vision transformer: self-attention and at most MAX_CONVS convolutions (the patch
    embedding), whatever its inputs (float pixels). Its default cpu / mobile int8 is dynamic: on ViT-B/16, ViT-B/32
    and Swin-T it meets a 0.98 cosine budget plainly where static QDQ needs the fallback on the ViTs; int8 time
    against static: Swin-T 8-17 % faster, ViT-B/16 2-4 % and ViT-B/32 10 % slower (benchmarks/RESULTS.md,
    "Vision transformers: dynamic int8")."""
    if model is None:
        return False
    if text_encoder(model):
        return True
    return sum(1 for n in model.graph if n.op_type in CONVS) <= MAX_CONVS and _self_attention(model)


def _self_attention(model: ir.Model) -> bool:
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
