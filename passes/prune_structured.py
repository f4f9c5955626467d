"""prune.structured: remove whole channels/neurons (producer rows and consumer columns together)."""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir
from onnx_ir.passes import common

from edgepipe.passes.base import EdgepipePass, StatsResult, clone
from edgepipe.passes.prune import StructuredConfig, budget_search, marker, set_marker
from edgepipe.passes.prune_activation import Activity, channel_activity, compensate

UNARY = {
    "Relu", "LeakyRelu", "PRelu", "Gelu", "FastGelu", "Erf", "Sigmoid", "Tanh", "Elu", "Selu", "Celu", "Softplus",
    "Softsign", "HardSigmoid", "HardSwish", "Mish", "Identity", "Neg", "Abs", "Sqrt", "Exp", "Clip", "Dropout",
}
BINARY = {"Add", "Sub", "Mul", "Div", "Pow", "Max", "Min"}
POOL = {"MaxPool", "AveragePool", "LpPool"}
PRODUCERS = {"Conv", "Gemm", "MatMul"}


class Unsafe(Exception):
    """A channel group whose pruning the pass cannot prove safe; it is left alone."""


@dataclasses.dataclass
class Space:
    """Where the channel lives in a value: ``axis`` (negative = from the end); ``repeat`` features per channel."""

    axis: int
    repeat: int = 1


@dataclasses.dataclass
class Group:
    """One prunable channel set: the producer, every tensor to slice, every value whose shape changes."""

    producer: ir.Node
    channels: int
    # (id(node), input index) → (node, input index, axis, repeat): constant inputs to slice
    edits: dict[tuple[int, int], tuple[ir.Node, int, int, int]] = dataclasses.field(default_factory=dict)
    reshapes: dict[tuple[int, int], tuple[ir.Node, int, int, int]] = dataclasses.field(default_factory=dict)
    depthwise: list[ir.Node] = dataclasses.field(default_factory=list)  # their ``group`` becomes the kept width
    values: dict[int, tuple[ir.Value, Space]] = dataclasses.field(default_factory=dict)
    consumers: list[str] = dataclasses.field(default_factory=list)
    pending: list[tuple[str, ir.Value, Space]] = dataclasses.field(default_factory=list)  # operands to meet later
    readers: list[tuple[ir.Node, int, int, int]] = dataclasses.field(default_factory=list)  # consumer weight slices
    reads: list[tuple[str, Space]] = dataclasses.field(default_factory=list)  # values the consumers read

    def edit(self, node: ir.Node, index: int, axis: int, repeat: int = 1, reader: bool = False) -> None:
        """Slice constant input ``index`` of ``node`` along ``axis`` (a shared constant gets a private copy)."""
        value = node.inputs[index]
        if value is None or value.const_value is None:
            raise Unsafe(f"{node.name}: input {index} is not constant")
        self.edits[(id(node), index)] = (node, index, axis, repeat)
        if reader:
            self.readers.append((node, index, axis, repeat))
            self.consumers.append(node.name or node.op_type)


class PruneStructured(EdgepipePass):
    """Removes whole output channels of Conv/Gemm/MatMul and the matching inputs of their consumers.

    For each producer with a constant weight, the channel is followed through
    per-channel ops (bias Add, Relu/Gelu and their decompositions, BatchNorm,
    pooling, Flatten/Reshape into a Gemm) to the consumers that read it
    (Conv, Gemm, MatMul with constant weights). Channels are ranked by the L1
    norm of the producer's weights (``criterion: activation``: mean |activation|
    on calibration data x consumer weights, the cut channels' mean folded into
    the consumer's bias) and the weakest ``sparsity`` share of each layer is cut
    from every tensor on the path, so the model gets smaller and faster. A path that reaches anything else (a residual Add, a graph output,
    a shared weight, an attention reshape) is skipped and reported.
    With ``max_drop`` instead of ``sparsity``, the highest sparsity within
    that accuracy drop is found by bisection (needs the build's evaluator).
    """

    name = "prune.structured"
    Config = StructuredConfig

    def call(self, model: ir.Model) -> StatsResult:
        if (done := marker(model, self.name)) is not None:
            return StatsResult(clone(model), modified=False, stats={"skipped": f"already pruned ({done})"})
        activity = None
        if self.config.criterion == "activation":
            activity = channel_activity(model, read_values(model), self.context, self.config.calibration_samples)
        if self.config.max_drop is not None:
            return budget_search(self, model, lambda m, s: prune_structured(m, s, self.config, activity))
        out, stats = prune_structured(model, self.config.target, self.config, activity)
        return StatsResult(out, modified=bool(stats["layers"]), stats=stats)


