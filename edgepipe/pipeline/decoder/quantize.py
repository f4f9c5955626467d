"""Weight-only int4/int8 for a decoder graph (MatMulNBits), mixed per layer, with a tied int4 embedding.

Every MatMul with a constant weight is quantized once at 4 bits and once at 8 bits
(onnxruntime's ``MatMulNBitsQuantizer``, round-to-nearest per block; the int4 scales then searched
on calibration activations, ``scales``); a precision plan
then picks, per group of MatMuls (a transformer block, or the LM head), which of the two
goes into the model, so trying a plan costs no re-quantization. When the embedding is
tied to the LM head, the embedding lookup reads the LM head's quantized weight
(GatherBlockQuantized) instead of a float table, as onnxruntime-genai's builder does.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import re

import numpy as np
import onnx
from onnx import helper, numpy_helper

from edgepipe.core.logs import quiet
from edgepipe.passes.int4 import Int4Config, _quantizer_class
from edgepipe.pipeline.decoder.scales import matmul_weights, refine

logger = logging.getLogger(__name__)
LAYER = re.compile(r"/layers\.(\d+)/")
LM_HEAD = "lm_head"


def group_of(node_name: str) -> str:
    """The precision group of a MatMul: ``layer.N`` for a transformer block's, ``lm_head`` for the head."""
    m = LAYER.search(node_name)
    return f"layer.{m[1]}" if m else LM_HEAD if "lm_head" in node_name else node_name


@dataclasses.dataclass
class Quantized:
    """The float model quantized at 4 and at 8 bits, node by node, ready to be mixed."""

    by_bits: dict[int, onnx.ModelProto]
    config: Int4Config
    searched: int = 0  # int4 MatMuls whose block scales were searched on calibration activations

    @classmethod
    def prepare(cls, model: onnx.ModelProto, config: Int4Config, bits: tuple[int, ...] = (4, 8),
                importance: dict[str, np.ndarray] | None = None) -> Quantized:
        """Quantize ``model`` at each of ``bits``; ``model`` itself is consumed (quantized in place last).

        ``importance`` (mean square activation per MatMul input channel, ``scales.input_importance``): the
        symmetric int4 weights get searched block scales (``scales.refine``) instead of round-to-nearest.
        """
        quantizer = _quantizer_class()
        by_bits, searched = {}, 0
        for k, b in enumerate(bits):
            source = model if k == len(bits) - 1 else copy.deepcopy(model)  # one float copy at most in memory
            floats = matmul_weights(source) if b == 4 and importance and config.symmetric else {}
            q = quantizer(source, bits=b, block_size=config.block_size, is_symmetric=config.symmetric,
                          accuracy_level=config.accuracy_level, nodes_to_exclude=list(config.nodes_to_exclude),
                          op_types_to_quantize=("MatMul",), quant_axes=(("MatMul", 0),))
            with quiet():
                q.process()
            by_bits[b] = q.model.model
            if floats:
                searched = refine(by_bits[b], floats, importance or {})
                del floats
        return cls(by_bits, config, searched)

    def groups(self) -> list[str]:
        """Precision groups in graph order (layer.0 … layer.N-1, lm_head)."""
        any_model = next(iter(self.by_bits.values()))
        seen = dict.fromkeys(group_of(n.name) for n in any_model.graph.node if n.op_type == "MatMulNBits")
        return [g for g in seen if g == LM_HEAD or g.startswith("layer.")]

    def build(self, plan: dict[str, int], default: int = 4, tie: bool = True) -> onnx.ModelProto:
        """A model with each group at ``plan.get(group, default)`` bits."""
        base = self.by_bits[default]
        model = onnx.ModelProto()
        model.CopyFrom(base)
        for group, bits in plan.items():
            if bits != default:
                self.swap(model, group, bits)
        if tie:
            tie_embedding(model)
        return model

    def swap(self, model: onnx.ModelProto, group: str, bits: int) -> None:
        """Put ``group``'s nodes (and their weights) at ``bits`` into ``model``, in place."""
        donor = self.by_bits[bits]
        idx, names = _producers(model, group)
        didx, dnames = _producers(donor, group)
        drop = [k for k, init in enumerate(model.graph.initializer) if init.name in names]
        for k in reversed(drop):
            del model.graph.initializer[k]
        model.graph.initializer.extend(i for i in donor.graph.initializer if i.name in dnames)
        replacement = {_key(donor.graph.node[k]): donor.graph.node[k] for k in didx}
        for k in idx:
            model.graph.node[k].CopyFrom(replacement[_key(model.graph.node[k])])


