"""Per-node cost of int8 against float (targets/nodecost.py): ORT's kernel times mapped back to float nodes."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
import torch
from onnx import TensorProto, helper
from torch import nn

from edgepipe.passes import PassContext
from edgepipe.passes.autoquant import QuantizeAuto, float_cost
from edgepipe.passes.base import load, save
from edgepipe.passes.float_guard import name_nodes
from edgepipe.pipeline.build import run_passes
from edgepipe.targets.nodecost import attribute, node_costs, slower_in_int8


def _graph() -> onnx.GraphProto:
    """image → conv_a → x → relu → y → conv_b → out; conv_ab shares a prefix with conv_a."""
    w = helper.make_tensor("w", TensorProto.FLOAT, [4, 4, 1, 1], np.ones(16, np.float32))
    nodes = [helper.make_node("Conv", ["image", "w"], ["x"], name="conv_a"),
             helper.make_node("Relu", ["x"], ["y"], name="relu"),
             helper.make_node("Conv", ["y", "w"], ["z"], name="conv_ab"),
             helper.make_node("Conv", ["z", "w"], ["out"], name="conv_b")]
    vi = helper.make_tensor_value_info
    return helper.make_graph(nodes, "g", [vi("image", TensorProto.FLOAT, [1, 4, 8, 8])],
                             [vi("out", TensorProto.FLOAT, [1, 4, 8, 8])], [w])


@pytest.mark.parametrize(("kernel", "op", "node"), [
    ("conv_a", "Conv", "conv_a"),
    ("conv_ab_token_7", "QLinearConv", "conv_ab"),  # ORT's fused kernel: the longest name it starts with
    ("y_nchwc", "Conv", "conv_a"),  # named after the Relu's output, fused into conv_a: counts with conv_a
    ("image_QuantizeLinear", "QuantizeLinear", "conv_a"),  # a graph input's Q serves its reader
    ("z_QuantizeLinear", "QuantizeLinear", "conv_ab"),  # a Q serves the producer of its tensor
    ("z_DequantizeLinear", "DequantizeLinear", "conv_b"),  # a DQ serves the reader of its tensor
    ("out_DequantizeLinear", "DequantizeLinear", "conv_b"),  # a graph output's DQ: its producer
    ("conv_abx", "Conv", None),  # a name only starts with "conv_ab": not that node's
    ("Transpose_token_3", "Transpose", None),
])
def test_kernel_names_map_to_the_float_node_they_serve(kernel, op, node):
    per, other, _ = attribute([(kernel, op, 1.5, 64)], _graph())
    assert (per == {node: 1.5} and other == 0) if node else (per == {} and other == 1.5)


class Net(nn.Module):
    """A light stem, one heavy 3x3 conv, a light 1x1 conv and a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.ReLU())
        self.heavy = nn.Sequential(nn.Conv2d(8, 96, 3, 1, 1), nn.ReLU())
        self.light = nn.Conv2d(96, 8, 1)
        self.head = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.light(self.heavy(self.stem(x))).mean((2, 3)))


def _images(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 3, 96, 96)).astype(np.float32)


