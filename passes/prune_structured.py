"""prune.structured: remove whole channels/neurons (producer rows and consumer columns together)."""

from __future__ import annotations

import logging

import numpy as np
import onnx_ir as ir
from onnx_ir.passes import common

from edgepipe.passes.base import EdgepipePass, StatsResult, clone
from edgepipe.passes.prune import StructuredConfig, budget_search, marker, set_marker
from edgepipe.passes.prune_activation import Activity, channel_activity, compensate
from edgepipe.passes.prune_groups import Plan, keep_count, l1_scores, merge, read_scores, reader_rows
from edgepipe.passes.prune_trace import PRODUCERS, Group, Unsafe, trace, weight

logger = logging.getLogger(__name__)
SHORTFALL = 0.5  # reaching less than half the asked share of channels is worth a warning

class PruneStructured(EdgepipePass):
    """Removes whole output channels of Conv/Gemm/MatMul and the matching inputs of their consumers.

    For each producer with a constant weight, the channels are followed through per-channel ops (bias
    Add, activations, BatchNorm, pooling, global pooling and spatial reductions, depthwise convs,
    Concat at an offset, Flatten/Reshape into a Gemm) to the consumers that read them (Conv, Gemm,
    MatMul with constant weights) (``prune_trace``). Producers whose channels are added together (a
    residual group: ResNet, MobileNetV2) become one group that loses the same channels everywhere,
    ranked by the members' summed L1 norms (``prune_groups``). Channels are ranked by the L1 norm of
    the producer's weights (``criterion: activation``: mean |activation| on calibration data x consumer
    weights, the cut channels' mean folded into the consumer's bias) and the weakest ``sparsity`` share
    of each group is cut, so the model gets smaller and faster. A path that reaches anything else (a
    graph output, an Add with a model input, an attention reshape) is skipped and reported; a cut far
    below the ask is a warning. With ``max_drop`` instead of ``sparsity``, the highest sparsity within
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
        def prune(m: ir.Model, sparsity: float) -> tuple[ir.Model, dict]:
            kept: dict = {}
            out, stats = prune_structured(m, sparsity, self.config, activity, kept)
            if stats["layers"] and (self.config.recover_epochs or (self.config.recover_adapt and self.context.calibration is not None)):
                out, stats["recover"] = self._recover(m, out, kept)
            return out, stats

        if self.config.max_drop is not None:
            return budget_search(self, model, prune)
        out, stats = prune(model, self.config.target)
        return StatsResult(out, modified=bool(stats["layers"]), stats=stats)

    def _recover(self, teacher: ir.Model, student: ir.Model, kept: dict) -> tuple[ir.Model, dict]:
        """Statistics re-estimation, then with ``recover_epochs`` a fine-tune (passes/prune_finetune.py)."""
        from edgepipe.core import distill
        from edgepipe.passes.prune_finetune import RecoverConfig, recover  # torch: only when asked

        c = self.config
        samples = distill.stack_batches(self.require_calibration()())
        cfg = RecoverConfig(epochs=c.recover_epochs, lr=c.recover_lr, loss=c.recover_loss, batch_size=c.recover_batch_size,
                            threads=c.recover_threads, adapt=c.recover_adapt, features=c.recover_features, augment=c.recover_augment)
        if c.recover_epochs:
            return recover(teacher, student, samples, kept, cfg)
        try:  # re-estimation is a default extra: a graph the torch interpreter cannot run keeps the plain cut
            return recover(teacher, student, samples, kept, cfg)
        except Exception as exc:  # noqa: BLE001
            why = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
            logger.warning(f"prune.structured: channel statistics not re-estimated ({why})")
            return student, {"adapt": f"skipped: {why}"}


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
                group = trace(node)
            except Unsafe:
                continue
            found.update({name: space.axis for name, space in group.reads.values()})
    return found


def prune_structured(model: ir.Model, sparsity: float, config: StructuredConfig, activity: Activity | None = None,
                     kept: dict[str, tuple[int, np.ndarray]] | None = None) -> tuple[ir.Model, dict]:
    """A pruned copy of ``model`` and what was cut per layer; ``kept`` gets each cut value's kept channel positions."""
    out = _with_shapes(model)
    traced: list[Group | Unsafe] = []
    names: list[str] = []
    total = 0  # output channels of every layer with a weight: what "reached" is a share of
    for node in list(out.graph):
        if node.op_type not in PRODUCERS or node.domain != "":
            continue
        found = weight(node)
        total += int(found[0].const_value.shape[found[1]]) if found is not None else 0
        if node.name in config.exclude:
            continue
        try:
            traced.append(trace(node))
        except Unsafe as why:
            if node.op_type == "MatMul" and weight(node) is None:
                continue  # activation x activation (attention scores): not a layer
            traced.append(why)
        names.append(node.name or node.outputs[0].name)
    groups, skipped = merge(traced, names)
    layers: dict[str, str] = {}
    plan = Plan()
    pruned_values = frozenset(key for g in groups for key in g.values)
    removed = rounded = 0
    for group in groups:
        keep = _keep(group, sparsity, config, activity)
        if len(keep) == group.channels:
            rounded += len(group.producers)
            continue
        dropped = np.setdiff1d(np.arange(group.channels), keep)
        if activity is not None and config.compensate and all(name in activity for name, _ in group.reads.values()):
            compensate(group, dropped, activity, _set_input, pruned_values)
        plan.add(group, dropped)
        removed += len(dropped) * len(group.producers)
        text = f"{group.channels}→{len(keep)} ({', '.join(group.consumers)})"
        for producer in group.producers:
            extra = f" [residual group of {len(group.producers)}]" if len(group.producers) > 1 else ""
            layers[producer.name or producer.outputs[0].name] = text + extra
    stats = {"sparsity": sparsity, "layers": layers, "skipped": skipped, **_reached(total, removed, sparsity, skipped, rounded)}
    if not layers:  # nothing cut: hand back the model as it came, not the normalized copy
        return clone(model), stats
    if kept is not None:
        kept.update(plan.kept())
    plan.apply(_set_input)
    set_marker(out, "prune.structured", f"sparsity={sparsity:g}")
    common.RemoveUnusedNodesPass()(out)
    return out, stats


