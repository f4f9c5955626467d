"""Channel tracing for prune.structured: which tensors a producer's output channels reach, and how."""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir

UNARY = {
    "Relu", "LeakyRelu", "PRelu", "Gelu", "FastGelu", "Erf", "Sigmoid", "Tanh", "Elu", "Selu", "Celu", "Softplus",
    "Softsign", "HardSigmoid", "HardSwish", "Mish", "Identity", "Neg", "Abs", "Sqrt", "Exp", "Clip", "Dropout",
}
BINARY = {"Add", "Sub", "Mul", "Div", "Pow", "Max", "Min"}
POOL = {"MaxPool", "AveragePool", "LpPool", "GlobalAveragePool", "GlobalMaxPool", "GlobalLpPool"}
REDUCE = {"ReduceMean", "ReduceMax", "ReduceMin", "ReduceSum", "ReduceL1", "ReduceL2"}
PRODUCERS = {"Conv", "Gemm", "MatMul"}


class Unsafe(Exception):
    """A channel group whose pruning the pass cannot prove safe; it is left alone."""


@dataclasses.dataclass(frozen=True)
class Space:
    """Where the channels live in a value: ``axis`` (negative = from the end), ``repeat`` features per
    channel (after a flatten), ``offset`` channels before them (after a Concat)."""

    axis: int
    repeat: int = 1
    offset: int = 0

    def indices(self, channels: np.ndarray) -> np.ndarray:
        """The positions along the axis of the given channels."""
        base = (self.offset + np.asarray(channels, dtype=np.int64))[:, None] * self.repeat
        return (base + np.arange(self.repeat)[None, :]).ravel()


Edit = tuple[ir.Node, int, int, Space]  # node, input index, axis of that constant, where the channels are in it


@dataclasses.dataclass
class Group:
    """One prunable channel set: its producers, every constant to slice, every value whose shape changes."""

    producers: list[ir.Node]
    channels: int
    edits: dict[tuple[int, int], Edit] = dataclasses.field(default_factory=dict)
    reshapes: dict[tuple[int, int], Edit] = dataclasses.field(default_factory=dict)  # Reshape targets (axis = position)
    depthwise: dict[int, tuple[ir.Node, Space]] = dataclasses.field(default_factory=dict)  # ``group`` shrinks
    values: dict[int, tuple[ir.Value, Space]] = dataclasses.field(default_factory=dict)
    consumers: list[str] = dataclasses.field(default_factory=list)
    pending: list[tuple[str, ir.Value, Space]] = dataclasses.field(default_factory=list)  # operands from elsewhere
    readers: dict[tuple[int, int], Edit] = dataclasses.field(default_factory=dict)  # consumer weight slices
    reads: dict[tuple[int, int], tuple[str, Space]] = dataclasses.field(default_factory=dict)  # values they read

    @property
    def producer(self) -> ir.Node:
        return self.producers[0]

    def edit(self, node: ir.Node, index: int, axis: int, space: Space, read: ir.Value | None = None) -> None:
        """Slice constant input ``index`` of ``node`` along ``axis`` (a shared constant gets a private copy)."""
        value = node.inputs[index]
        if value is None or value.const_value is None:
            raise Unsafe(f"{node.name}: input {index} is not constant")
        self.edits[(id(node), index)] = (node, index, axis, space)
        if read is not None:
            self.readers[(id(node), index)] = (node, index, axis, space)
            self.reads[(id(node), index)] = (read.name, space)
            self.consumers.append(node.name or node.op_type)

    def absorb(self, other: Group) -> None:
        """Merge a group whose channels are added to these (a residual group): one set of channels for both."""
        if other.channels != self.channels:
            raise Unsafe(f"residual group mixes {self.channels} and {other.channels} channels")
        self.producers += [p for p in other.producers if p not in self.producers]
        for mine, theirs in ((self.edits, other.edits), (self.reshapes, other.reshapes), (self.depthwise, other.depthwise),
                             (self.values, other.values), (self.readers, other.readers), (self.reads, other.reads)):
            mine.update(theirs)
        self.consumers += [c for c in other.consumers if c not in self.consumers]
        self.pending += other.pending


def weight(node: ir.Node) -> tuple[ir.Value, int] | None:
    """The producer's weight and the axis of its output channels."""
    w = node.inputs[1] if len(node.inputs) > 1 else None
    if w is None or w.const_value is None:
        return None
    rank = len(w.const_value.shape)
    if node.op_type == "Conv":
        return (w, 0) if attr(node, "group", 1) == 1 and rank >= 3 else None
    if node.op_type == "Gemm":
        return (w, 0 if attr(node, "transB", 0) else 1) if rank == 2 else None
    return (w, 1) if rank == 2 else None  # MatMul: x @ W[K, N]