def _producers(model: onnx.ModelProto, group: str) -> tuple[list[int], set[str]]:
    """Indices of the group's MatMul/MatMulNBits nodes and the initializers only they use."""
    inits = {i.name for i in model.graph.initializer}
    idx = [k for k, n in enumerate(model.graph.node) if n.op_type in ("MatMul", "MatMulNBits") and group_of(n.name) == group]
    names = {x for k in idx for x in model.graph.node[k].input if x in inits}
    others = {x for k, n in enumerate(model.graph.node) if k not in set(idx) for x in n.input}
    return idx, names - others


def _key(node: onnx.NodeProto) -> str:
    return re.sub(r"_Q\d+$", "", node.name)


def tie_embedding(model: onnx.ModelProto) -> bool:
    """Embedding Gather over the (tied) LM head's float table → GatherBlockQuantized over its int4 weight."""
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    head = next((n for n in graph.node if n.op_type == "MatMulNBits" and group_of(n.name) == LM_HEAD), None)
    gather = next((n for n in graph.node if n.op_type == "Gather" and n.input[1] == "input_ids" and n.input[0] in inits), None)
    if head is None or gather is None or len(head.input) > 3:  # asymmetric (zero points) or no int4 head: keep the table
        return False
    attrs = {a.name: helper.get_attribute_value(a) for a in head.attribute}
    if attrs["bits"] != 4:
        return False
    vocab, hidden, block = attrs["N"], attrs["K"], attrs["block_size"]
    if hidden % block:  # a padded last block: GatherBlockQuantized reads whole blocks
        return False
    table = numpy_helper.to_array(inits[gather.input[0]])
    if table.shape != (attrs["N"], attrs["K"]) or not _is_tied(model, head, table):
        return False
    shape = numpy_helper.from_array(np.array([vocab, hidden * 4 // 8], np.int64), "/embed/tied_shape")
    reshape = helper.make_node("Reshape", [head.input[1], shape.name], ["/embed/tied_weight"], name="/embed/Reshape")
    lookup = helper.make_node("GatherBlockQuantized", ["/embed/tied_weight", gather.input[1], head.input[2]], list(gather.output),
                              name="/embed/GatherBlockQuantized", domain="com.microsoft", bits=4, block_size=block,
                              gather_axis=0, quantize_axis=1)
    position = list(graph.node).index(gather)
    graph.node.remove(gather)
    graph.node.insert(position, lookup)
    graph.node.insert(position, reshape)
    graph.initializer.append(shape)
    still_used = {x for n in graph.node for x in n.input}
    kept = [i for i in graph.initializer if i.name in still_used]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    return True


def _is_tied(model: onnx.ModelProto, head: onnx.NodeProto, table: np.ndarray) -> bool:
    """Is the LM head's (quantized) weight the embedding table? Checked on the values, not on names."""
    inits = {i.name: i for i in model.graph.initializer}
    attrs = {a.name: helper.get_attribute_value(a) for a in head.attribute}
    block = attrs["block_size"]
    q = numpy_helper.to_array(inits[head.input[1]])[:8].reshape(8, -1)  # first rows: (K/2,) uint8 each
    scales = numpy_helper.to_array(inits[head.input[2]]).reshape(attrs["N"], -1)[:8]
    low, high = (q & 0x0F).astype(np.int8) - 8, (q >> 4).astype(np.int8) - 8
    values = np.stack([low, high], -1).reshape(8, -1)[:, : attrs["K"]].astype(np.float32)
    deq = values.reshape(8, -1, block) * scales[:, :, None]
    rows = table[:8].reshape(8, -1, block)
    # int4's error is a fraction of the weights (~10 %, searched scales clip some); another table's is ~140 %
    return bool(np.linalg.norm(deq - rows) <= 0.35 * np.linalg.norm(rows))


def summary(model: onnx.ModelProto) -> dict[str, int]:
    """How many MatMuls are at 4 bits, 8 bits, float; whether the embedding is tied."""
    counts = {"int4": 0, "int8": 0, "float": 0}
    for n in model.graph.node:
        if n.op_type == "MatMulNBits":
            bits = next(a.i for a in n.attribute if a.name == "bits")
            counts[f"int{bits}"] += 1
        elif n.op_type == "MatMul" and any(i.name == n.input[1] for i in model.graph.initializer):
            counts["float"] += 1
    counts["tied_embedding"] = int(any(n.op_type == "GatherBlockQuantized" for n in model.graph.node))
    return counts