def _with_shapes(model: ir.Model) -> ir.Model:
    """A copy to trace on: identities removed, Constant nodes lifted (so shared biases read as constants), shapes."""
    out = clone(model)
    common.IdentityEliminationPass()(out)
    common.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0)(out)
    try:
        common.ShapeInferencePass()(out)  # Flatten/Reshape need the channel tensor's static shape
    except Exception:  # noqa: BLE001 - shapes are a help, not a requirement; unknown ones make groups skip
        pass
    return out


def read_values(model: ir.Model) -> dict[str, int]:
    """Every value a prunable group's consumers read, with its channel axis (for activation statistics)."""
    found: dict[str, int] = {}
    for node in _with_shapes(model).graph:
        if node.op_type in PRODUCERS and node.domain == "":
            try:
                found.update({name: space.axis for name, space in trace(node).reads})
            except Unsafe:
                continue
    return found


def prune_structured(model: ir.Model, sparsity: float, config: StructuredConfig, activity: Activity | None = None) -> tuple[ir.Model, dict]:
    """A pruned copy of ``model`` and what was cut per layer."""
    out = _with_shapes(model)
    layers: dict[str, str] = {}
    skipped: dict[str, str] = {}
    for node in list(out.graph):
        if node.op_type not in PRODUCERS or node.domain != "" or node.name in config.exclude:
            continue
        try:
            group = trace(node)
        except Unsafe as why:
            if node.op_type != "MatMul" or _weight(node) is not None:
                skipped[node.name or node.outputs[0].name] = str(why)
            continue
        keep = _keep(group, sparsity, config, activity)
        if len(keep) < group.channels:
            if activity is not None and config.compensate and all(name in activity for name, _ in group.reads):
                dropped = {r: np.setdiff1d(np.arange(group.channels * r), _expand(keep, r)) for _, _, _, r in group.readers}
                compensate(group, dropped, activity, _set_input)
            _apply(group, keep)
            layers[node.name or node.outputs[0].name] = f"{group.channels}→{len(keep)} ({', '.join(group.consumers)})"
    stats = {"sparsity": sparsity, "layers": layers, "skipped": skipped}
    if not layers:  # nothing cut: hand back the model as it came, not the normalized copy
        return clone(model), stats
    set_marker(out, "prune.structured", f"sparsity={sparsity:g}")
    common.RemoveUnusedNodesPass()(out)
    return out, stats


def _weight(node: ir.Node) -> tuple[ir.Value, int] | None:
    """The producer's weight and the axis of its output channels."""
    w = node.inputs[1] if len(node.inputs) > 1 else None
    if w is None or w.const_value is None:
        return None
    rank = len(w.const_value.shape)
    if node.op_type == "Conv":
        group = node.attributes.get("group")
        return (w, 0) if (group is None or group.as_int() == 1) and rank >= 3 else None
    if node.op_type == "Gemm":
        trans_b = node.attributes.get("transB")
        return (w, 0 if trans_b is not None and trans_b.as_int() else 1) if rank == 2 else None
    return (w, 1) if rank == 2 else None  # MatMul: x @ W[K, N]