def attr(node: ir.Node, name: str, default: int) -> int:
    a = node.attributes.get(name)
    return a.as_int() if a is not None else default


def trace(producer: ir.Node) -> Group:
    """Follow the producer's channels to their consumers; raises Unsafe when the path is not provable.

    Operands from other activations (a residual Add) are left in ``pending``: the caller merges the
    groups that produce them (prune_groups.merge)."""
    found = weight(producer)
    if found is None and producer.op_type == "Conv" and attr(producer, "group", 1) > 1:
        raise Unsafe("grouped/depthwise Conv: its channels are cut with the layer that feeds it")
    if found is None:
        raise Unsafe("weight is not a constant of a supported layout")
    w, axis = found
    group = Group([producer], int(w.const_value.shape[axis]))
    group.edit(producer, 1, axis, Space(axis))
    if producer.op_type in ("Conv", "Gemm") and len(producer.inputs) > 2 and producer.inputs[2] is not None:
        bias = producer.inputs[2]
        if bias.const_value is None:
            raise Unsafe("bias is not constant")
        if bias.const_value.size == group.channels:
            group.edit(producer, 2, len(bias.const_value.shape) - 1, Space(0))
        elif bias.const_value.size != 1:
            raise Unsafe("bias does not broadcast per channel")
    if producer.op_type == "Gemm" and attr(producer, "transA", 0):
        raise Unsafe("Gemm with transA")
    queue = [(producer.outputs[0], Space(1) if producer.op_type == "Conv" else Space(-1))]
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
    return group


def _rank(value: ir.Value) -> int | None:
    return len(value.shape) if value.shape is not None else None


def absolute(space: Space, value: ir.Value) -> int | None:
    if space.axis >= 0:
        return space.axis
    rank = _rank(value)
    return rank + space.axis if rank is not None else None


def width(value: ir.Value, space: Space, channels: int) -> int | None:
    """The size of the value's channel axis (more than ``channels`` after a Concat); None when unknown."""
    axis = absolute(space, value)
    if value.shape is not None and axis is not None and isinstance(value.shape.dims[axis], int):
        return int(value.shape.dims[axis])
    return channels * space.repeat if space.offset == 0 else None


def _step(group: Group, node: ir.Node, index: int, value: ir.Value, space: Space) -> list[tuple[ir.Value, Space]]:
    """What one use of a channel value implies: values to follow next (or consumer edits)."""
    op, name = node.op_type, node.name or node.op_type
    channel_axis = absolute(space, value)
    plain = channel_axis == 1 and space.repeat == 1  # [N, C, ...] layout of a Conv activation
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
                _binary_operand(group, node, i, value, space)
        return [(node.outputs[0], space)]
    if op == "BatchNormalization" and index == 0 and plain:
        if any(len(o.uses()) for o in node.outputs[1:]):
            raise Unsafe(f"{name}: training-mode outputs used")
        for i in range(1, 5):
            group.edit(node, i, 0, Space(0, 1, space.offset))
        return [(node.outputs[0], space)]
    if op in POOL and index == 0 and channel_axis == 1:
        if len(node.outputs) > 1 and node.outputs[1].uses():
            raise Unsafe(f"{name}: pooling indices used")
        return [(node.outputs[0], space)]
    if op in REDUCE and index == 0 and channel_axis is not None:
        return [(node.outputs[0], _reduce(node, value, channel_axis, space))]
    if op == "Concat" and channel_axis is not None and space.repeat == 1:
        return [(node.outputs[0], _concat(node, index, value, channel_axis, space))]
    if op in ("Flatten", "Reshape") and index == 0:
        return [(node.outputs[0], _flatten(group, node, value, space))]
    if op == "Conv" and index == 0 and plain and _is_depthwise(node, width(value, space, group.channels)):
        group.edit(node, 1, 0, Space(0, 1, space.offset))  # one filter per channel: channels pass through (MobileNet)
        if len(node.inputs) > 2 and node.inputs[2] is not None:
            group.edit(node, 2, 0, Space(0, 1, space.offset))
        group.depthwise[id(node)] = (node, space)
        return [(node.outputs[0], space)]
    if op == "Conv" and index == 0 and plain and attr(node, "group", 1) == 1:
        group.edit(node, 1, 1, Space(1, 1, space.offset), read=value)
        return []
    if op == "Gemm" and index == 0 and not attr(node, "transA", 0) and node.inputs[1].const_value is not None:
        group.edit(node, 1, 1 if attr(node, "transB", 0) else 0, space, read=value)
        return []
    if op == "MatMul" and index == 0 and node.inputs[1].const_value is not None and len(node.inputs[1].const_value.shape) == 2:
        if channel_axis != (_rank(value) or 0) - 1 and space.axis != -1:
            raise Unsafe(f"{name}: channels are not on the last axis")
        group.edit(node, 1, 0, space, read=value)
        return []
    raise Unsafe(f"{name}: channels reach {op} (input {index}), which this pass does not rewrite")


