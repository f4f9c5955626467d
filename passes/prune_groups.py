"""prune.structured's groups: residual merging, channel ranking, and one deletion plan applied at the end."""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir

from edgepipe.passes.prune_trace import Group, Space, Unsafe, weight

SMALL = 4  # a layer keeps blocks of at most channels // SMALL: multiple_of adapts to small layers


def merge(traced: list[Group | Unsafe], names: list[str]) -> tuple[list[Group], dict[str, str]]:
    """Groups whose channels meet in an elementwise op (a residual Add) become one group: the same channels
    are cut from every member. A group with an operand no prunable layer produces, or with a member that
    could not be traced, is left alone."""
    parent = list(range(len(traced)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    holders: dict[int, list[int]] = {}
    for i, g in enumerate(traced):
        if isinstance(g, Group):
            for key in g.values:
                holders.setdefault(key, []).append(i)
    broken: dict[int, str] = {}
    for i, g in enumerate(traced):
        if not isinstance(g, Group):
            continue
        for name, other, space in g.pending:
            match = [j for j in holders.get(id(other), []) if traced[j].values[id(other)][1] == space]
            if not match:
                broken[i] = f"{name}: adds an activation no prunable layer produces with these channels (residual from an input?)"
            for j in match:
                parent[root(j)] = root(i)
    members: dict[int, list[int]] = {}
    for i in range(len(traced)):
        members.setdefault(root(i), []).append(i)
    groups: list[Group] = []
    skipped: dict[str, str] = {}
    for ids in members.values():
        failed = [(i, traced[i]) for i in ids if not isinstance(traced[i], Group)] + [(i, broken[i]) for i in ids if i in broken]
        if failed:
            why = str(failed[0][1])
            for i in ids:
                skipped[names[i]] = why if len(ids) == 1 else f"residual group of {len(ids)} with {names[failed[0][0]]}: {why}"
            continue
        group = traced[ids[0]]
        try:
            for i in ids[1:]:
                group.absorb(traced[i])
        except Unsafe as why:
            skipped.update({names[i]: str(why) for i in ids})
            continue
        if not group.consumers:
            skipped.update({names[i]: "no consumer reads these channels" for i in ids})
            continue
        groups.append(group)
    return groups, skipped


def block(channels: int, multiple_of: int) -> int:
    """Kept widths are multiples of this: ``multiple_of`` for wide layers, a smaller power of two for small ones."""
    small = 1 << max(0, (channels // SMALL).bit_length() - 1) if channels >= SMALL else 1
    return max(1, min(multiple_of, small))


def keep_count(channels: int, sparsity: float, multiple_of: int) -> int:
    n_keep = max(1, channels - int(round(channels * sparsity)))
    m = block(channels, multiple_of)
    return min(channels, -(-n_keep // m) * m)


def reader_rows(edit: tuple[ir.Node, int, int, Space], channels: int) -> np.ndarray:
    """A consumer's weight rows that read the group's features, channel-major, as |w| (float64)."""
    node, index, axis, space = edit
    w = np.abs(np.moveaxis(node.inputs[index].const_value.numpy().astype(np.float64), axis, 0))
    return w[space.indices(np.arange(channels))]


def l1_scores(group: Group) -> np.ndarray:
    """L1 norm of each producer's weights per channel; a residual group sums its members', each scaled to mean 1."""
    total = np.zeros(group.channels)
    for producer in group.producers:
        w, axis = weight(producer)
        arr = np.abs(w.const_value.numpy().astype(np.float64))
        norms = arr.sum(axis=tuple(i for i in range(arr.ndim) if i != axis))
        total += norms / max(norms.mean(), 1e-30) if len(group.producers) > 1 else norms
    return total


def read_scores(group: Group) -> np.ndarray:
    """How much the consumers read each channel (L1 of their weight rows)."""
    reads = np.zeros(group.channels)
    for edit in group.readers.values():
        reads += reader_rows(edit, group.channels).reshape(group.channels, -1).sum(1)
    return reads


@dataclasses.dataclass
class Plan:
    """Every deletion in original coordinates, applied once: groups that share a tensor (a Concat's
    consumers, a residual Add) each remove their own positions."""

    tensors: dict[tuple[int, int], tuple[ir.Node, int, dict[int, set[int]]]] = dataclasses.field(default_factory=dict)
    reshapes: dict[tuple[int, int], tuple[ir.Node, int, int, set[int]]] = dataclasses.field(default_factory=dict)
    depthwise: dict[int, tuple[ir.Node, set[int]]] = dataclasses.field(default_factory=dict)
    values: dict[int, tuple[ir.Value, dict[int, set[int]]]] = dataclasses.field(default_factory=dict)

    def add(self, group: Group, dropped: np.ndarray) -> None:
        for key, (node, index, axis, space) in group.edits.items():
            entry = self.tensors.setdefault(key, (node, index, {}))
            entry[2].setdefault(axis, set()).update(space.indices(dropped).tolist())
        for key, (node, index, position, space) in group.reshapes.items():
            self.reshapes.setdefault(key, (node, index, position, set()))[3].update(space.indices(dropped).tolist())
        for key, (node, space) in group.depthwise.items():
            self.depthwise.setdefault(key, (node, set()))[1].update(space.indices(dropped).tolist())
        for key, (value, space) in group.values.items():
            if value.shape is None:
                continue
            axis = space.axis if space.axis >= 0 else len(value.shape) + space.axis
            self.values.setdefault(key, (value, {}))[1].setdefault(axis, set()).update(space.indices(dropped).tolist())

    def kept(self) -> dict[str, tuple[int, np.ndarray]]:
        """Each value whose channels are cut: its channel axis and the positions that stay (before ``apply``)."""
        out = {}
        for value, axes in self.values.values():
            for axis, gone in axes.items():
                size = value.shape.dims[axis] if 0 <= axis < len(value.shape) else None
                if isinstance(size, int):
                    out[value.name] = (axis, np.setdiff1d(np.arange(size), sorted(gone)))
        return out

    def apply(self, set_input) -> None:  # noqa: ANN001 - prune_structured._set_input
        for node, index, axes in self.tensors.values():
            array = node.inputs[index].const_value.numpy()
            for axis, gone in axes.items():
                array = np.delete(array, sorted(gone), axis=axis)
            set_input(node, index, array)
        for node, gone in self.depthwise.values():
            node.attributes["group"] = ir.AttrInt64("group", node.attributes["group"].as_int() - len(gone))
        for node, index, position, gone in self.reshapes.values():
            shape = node.inputs[index].const_value.numpy().copy()
            shape[position] -= len(gone)
            set_input(node, index, shape)
        for value, axes in self.values.values():
            dims = list(value.shape.dims)
            for axis, gone in axes.items():
                if 0 <= axis < len(dims) and isinstance(dims[axis], int):
                    dims[axis] -= len(gone)
            value.shape = ir.Shape(dims)