def trace(producer: ir.Node) -> Group:
    """Follow the producer's channels to their consumers; raises Unsafe when the path is not provable."""
    found = _weight(producer)
    if found is None and producer.op_type == "Conv" and _attr(producer, "group", 1) > 1:
        raise Unsafe("grouped/depthwise Conv: its channels are cut with the layer that feeds it")
    if found is None:
        raise Unsafe("weight is not a constant of a supported layout")
    weight, axis = found
    group = Group(producer, int(weight.const_value.shape[axis]))
    group.edit(producer, 1, axis)
    if producer.op_type in ("Conv", "Gemm") and len(producer.inputs) > 2 and producer.inputs[2] is not None:
        bias = producer.inputs[2]
        if bias.const_value is None:
            raise Unsafe("bias is not constant")
        if bias.const_value.size == group.channels:
            group.edit(producer, 2, len(bias.const_value.shape) - 1)
        elif bias.const_value.size != 1:
            raise Unsafe("bias does not broadcast per channel")
    if producer.op_type == "Gemm" and _attr(producer, "transA", 0):
        raise Unsafe("Gemm with transA")
    start = Space(1) if producer.op_type == "Conv" else Space(-1)
    queue = [(producer.outputs[0], start)]
    while queue:
        value, space = queue.pop()
        if id(value) in group.values:
            if group.values[id(value)][1] != space:
                raise Unsafe(f"{value.name} reached with two channel layouts")
            continue
        if value.is_graph_output():
            raise Unsafe(f"{value.name} is a graph output")
        group.values[id(value)] = (value, space)
        for node, index in value.uses():
            queue.extend(_step(group, node, index, value, space))
    for name, other, space in group.pending:
        if id(other) not in group.values:
            raise Unsafe(f"{name}: mixes the channels with another activation (residual?)")
        if group.values[id(other)][1] != space:
            raise Unsafe(f"{name}: operands with different channel layouts")
    if not group.consumers:
        raise Unsafe("no consumer reads these channels")
    return group


def _attr(node: ir.Node, name: str, default: int) -> int:
    attr = node.attributes.get(name)
    return attr.as_int() if attr is not None else default


def _rank(value: ir.Value) -> int | None:
    return len(value.shape) if value.shape is not None else None


def _step(group: Group, node: ir.Node, index: int, value: ir.Value, space: Space) -> list[tuple[ir.Value, Space]]:
    """What one use of a channel value implies: values to follow next (or consumer edits)."""
    op, name = node.op_type, node.name or node.op_type
    if node.domain not in ("", "ai.onnx"):
        if node.domain == "com.microsoft" and op in ("Gelu", "FastGelu") and len(node.inputs) == 1:
            return [(node.outputs[0], space)]
        raise Unsafe(f"{name}: custom op {node.domain}::{op}")
    if op in UNARY and index == 0:
        for extra in node.inputs[1:]:
            if extra is not None and (extra.const_value is None or extra.const_value.size != 1):
                raise Unsafe(f"{name}: non-scalar parameter")
        return [(node.outputs[0], space)]
    if op in BINARY:
        for i in range(len(node.inputs)):
            if i != index:
                _binary_operand(group, node, i, space)
        return [(node.outputs[0], space)]
    if op == "BatchNormalization" and index == 0 and _absolute(space, value) == 1 and space.repeat == 1:
        if any(len(o.uses()) for o in node.outputs[1:]):
            raise Unsafe(f"{name}: training-mode outputs used")
        for i in range(1, 5):
            group.edit(node, i, 0)
        return [(node.outputs[0], space)]
    if op in POOL and index == 0 and _absolute(space, value) == 1:
        if len(node.outputs) > 1 and node.outputs[1].uses():
            raise Unsafe(f"{name}: pooling indices used")
        return [(node.outputs[0], space)]
    if op in ("Flatten", "Reshape") and index == 0:
        return [(node.outputs[0], _flatten(group, node, value, space))]
    if op == "Conv" and index == 0 and _absolute(space, value) == 1 and space.repeat == 1 and _is_depthwise(node, group.channels):
        group.edit(node, 1, 0)  # one filter per channel: channels pass through (MobileNet blocks)
        if len(node.inputs) > 2 and node.inputs[2] is not None:
            group.edit(node, 2, 0)
        group.depthwise.append(node)
        return [(node.outputs[0], space)]
    if op == "Conv" and index == 0 and _absolute(space, value) == 1 and space.repeat == 1 and _attr(node, "group", 1) == 1:
        group.edit(node, 1, 1, reader=True)
        group.reads.append((value.name, space))
        return []
    if op == "Gemm" and index == 0 and not _attr(node, "transA", 0) and node.inputs[1].const_value is not None:
        group.edit(node, 1, 1 if _attr(node, "transB", 0) else 0, space.repeat, reader=True)
        group.reads.append((value.name, space))
        return []
    if op == "MatMul" and index == 0 and node.inputs[1].const_value is not None and len(node.inputs[1].const_value.shape) == 2:
        if _absolute(space, value) != (_rank(value) or 0) - 1 and space.axis != -1:
            raise Unsafe(f"{name}: channels are not on the last axis")
        group.edit(node, 1, 0, space.repeat, reader=True)
        group.reads.append((value.name, space))
        return []
    raise Unsafe(f"{name}: channels reach {op} (input {index}), which this pass does not rewrite")


