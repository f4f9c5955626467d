"""fp16: float16 weights and compute, float32 I/O, overflow-prone nodes kept in float32 with reasons."""

from __future__ import annotations

import contextlib

import numpy as np
import onnx
import onnx_ir as ir
from onnx_ir.passes import common
from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16
from pydantic import Field

from edgepipe.core.errors import BadInput
from edgepipe.core.logs import quiet
from edgepipe.passes.base import EdgepipePass, PassConfig, StatsResult, clone
from edgepipe.passes.probe import TensorStats, probe

FP16_MAX = 65504.0
# Used only when there is no calibration data to measure real ranges.
OVERFLOW_PRONE = ["Exp", "Pow", "ReduceL2", "ReduceProd", "ReduceSumSquare"]


class Fp16Config(PassConfig):
    # Extra op types to keep in float32, on top of ORT's list of ops without float16 kernels.
    op_block_list: list[str] = []
    node_block_list: list[str] = []
    # A tensor stays float32 when calibration shows max |x| > 65504 / headroom: the calibration
    # set rarely holds the largest activation the model will ever see.
    headroom: float = Field(default=4.0, ge=1.0)
    max_samples: int = Field(default=256, ge=1)
    repair_rounds: int = Field(default=3, ge=0)


class Fp16(EdgepipePass):
    """Converts to float16 with ORT's converter (keep_io_types), guided by measured activation ranges.

    With calibration data, every intermediate float tensor is measured on the fp32 model; a tensor
    beyond the fp16 range (with headroom) keeps its producer and consumers in float32, and the stats
    list each such node with its reason. The result is then run on the same data: a NaN/Inf that
    still appears blocks the node that first produced it and the conversion is redone.
    """

    name = "fp16"
    Config = Fp16Config

    def call(self, model: ir.Model) -> StatsResult:
        c = self.config
        halves = [v.name for v in model.graph.initializers.values() if v.const_value is not None and v.const_value.dtype == ir.DataType.FLOAT16]
        if halves:
            return StatsResult(clone(model), modified=False, stats={"skipped": f"already float16 ({len(halves)} float16 weights)"})
        named = clone(model)
        common.NameFixPass()(named)  # the converter's node block list works on node names
        limit = FP16_MAX / c.headroom
        reasons: dict[str, tuple[str, str]] = {n: ("", "node_block_list in the recipe") for n in c.node_block_list}
        stats: dict = {}
        _weight_reasons(named, limit, reasons)
        calibration = self.context.calibration
        measured = None
        if calibration is not None:
            measured = probe(named, calibration(), c.max_samples, self.context.scratch("fp16"))
            _activation_reasons(named, measured, limit, reasons)
            stats |= {"calibration_samples": measured.samples, "measured_tensors": len(measured.max_abs),
                      "unmeasured_tensors": measured.unmeasured,
                      "max_abs_activation": float(f"{max(measured.max_abs.values(), default=0.0):.4g}")}
        ops = sorted(set(DEFAULT_OP_BLOCK_LIST) | set(c.op_block_list) | (set() if calibration else set(OVERFLOW_PRONE)))
        for node in named.graph:
            if node.op_type in set(c.op_block_list) | (set() if calibration else set(OVERFLOW_PRONE)):
                why = "op_block_list" if node.op_type in c.op_block_list else "overflow-prone op; no calibration data to measure ranges"
                reasons.setdefault(node.name, (node.op_type, why))
        result = _convert(named, ops, reasons)
        if measured is not None:
            result, stats["finite_check"] = self._repair(named, result, ops, reasons, measured)
        else:
            stats["finite_check"] = "not run: no calibration data"
        kept = [{"node": n, "op": op or _op(named, n), "reason": why} for n, (op, why) in sorted(reasons.items())]
        counts = _dtype_counts(result)
        present = {n.op_type for n in named.graph}
        stats |= {"kept_float32": kept, "blocked_op_types": sorted(set(ops) & present), "float16_weights": counts[ir.DataType.FLOAT16],
                  "float32_weights": counts[ir.DataType.FLOAT]}
        return StatsResult(result, modified=True, stats=stats)

    def _repair(self, named: ir.Model, result: ir.Model, ops: list[str], reasons: dict, fp32: TensorStats) -> tuple[ir.Model, str]:
        """Run the fp16 model on calibration data; block nodes that produce NaN/Inf and convert again.

        Only tensors of the original graph that are finite in float32 count (a mask filled with -inf
        is the model's own business), so Casts the converter adds are judged by what they feed.
        """
        c = self.config
        for _ in range(c.repair_rounds + 1):
            seen = probe(result, self.context.calibration(), c.max_samples, self.context.scratch("fp16check"), infer=False)
            # Every float16 tensor is checked, not just the outputs: ORT's CPU provider runs float16
            # ops it has no kernel for in float32, so an Inf stored in float16 may not reach the
            # output here, where on CUDA it would.
            bad = {t for t in seen.nonfinite if t in fp32.max_abs and t not in fp32.nonfinite}
            if not bad:
                return result, f"no NaN/Inf in any tensor on {seen.samples} calibration samples"
            original = {x.name for x in named.graph}
            culprits = []
            for node in _first_nonfinite(result, bad):
                # A Cast the converter inserted overflowed: its consumers must stay float32.
                culprits += [node] if node.name in original else [u for v in node.outputs for u, _ in v.uses()]
            fresh = [n for n in culprits if n.name in original and n.name not in reasons]
            if not fresh:
                break
            for node in fresh:
                reasons[node.name] = (node.op_type, "produced NaN/Inf in float16 on calibration data")
            result = _convert(named, ops, reasons)
        raise BadInput(
            f"fp16: outputs still hold NaN/Inf on calibration data after blocking {len(reasons)} nodes; "
            "add the offending op types to the fp16 pass's op_block_list or use another target"
        )