def _reached(total: int, removed: int, sparsity: float, skipped: dict[str, str], rounded: int) -> dict:
    """The share of all producers' output channels cut, and a warning when it is far below the ask."""
    share = removed / total if total else 0.0
    out: dict = {"channels_cut": round(share, 4)}
    if sparsity > 0 and share < SHORTFALL * sparsity:
        reasons = sorted({why.split(": ", 1)[-1][:60] for why in skipped.values()})
        if rounded:
            reasons.insert(0, f"{rounded} layers kept whole: their kept width rounds up to a block of multiple_of")
        out["warning"] = (f"prune.structured: asked {sparsity:.0%}, reached {share:.0%} of the channels: skipped {len(skipped)} "
                          f"layers ({'; '.join(reasons[:3])}{'; …' if len(reasons) > 3 else ''})")
        logger.info(out["warning"])
    return out


def _keep(group: Group, sparsity: float, config: StructuredConfig, activity: Activity | None = None) -> np.ndarray:
    norms = l1_scores(group)
    if activity is not None and all(name in activity for name, _ in group.reads.values()):
        norms = activation_scores(group, activity)
    if config.criterion == "l1_in_out":  # also how much the consumers read each channel
        reads = read_scores(group)
        norms = norms / max(norms.sum(), 1e-30) * reads / max(reads.sum(), 1e-30)
    n_keep = keep_count(group.channels, sparsity, config.multiple_of)
    return np.sort(np.argsort(-norms, kind="stable")[:n_keep])


def activation_scores(group: Group, activity: Activity) -> np.ndarray:
    """Per channel: sum over the features it feeds of mean|activation| x L1 of the consumer weights reading it."""
    scores = np.zeros(group.channels)
    for key, edit in group.readers.items():
        name, space = group.reads[key]
        rows = reader_rows(edit, group.channels)
        per_feature = rows.reshape(rows.shape[0], -1).sum(1) * activity[name][0][space.indices(np.arange(group.channels))]
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