def _is_depthwise(node: ir.Node, channels: int) -> bool:
    w = node.inputs[1] if len(node.inputs) > 1 else None
    if w is None or w.const_value is None or len(w.const_value.shape) < 3:
        return False
    return _attr(node, "group", 1) == channels > 1 and tuple(w.const_value.shape[:2]) == (channels, 1)


def _absolute(space: Space, value: ir.Value) -> int | None:
    if space.axis >= 0:
        return space.axis
    rank = _rank(value)
    return rank + space.axis if rank is not None else None


def _binary_operand(group: Group, node: ir.Node, index: int, space: Space) -> None:
    """The other operand of an elementwise op must be a scalar, a per-channel constant, or the same channels."""
    name, other = node.name or node.op_type, node.inputs[index]
    if other is None:
        return
    if other.const_value is None:  # fine only if it is derived from the same channels (checked at the end)
        group.pending.append((name, other, space))
        return
    shape = list(other.const_value.shape)
    if int(np.prod(shape)) == 1:
        return
    out_rank = _rank(node.outputs[0]) or _rank(node.inputs[0]) or len(shape)
    axis = space.axis if space.axis < 0 else space.axis - out_rank
    if -axis > len(shape) or shape[axis] != group.channels * space.repeat or int(np.prod(shape)) != shape[axis]:
        raise Unsafe(f"{name}: constant of shape {shape} is not per channel")
    group.edit(node, index, len(shape) + axis, space.repeat)


def _flatten(group: Group, node: ir.Node, value: ir.Value, space: Space) -> Space:
    """Flatten/Reshape of [N, C, *spatial] to [N, C*spatial]: channels become runs of features."""
    name = node.name or node.op_type
    dims = value.shape.dims if value.shape is not None else None
    if _absolute(space, value) != 1 or space.repeat != 1 or dims is None or not all(isinstance(d, int) for d in dims[1:]):
        raise Unsafe(f"{name}: reshape of channels with unknown layout")
    features = int(np.prod(dims[1:]))
    per_channel = int(np.prod(dims[2:]))
    if node.op_type == "Flatten":
        if _attr(node, "axis", 1) != 1:
            raise Unsafe(f"{name}: Flatten axis != 1")
        return Space(1, per_channel)
    target = node.inputs[1]
    shape = target.const_value.numpy().tolist() if target is not None and target.const_value is not None else None
    if shape is None or len(shape) != 2 or shape[1] != features or shape[0] not in (-1, 0):
        raise Unsafe(f"{name}: Reshape to {shape} is not a flatten")
    group.reshapes[(id(node), 1)] = (node, 1, 1, per_channel)
    return Space(1, per_channel)