def _convert(model: ir.Model, ops: list[str], reasons: dict) -> ir.Model:
    """ORT's converter (onnxconverter-common's output fails to load in ORT): float32 I/O kept."""
    with quiet():  # it warns for every weight it clamps
        proto = convert_float_to_float16(
            ir.to_proto(model), keep_io_types=True, op_block_list=ops, node_block_list=sorted(reasons)
        )
    # Its Casts come last (unsorted) and its value_info is stale in places (an initializer left
    # float32 but typed float16): sort, then infer the types again.
    sorted_model = ir.from_proto(proto)
    common.TopologicalSortPass()(sorted_model)
    proto = ir.to_proto(sorted_model)
    del proto.graph.value_info[:]
    with contextlib.suppress(Exception):
        proto = onnx.shape_inference.infer_shapes(proto)
    model = ir.from_proto(proto)
    _drop_round_trips(model)
    _sink_batch_transposes(model)
    return model


def _sink_batch_transposes(model: ir.Model) -> int:
    """``MatMul(Transpose(x), W)`` → ``Transpose(MatMul(x, W))`` for a float16 MatMul with a 2-D ``W``.

    ORT's CPU provider segfaults creating a session (ORT_ENABLE_ALL: MatmulTransposeFusion, then the NCHWc
    transformer) on a float16 MatMul fed by a Transpose that moves batch axes, e.g. perm [1, 0, 2] in
    torchvision's ViT attention (nn.MultiheadAttention's batch_first transpose). With the last axis left in
    place and ``W`` 2-D the two orders give the same values, and the crash pattern is gone.
    """
    count = 0
    for node in list(model.graph):
        a, w = (node.inputs + (None, None))[:2] if node.op_type == "MatMul" else (None, None)
        source = a.producer() if a is not None else None
        out = node.outputs[0]
        if source is None or source.op_type != "Transpose" or out.dtype != ir.DataType.FLOAT16 or out in model.graph.outputs:
            continue
        perm = list(source.attributes.get_ints("perm", []))
        if len(perm) < 3 or perm[-1] != len(perm) - 1 or perm == list(range(len(perm))) or w is None or w.shape is None or len(w.shape) != 2:
            continue
        matmul = ir.node("MatMul", [source.inputs[0], w], name=node.name + "_before_transpose")
        matmul.outputs[0].dtype = ir.DataType.FLOAT16
        moved = ir.node("Transpose", [matmul.outputs[0]], attributes={"perm": perm}, name=source.name + "_after_matmul")
        moved.outputs[0].dtype = ir.DataType.FLOAT16
        moved.outputs[0].shape = out.shape
        model.graph.insert_before(node, [matmul, moved])
        out.replace_all_uses_with(moved.outputs[0])
        count += 1
    if count:
        common.RemoveUnusedNodesPass()(model)
    return count


