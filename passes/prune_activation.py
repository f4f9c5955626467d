"""Per-channel activation statistics on calibration data, for activation-aware structured pruning."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from edgepipe.core.errors import BadInput
from edgepipe.core.runtime import exposed
from edgepipe.passes.base import PassContext

Activity = dict[str, tuple[np.ndarray, np.ndarray]]  # value name → (mean |x|, mean x) per feature on its channel axis


def channel_activity(model: ir.Model, values: dict[str, int], context: PassContext, max_samples: int) -> Activity:
    """Mean |x| per feature of each named value (channel axis given), over calibration batches on ORT CPU."""
    if context.calibration is None:
        raise BadInput("prune.structured with criterion: activation needs calibration data: set data.calibration in the recipe")
    produced = {v.name: v for node in model.graph for v in node.outputs}
    wanted = [name for name in values if name in produced and not produced[name].is_graph_output()]
    sums: dict[str, np.ndarray] = {}
    signed: dict[str, np.ndarray] = {}
    counts: dict[str, int] = dict.fromkeys(wanted, 0)
    seen = 0
    for feed, arrays in exposed(model, wanted, context.calibration(), workdir=context.scratch("activity"), max_samples=max_samples):
        seen += len(next(iter(feed.values())))
        for name, array in arrays.items():
            moved = np.moveaxis(array.astype(np.float64), values[name], 0)
            flat = moved.reshape(moved.shape[0], -1)
            sums[name] = sums.get(name, 0.0) + np.abs(flat).sum(1)
            signed[name] = signed.get(name, 0.0) + flat.sum(1)
            counts[name] += flat.shape[1]
    if not seen:
        raise BadInput("calibration data is empty: data.calibration yielded no batches")
    return {name: (sums[name] / max(counts[name], 1), signed[name] / max(counts[name], 1)) for name in sums}


def compensate(group, dropped: np.ndarray, activity: Activity, set_input, pruned: frozenset[int] = frozenset()) -> None:  # noqa: ANN001
    """Fold the mean contribution of dropped features into each consumer's bias (FLAP-style compensation).

    ``dropped``: the group's channels that go (each reader maps them to its own feature positions);
    ``pruned``: ids of values whose channels other groups cut (a consumer there needs a bias to compensate in). Exact for
    Gemm/MatMul consumers in expectation; for a padded Conv it ignores the border.
    """
    for key, (node, index, r_axis, space) in group.readers.items():
        name = group.reads[key][0]
        if name not in activity:
            continue
        w = np.moveaxis(node.inputs[index].const_value.numpy().astype(np.float64), r_axis, 0)
        drop = space.indices(dropped)
        contrib = np.tensordot(activity[name][1][drop], w[drop], axes=1)
        comp = contrib.reshape(contrib.shape[0], -1).sum(1) if node.op_type == "Conv" else contrib
        _add_bias(node, comp.astype(np.float32), set_input, insert=id(node.outputs[0]) not in pruned)


def _add_bias(node: ir.Node, comp: np.ndarray, set_input, insert: bool) -> None:  # noqa: ANN001
    out = node.outputs[0]
    bias_index = 2 if node.op_type in ("Conv", "Gemm") else None
    target = (node, bias_index) if bias_index is not None and len(node.inputs) > 2 and node.inputs[2] is not None else None
    if target is None and node.op_type == "MatMul" and len(out.uses()) == 1:
        user, i = next(iter(out.uses()))
        if user.op_type == "Add" and user.inputs[1 - i] is not None and user.inputs[1 - i].const_value is not None:
            target = (user, 1 - i)
    if target is not None:
        bias = target[0].inputs[target[1]].const_value.numpy()
        if bias.size == comp.size:
            set_input(target[0], target[1], (bias + comp.reshape(bias.shape)).astype(bias.dtype))
            return
    if not insert:  # a new Add would carry a per-channel constant the deletion plan does not know
        return
    shape = (comp.size, 1, 1) if node.op_type == "Conv" else (comp.size,)
    graph = node.graph
    name = f"{out.name}__pruned_mean"
    const = ir.Value(name=name, shape=ir.Shape(shape), type=ir.TensorType(ir.DataType.FLOAT), const_value=ir.tensor(comp.reshape(shape), name=name))
    graph.register_initializer(const)
    uses = list(out.uses())
    add = ir.node("Add", [out, const], name=f"{node.name}/pruned_mean")
    add.outputs[0].shape, add.outputs[0].type = out.shape, out.type
    graph.insert_after(node, add)
    for user, i in uses:
        user.replace_input_with(i, add.outputs[0])
    if out.is_graph_output():
        graph.outputs[[j for j, v in enumerate(graph.outputs) if v is out][0]] = add.outputs[0]
        original = out.name
        out.name, add.outputs[0].name = f"{original}__raw", original