def _reduce(node: ir.Node, value: ir.Value, channel_axis: int, space: Space) -> Space:
    """A reduction over other axes (global pooling as ReduceMean over H, W): the channels stay, maybe moved."""
    name, rank = node.name or node.op_type, _rank(value)
    axes_value = node.inputs[1] if len(node.inputs) > 1 else None
    if axes_value is not None:
        if axes_value.const_value is None:
            raise Unsafe(f"{name}: reduction axes are not constant")
        axes = [int(a) for a in axes_value.const_value.numpy().ravel()]
    else:
        a = node.attributes.get("axes")
        axes = list(a.as_ints()) if a is not None else []
    if not axes or rank is None:
        raise Unsafe(f"{name}: reduces over all axes (or unknown rank)")
    axes = [a % rank for a in axes]
    if channel_axis in axes:
        raise Unsafe(f"{name}: reduces over the channels")
    if attr(node, "keepdims", 1):
        return Space(channel_axis, space.repeat, space.offset)
    return Space(channel_axis - sum(a < channel_axis for a in axes), space.repeat, space.offset)


def _concat(node: ir.Node, index: int, value: ir.Value, channel_axis: int, space: Space) -> Space:
    """Concat along the channel axis: the channels keep their order, after the inputs before this one."""
    name, rank = node.name or node.op_type, _rank(value)
    axis = attr(node, "axis", 0)
    if rank is None or axis % rank != channel_axis:
        raise Unsafe(f"{name}: Concat along another axis than the channels")
    before = 0
    for other in node.inputs[:index]:
        dims = other.shape.dims if other is not None and other.shape is not None else None
        if dims is None or not isinstance(dims[channel_axis], int):
            raise Unsafe(f"{name}: Concat input of unknown width")
        before += int(dims[channel_axis])
    return Space(channel_axis, 1, space.offset + before)


def _is_depthwise(node: ir.Node, channels: int | None) -> bool:
    w = node.inputs[1] if len(node.inputs) > 1 else None
    if channels is None or w is None or w.const_value is None or len(w.const_value.shape) < 3:
        return False
    return attr(node, "group", 1) == channels > 1 and tuple(w.const_value.shape[:2]) == (channels, 1)


def _binary_operand(group: Group, node: ir.Node, index: int, value: ir.Value, space: Space) -> None:
    """The other operand of an elementwise op must be a scalar, a per-channel constant, or the same channels."""
    name, other = node.name or node.op_type, node.inputs[index]
    if other is None:
        return
    if other.const_value is None:  # fine only if its channels are pruned the same way (a residual group)
        group.pending.append((name, other, space))
        return
    shape = list(other.const_value.shape)
    if int(np.prod(shape)) == 1:
        return
    out_rank = _rank(node.outputs[0]) or _rank(node.inputs[0]) or len(shape)
    axis = space.axis if space.axis < 0 else space.axis - out_rank
    full = width(value, space, group.channels)
    if -axis > len(shape) or full is None or shape[axis] != full or int(np.prod(shape)) != shape[axis]:
        raise Unsafe(f"{name}: constant of shape {shape} is not per channel")
    group.edit(node, index, len(shape) + axis, Space(len(shape) + axis, space.repeat, space.offset))


def _flatten(group: Group, node: ir.Node, value: ir.Value, space: Space) -> Space:
    """Flatten/Reshape of [N, C, *spatial] to [N, C*spatial]: channels become runs of features."""
    name = node.name or node.op_type
    dims = value.shape.dims if value.shape is not None else None
    if absolute(space, value) != 1 or space.repeat != 1 or dims is None or not all(isinstance(d, int) for d in dims[1:]):
        raise Unsafe(f"{name}: reshape of channels with unknown layout")
    features = int(np.prod(dims[1:]))
    per_channel = int(np.prod(dims[2:]))
    if node.op_type == "Flatten":
        if attr(node, "axis", 1) != 1:
            raise Unsafe(f"{name}: Flatten axis != 1")
        return Space(1, per_channel, space.offset)
    target = node.inputs[1]
    shape = target.const_value.numpy().tolist() if target is not None and target.const_value is not None else None
    if shape is None or len(shape) != 2 or shape[1] != features or shape[0] not in (-1, 0):
        raise Unsafe(f"{name}: Reshape to {shape} is not a flatten")
    group.reshapes[(id(node), 1)] = (node, 1, 1, Space(1, per_channel, space.offset))
    return Space(1, per_channel, space.offset)