def test_measured_times_land_on_the_nodes_that_spend_them(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "net.onnx"
    torch.onnx.export(Net().eval(), (torch.from_numpy(_images(1, 0)),), str(path), input_names=["image"],
                      output_names=["logits"], dynamic_axes={"image": {0: "batch"}}, dynamo=False)
    pctx = PassContext(workdir=tmp_path / "work", calibration=lambda: ({"image": _images(2, s)} for s in range(2)))
    float_model, _ = run_passes([{"name": "cleanup"}], pctx, load(path))
    name_nodes(float_model)
    int8_model, _ = run_passes([{"name": "quantize.static"}], pctx, float_model)
    paths = {}
    for key, m in (("float", float_model), ("int8", int8_model)):
        (tmp_path / key).mkdir()
        paths[key] = save(m, tmp_path / key / "model.onnx")
    graph = ir.to_proto(float_model).graph
    costs = node_costs(paths["float"], paths["int8"], graph, {"image": _images(1, 3)}, tmp_path / "profile")
    convs = [n.name for n in graph.node if n.op_type in ("Conv", "Gemm", "MatMul")]
    for form in ("float_ms", "int8_ms"):
        assert all(costs[c][form] > 0 for c in convs)  # every weighted node's kernel found, in both forms
        assert max(costs, key=lambda n, f=form: costs[n][f]) == convs[1]  # the heavy conv is the costliest
        total = sum(c[form] for c in costs.values())
        assert costs[""][form] < 0.2 * total  # little time left unmapped


def test_slower_in_int8_lists_the_nodes_whose_int8_form_costs_more():
    costs = {"a": {"int8_ms": 0.3, "float_ms": 0.1}, "b": {"int8_ms": 0.1, "float_ms": 0.4},
             "c": {"int8_ms": 0.5, "float_ms": 0.1}, "d": {"int8_ms": 0.101, "float_ms": 0.1}, "": {"int8_ms": 9, "float_ms": 0}}
    assert slower_in_int8(costs) == ["c", "a"]


def _costs() -> dict:
    """conv_a is dear in float, conv_ab a little, conv_b free; every tensor 256 elements (relu's: fused into conv_a,
    so none of its own); a crossing costs 1 µs an element."""
    return {"conv_a": {"int8_ms": 0.1, "float_ms": 0.3, "elements": 256}, "relu": {"int8_ms": 0.0, "float_ms": 0.0, "elements": 0},
            "conv_ab": {"int8_ms": 0.1, "float_ms": 0.2, "elements": 256}, "conv_b": {"int8_ms": 0.1, "float_ms": 0.1, "elements": 256},
            "": {"int8_ms": 0.0, "float_ms": 0.0, "crossing_ms_per_element": 0.001}}


@pytest.mark.parametrize(("floats", "ms"), [
    (["conv_ab"], 0.1 + 2 * 0.256),  # its own 0.1 ms, and y and z now cross between int8 and float
    (["conv_a"], 0.2 + 0.256),  # x crosses (relu stays int8); the graph input does not count
    (["conv_a", "relu"], 0.2 + 0.256),  # y crosses, at relu's input's size
    (["conv_a", "relu", "conv_ab", "conv_b"], 0.3),  # one float region: no crossing
])
def test_float_cost_prices_each_nodes_time_and_each_crossing(floats, ms):
    assert float_cost(_graph(), floats, _costs()) == pytest.approx(ms)


def test_the_faster_float_set_ships(tmp_path):
    """quantize.auto with graph_order: of the two sets that meet the budget (the most sensitive nodes, the first
    ones in graph order), the one float_cost prices lower; without a measurement, the smaller."""
    named = ir.from_proto(helper.make_model(_graph()))
    ranked, prefix = ["conv_ab"], ["conv_a", "relu"]
    stats = {}
    auto = QuantizeAuto(QuantizeAuto.Config(graph_order=True), PassContext(workdir=tmp_path, node_costs=lambda f, q: _costs()))
    assert auto._faster(ranked, prefix, helper.make_model(_graph()), named, None, stats) == prefix
    assert stats["float_cost_ms"] == {"sensitivity": pytest.approx(0.612), "graph": pytest.approx(0.456)}
    assert auto._faster(ranked, None, helper.make_model(_graph()), named, None, stats) == ranked  # only one met it

    def broken(f, q):
        raise RuntimeError("no profile")

    for ctx in (PassContext(workdir=tmp_path), PassContext(workdir=tmp_path, node_costs=broken)):
        auto = QuantizeAuto(QuantizeAuto.Config(graph_order=True), ctx)
        assert auto._faster(ranked, prefix, helper.make_model(_graph()), named, None, stats) == ranked
    assert stats["node_costs_error"] == "no profile"