def _drop_round_trips(model: ir.Model) -> None:
    """Remove float32→float16→float32 Cast pairs the converter puts between two float32 nodes.

    Left in, the value would pass through float16 anyway and overflow exactly where it must not.
    """
    outputs = set(model.graph.outputs)
    changed = False
    for node in list(model.graph):
        if node.op_type != "Cast" or node.attributes.get_int("to") != ir.DataType.FLOAT16:
            continue
        source = node.inputs[0]
        if source is None or source.dtype != ir.DataType.FLOAT:
            continue
        for user, _ in list(node.outputs[0].uses()):
            back = user.outputs[0]
            if user.op_type == "Cast" and user.attributes.get_int("to") == ir.DataType.FLOAT and back not in outputs:
                back.replace_all_uses_with(source)
                changed = True
    if changed:
        common.RemoveUnusedNodesPass()(model)


def _weight_reasons(model: ir.Model, limit: float, reasons: dict) -> None:
    for value in model.graph.initializers.values():
        if value.dtype != ir.DataType.FLOAT or value.const_value is None:
            continue
        peak = float(np.abs(value.const_value.numpy()).max(initial=0.0))
        if peak > limit:
            for user, _ in value.uses():
                reasons.setdefault(user.name, (user.op_type, f"weight {value.name} max |w| {peak:.2g} > {limit:g}"))


def _activation_reasons(model: ir.Model, measured: TensorStats, limit: float, reasons: dict) -> None:
    values = {v.name: v for v in model.graph.inputs}
    values |= {v.name: v for node in model.graph for v in node.outputs}
    for name, peak in measured.max_abs.items():
        if peak <= limit and name not in measured.nonfinite or name not in values:
            continue
        why = f"max |x| {peak:.2g} > {limit:g}" if peak > limit else "NaN/Inf already in float32"
        value = values[name]
        producer = value.producer()
        if producer is not None:
            reasons.setdefault(producer.name, (producer.op_type, f"output {name}: {why}"))
        for user, _ in value.uses():
            # A consumer in float16 would cast the tensor down and overflow at the boundary.
            reasons.setdefault(user.name, (user.op_type, f"input {name}: {why}"))


def _first_nonfinite(model: ir.Model, bad: set[str]) -> list[ir.Node]:
    """Nodes that output a non-finite tensor while none of their inputs is non-finite."""
    found = []
    for node in model.graph:
        if any(v.name in bad for v in node.outputs) and not any(v is not None and v.name in bad for v in node.inputs):
            found.append(node)
    return found


def _op(model: ir.Model, name: str) -> str:
    return next((n.op_type for n in model.graph if n.name == name), "?")


def _dtype_counts(model: ir.Model) -> dict:
    counts = {ir.DataType.FLOAT16: 0, ir.DataType.FLOAT: 0}
    for value in model.graph.initializers.values():
        dtype = value.const_value.dtype if value.const_value is not None else value.dtype
        if dtype in counts:
            counts[dtype] += 1
    return counts
