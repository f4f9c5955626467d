"""The ONNX graph run in torch, for recovery after structured pruning (passes/prune_finetune.py).

``OnnxModule`` is a small interpreter over the ops CNN heads and blocks use, its float initializers as
parameters, so the pruned model is re-estimated and fine-tuned as it is, with no channel mapping back
to a torch module; ``run`` hands back intermediate values (block outputs to match) and lets a hook
rewrite each node's output (statistics re-estimation). The trained weights are written back into the
pruned graph."""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection, Sequence

import numpy as np
import onnx_ir as ir
import torch
import torch.nn.functional as F
from torch import nn

from edgepipe.core.errors import BadInput

logger = logging.getLogger(__name__)
Op = Callable[[ir.Node, list], torch.Tensor]
Hook = Callable[[ir.Node, torch.Tensor], torch.Tensor]


def _ints(node: ir.Node, name: str, default: list[int] | None = None) -> list[int] | None:
    a = node.attributes.get(name)
    return list(a.as_ints()) if a is not None else default


def _int(node: ir.Node, name: str, default: int) -> int:
    a = node.attributes.get(name)
    return a.as_int() if a is not None else default


def _float(node: ir.Node, name: str, default: float) -> float:
    a = node.attributes.get(name)
    return a.as_float() if a is not None else default


def _padded(node: ir.Node, x: torch.Tensor, value: float = 0.0) -> torch.Tensor:
    if node.attributes.get("auto_pad") is not None and node.attributes["auto_pad"].as_string() not in ("NOTSET", "VALID"):
        raise BadInput(f"prune.structured recover: {node.op_type} auto_pad {node.attributes['auto_pad'].as_string()} is not supported")
    pads = _ints(node, "pads")
    if not pads or not any(pads):
        return x
    half = len(pads) // 2
    torch_pads = []
    for i in reversed(range(half)):  # F.pad wants the last axis first
        torch_pads += [pads[i], pads[i + half]]
    return F.pad(x, torch_pads, value=value)


def _conv(node: ir.Node, a: list) -> torch.Tensor:
    x, w = _padded(node, a[0]), a[1]
    conv = {3: F.conv1d, 4: F.conv2d, 5: F.conv3d}[w.dim()]
    return conv(x, w, a[2] if len(a) > 2 else None, _ints(node, "strides", 1), 0, _ints(node, "dilations", 1), _int(node, "group", 1))


def _gemm(node: ir.Node, a: list) -> torch.Tensor:
    x = a[0].t() if _int(node, "transA", 0) else a[0]
    w = a[1].t() if _int(node, "transB", 0) else a[1]
    y = _float(node, "alpha", 1.0) * (x @ w)
    return y + _float(node, "beta", 1.0) * a[2] if len(a) > 2 and a[2] is not None else y


def _pool(node: ir.Node, a: list) -> torch.Tensor:
    kernel, strides = _ints(node, "kernel_shape"), _ints(node, "strides", None)
    ceil = bool(_int(node, "ceil_mode", 0))
    dims = len(kernel)
    if node.op_type == "MaxPool":
        x = _padded(node, a[0], float("-inf"))
        return {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}[dims](x, kernel, strides or kernel, 0, _ints(node, "dilations", 1), ceil)
    pads = _ints(node, "pads") or [0] * (2 * dims)
    if _int(node, "count_include_pad", 0):
        x, pad = _padded(node, a[0]), 0
    elif pads[:dims] == pads[dims:]:
        x, pad = a[0], pads[:dims]
    else:
        raise BadInput("prune.structured recover: AveragePool with asymmetric pads is not supported")
    return {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}[dims](x, kernel, strides or kernel, pad, ceil, False)


def _axes(node: ir.Node, a: list) -> list[int] | None:
    if len(a) > 1 and a[1] is not None:
        return [int(v) for v in a[1].reshape(-1).tolist()]
    return _ints(node, "axes")


def _reduce_mean(node: ir.Node, a: list) -> torch.Tensor:
    axes = _axes(node, a)
    return a[0].mean(dim=axes, keepdim=bool(_int(node, "keepdims", 1))) if axes else a[0].mean()


def _reshape(node: ir.Node, a: list) -> torch.Tensor:
    shape = [int(v) for v in a[1].tolist()]
    shape = [a[0].shape[i] if s == 0 and not _int(node, "allowzero", 0) else s for i, s in enumerate(shape)]
    return a[0].reshape(shape)


def _clip(node: ir.Node, a: list) -> torch.Tensor:
    lo = a[1] if len(a) > 1 and a[1] is not None else None
    hi = a[2] if len(a) > 2 and a[2] is not None else None
    return torch.clamp(a[0], lo, hi)


def _batchnorm(node: ir.Node, a: list) -> torch.Tensor:
    return F.batch_norm(a[0], a[3], a[4], a[1], a[2], False, 0.0, _float(node, "epsilon", 1e-5))


