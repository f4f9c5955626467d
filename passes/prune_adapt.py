"""Statistics re-estimation right after prune.structured: BatchNorm adaptation on a graph whose BatchNorms are folded.

Cutting channels shifts the mean and the spread of every later pre-activation (the missing inputs no
longer add their share). Pruning tools re-estimate BatchNorm's running statistics on a few batches
before any fine-tuning (NNCF's ``batchnorm_adaptation``, EagleEye's adaptive BN), which often recovers
most of the loss. An exported graph has its BatchNorms folded into the convolutions, so the same
correction is made on each layer's output directly: per kept channel, the pruned layer's output is
scaled and shifted so its mean and standard deviation on the calibration data are the unpruned
layer's for that channel, ``y' = (y - mean_s) * std_t / std_s + mean_t``, folded into the weight and
bias. Layers are corrected in graph order in one pass, so each sees the already corrected inputs.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx_ir as ir
import torch
from torch import nn

from edgepipe.passes.prune_recover import OnnxModule

logger = logging.getLogger(__name__)
Kept = dict[str, tuple[int, np.ndarray]]  # value name → (channel axis, kept positions in the unpruned value)
SCALE = (0.1, 10.0)  # a correction outside this range is a sign of a dead channel, not a shift: clamped


def channel_stats(x: torch.Tensor, axis: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and standard deviation of each position along ``axis`` over every other axis."""
    var, mean = torch.var_mean(x.detach(), dim=[d for d in range(x.dim()) if d != axis % x.dim()], correction=0)
    return mean, var.sqrt()


def _affine(module: OnnxModule, node: ir.Node) -> tuple[nn.Parameter, int, nn.Parameter, int] | None:
    """(weight, its output-channel axis, bias, the output's channel axis) for a layer the correction folds into."""
    if node.op_type == "Conv" and len(node.inputs) > 2:
        weight, w_axis, bias, out_axis = node.inputs[1], 0, node.inputs[2], 1
    elif node.op_type == "Gemm" and len(node.inputs) > 2:
        trans_b = node.attributes.get("transB")
        weight, bias, out_axis = node.inputs[1], node.inputs[2], 1
        w_axis = 0 if trans_b is not None and trans_b.as_int() else 1
    elif node.op_type == "BatchNormalization":
        weight, w_axis, bias, out_axis = node.inputs[1], 0, node.inputs[2], 1
    else:
        return None
    if weight is None or bias is None or len(weight.uses()) > 1 or len(bias.uses()) > 1:
        return None  # a shared constant would change another layer too
    w, b = module.param(weight.name), module.param(bias.name)
    if w is None or b is None or b.dim() != 1:
        return None
    return w, w_axis, b, out_axis


def adapt(teacher: OnnxModule, student: OnnxModule, inputs: list[torch.Tensor], kept: Kept) -> dict:
    """Correct every Conv/Gemm/BatchNorm output of ``student`` to the teacher's channel statistics on ``inputs``."""
    targets: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    layers = {node.outputs[0].name: (node, found) for node in student.graph if (found := _affine(student, node)) is not None}

    def record(node: ir.Node, out: torch.Tensor) -> torch.Tensor:
        name = node.outputs[0].name
        if name in layers:
            targets[name] = channel_stats(out, layers[name][1][3])
        return out

    corrected: list[float] = []

    def correct(node: ir.Node, out: torch.Tensor) -> torch.Tensor:
        name = node.outputs[0].name
        if name not in targets:
            return out
        w, w_axis, b, axis = layers[name][1]
        t_mean, t_std = targets[name]
        if name in kept:
            if kept[name][0] % out.dim() != axis:
                return out
            t_mean, t_std = t_mean[kept[name][1]], t_std[kept[name][1]]
        if len(t_mean) != out.shape[axis]:
            return out
        s_mean, s_std = channel_stats(out, axis)
        scale = torch.where(s_std > 1e-8, t_std / s_std.clamp(min=1e-12), torch.ones_like(s_std)).clamp(*SCALE)
        shift = t_mean - s_mean * scale
        with torch.no_grad():
            view = [1] * w.dim()
            view[w_axis] = -1
            w.mul_(scale.to(w.dtype).view(view))
            b.mul_(scale.to(b.dtype)).add_(shift.to(b.dtype))
        corrected.append(float((shift.abs() / t_std.clamp(min=1e-12)).mean()))
        shape = [1] * out.dim()
        shape[axis] = -1
        return out * scale.to(out.dtype).view(shape) + shift.to(out.dtype).view(shape)

    with torch.no_grad():
        teacher.run(inputs, hook=record)
        student.run(inputs, hook=correct)
    logger.info(f"prune.structured: re-estimated the statistics of {len(corrected)} layers on {len(inputs[0])} samples")
    return {"layers": len(corrected), "samples": len(inputs[0]),
            "mean_shift_in_std": round(float(np.mean(corrected)), 4) if corrected else 0.0}