def _keep(group: Group, sparsity: float, config: StructuredConfig, activity: Activity | None = None) -> np.ndarray:
    weight, axis = _weight(group.producer)
    w = np.abs(weight.const_value.numpy().astype(np.float64))
    norms = w.sum(axis=tuple(i for i in range(w.ndim) if i != axis))
    if activity is not None and all(name in activity for name, _ in group.reads):
        norms = activation_scores(group, activity)
    if config.criterion == "l1_in_out":  # also how much the consumers read each channel
        reads = np.zeros(group.channels)
        for node, index, r_axis, _repeat in group.readers:  # channel-major runs: reshape groups them
            r = np.abs(np.moveaxis(node.inputs[index].const_value.numpy().astype(np.float64), r_axis, 0))
            reads += r.reshape(group.channels, -1).sum(1)
        norms = norms / max(norms.sum(), 1e-30) * reads / max(reads.sum(), 1e-30)
    n_keep = max(1, group.channels - int(round(group.channels * sparsity)))
    if config.multiple_of > 1:
        n_keep = min(group.channels, -(-n_keep // config.multiple_of) * config.multiple_of)
    return np.sort(np.argsort(-norms, kind="stable")[:n_keep])


def activation_scores(group: Group, activity: Activity) -> np.ndarray:
    """Per channel: sum over the features it feeds of mean|activation| x L1 of the consumer weights reading it."""
    scores = np.zeros(group.channels)
    for (node, index, r_axis, _repeat), (name, _space) in zip(group.readers, group.reads, strict=True):
        w = np.abs(np.moveaxis(node.inputs[index].const_value.numpy().astype(np.float64), r_axis, 0))
        per_feature = w.reshape(w.shape[0], -1).sum(1) * activity[name][0][: w.shape[0]]
        scores += per_feature.reshape(group.channels, -1).sum(1)
    return scores


def _set_input(node: ir.Node, index: int, array: np.ndarray) -> None:
    """Replace a constant input in place when only this node reads it, else with a new private initializer."""
    value = node.inputs[index]
    if value.is_initializer() and len(value.uses()) == 1 and not value.is_graph_output():
        value.const_value = ir.tensor(array, name=value.name)
        value.shape = ir.Shape(array.shape)
        return
    graph = node.graph
    name = f"{value.name}__{node.name or node.op_type}_pruned"
    while name in graph.initializers:
        name += "_"
    tensor = ir.tensor(array, name=name)
    fresh = ir.Value(name=name, shape=ir.Shape(array.shape), type=ir.TensorType(tensor.dtype), const_value=tensor)
    graph.register_initializer(fresh)
    node.replace_input_with(index, fresh)


def _expand(keep: np.ndarray, repeat: int) -> np.ndarray:
    return (keep[:, None] * repeat + np.arange(repeat)[None, :]).ravel()


def _apply(group: Group, keep: np.ndarray) -> None:
    n = len(keep)
    for node, index, axis, repeat in group.edits.values():
        _set_input(node, index, np.take(node.inputs[index].const_value.numpy(), _expand(keep, repeat), axis=axis))
    for node in group.depthwise:
        node.attributes["group"] = ir.AttrInt64("group", n)
    for node, index, position, repeat in group.reshapes.values():
        shape = node.inputs[index].const_value.numpy().copy()
        shape[position] = n * repeat
        _set_input(node, index, shape)
    for value, space in group.values.values():
        if value.shape is None:
            continue
        dims = list(value.shape.dims)
        axis = space.axis if space.axis >= 0 else len(dims) + space.axis
        if 0 <= axis < len(dims):
            dims[axis] = n * space.repeat
            value.shape = ir.Shape(dims)