OPS: dict[str, Op] = {
    "Conv": _conv, "Gemm": _gemm, "MaxPool": _pool, "AveragePool": _pool, "ReduceMean": _reduce_mean, "Reshape": _reshape,
    "Clip": _clip, "BatchNormalization": _batchnorm,
    "MatMul": lambda n, a: a[0] @ a[1], "Add": lambda n, a: a[0] + a[1], "Sub": lambda n, a: a[0] - a[1],
    "Mul": lambda n, a: a[0] * a[1], "Div": lambda n, a: a[0] / a[1], "Relu": lambda n, a: F.relu(a[0]),
    "Sigmoid": lambda n, a: torch.sigmoid(a[0]), "Tanh": lambda n, a: torch.tanh(a[0]),
    "HardSigmoid": lambda n, a: torch.clamp(_float(n, "alpha", 0.2) * a[0] + _float(n, "beta", 0.5), 0, 1),
    "HardSwish": lambda n, a: F.hardswish(a[0]), "Identity": lambda n, a: a[0], "Dropout": lambda n, a: a[0],
    "GlobalAveragePool": lambda n, a: a[0].mean(dim=tuple(range(2, a[0].dim())), keepdim=True),
    "GlobalMaxPool": lambda n, a: a[0].amax(dim=tuple(range(2, a[0].dim())), keepdim=True),
    "Flatten": lambda n, a: a[0].flatten(_int(n, "axis", 1)) if _int(n, "axis", 1) else a[0].reshape(1, -1),
    "Concat": lambda n, a: torch.cat(a, _int(n, "axis", 0)), "Softmax": lambda n, a: torch.softmax(a[0], _int(n, "axis", -1)),
    "Transpose": lambda n, a: a[0].permute(*_ints(n, "perm", list(reversed(range(a[0].dim()))))),
    "Erf": lambda n, a: torch.erf(a[0]), "Sqrt": lambda n, a: torch.sqrt(a[0]), "Pow": lambda n, a: a[0] ** a[1],
    "LeakyRelu": lambda n, a: F.leaky_relu(a[0], _float(n, "alpha", 0.01)),
    "Constant": lambda n, a: torch.from_numpy(np.array(n.attributes["value"].as_tensor().numpy())),
}


class OnnxModule(nn.Module):
    """An ONNX graph run op by op in torch; float initializers with more than one element are parameters."""

    def __init__(self, model: ir.Model) -> None:
        super().__init__()
        unknown = sorted({n.op_type for n in model.graph if n.op_type not in OPS or n.domain not in ("", "ai.onnx")})
        if unknown:
            raise BadInput(f"prune.structured recover: ops {unknown} are not supported by the fine-tuning interpreter; "
                           "drop recover_epochs or prune before the passes that add them")
        self.graph = model.graph
        self.inputs = [v.name for v in model.graph.inputs]
        self.keys: dict[str, str] = {}  # initializer name → parameter key
        self.params = nn.ParameterDict()
        self.consts: dict[str, torch.Tensor] = {}
        for name, value in model.graph.initializers.items():
            array = value.const_value.numpy()
            tensor = torch.from_numpy(np.array(array))
            if array.dtype == np.float32 and array.size > 1:
                key = f"p{len(self.keys)}"
                self.keys[name] = key
                self.params[key] = nn.Parameter(tensor)
            else:
                self.consts[name] = tensor
        self.output = model.graph.outputs[0].name
        self._dead = self._last_reads()

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        return self.run(inputs)[self.output]

    def run(self, inputs: Sequence[torch.Tensor], keep: Collection[str] = (), hook: Hook | None = None) -> dict[str, torch.Tensor]:
        """The first output and the values named in ``keep``; ``hook(node, output)`` may replace each node's output.

        A value is dropped once its last reader has run, so a whole calibration set fits in one pass.
        """
        env: dict[str, torch.Tensor] = dict(zip(self.inputs, inputs, strict=True))
        for name, key in self.keys.items():
            env[name] = self.params[key]
        env.update(self.consts)
        wanted = {self.output, *keep}
        for node, dead in zip(self.graph, self._dead, strict=True):
            args = [env[v.name] if v is not None and v.name in env else self._constant(v) for v in node.inputs]
            out = OPS[node.op_type](node, args)
            env[node.outputs[0].name] = hook(node, out) if hook is not None else out
            for name in dead:
                if name not in wanted:
                    env.pop(name, None)
        return {name: env[name] for name in wanted}

    def _last_reads(self) -> list[list[str]]:
        """Per node, the computed values no later node reads (freed after it runs)."""
        last: dict[str, int] = {}
        nodes = list(self.graph)
        for i, node in enumerate(nodes):
            for v in node.inputs:
                if v is not None and v.name not in self.keys and v.name not in self.consts:
                    last[v.name] = i
        dead: list[list[str]] = [[] for _ in nodes]
        for name, i in last.items():
            dead[i].append(name)
        return dead

    def param(self, name: str) -> nn.Parameter | None:
        """The trainable tensor of initializer ``name`` (None for constants and scalars)."""
        key = self.keys.get(name)
        return self.params[key] if key is not None else None

    @staticmethod
    def _constant(value: ir.Value | None) -> torch.Tensor | None:
        if value is None or value.name == "":
            return None
        if value.const_value is not None:
            return torch.from_numpy(np.array(value.const_value.numpy()))
        raise BadInput(f"prune.structured recover: value {value.name} is computed before it is defined")

    def write_back(self, model: ir.Model) -> None:
        """The trained parameters into ``model``'s initializers (same names)."""
        for name, key in self.keys.items():
            value = model.graph.initializers[name]
            array = self.params[key].detach().numpy().astype(np.float32)
            value.const_value = ir.tensor(array, name=name)
