"""prune.structured on the patterns every CNN has: residual groups, Concat, depthwise blocks, pooled heads."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
import torch
from passes_util import check_contract, make_model, node, run, tensor
from torch import nn

from edgepipe.passes.base import load, model_stats
from edgepipe.passes.prune_structured import PruneStructured

RNG = np.random.default_rng(3)


def _export(module: nn.Module, path, shape=(2, 3, 16, 16)) -> ir.Model:
    torch.onnx.export(module.eval(), (torch.randn(*shape),), str(path), input_names=["x"], output_names=["y"],
                      dynamic_axes={"x": {0: "n"}}, dynamo=False)
    return load(path)


def _prune(model: ir.Model, sparsity: float = 0.5, **kw):
    return PruneStructured(PruneStructured.Config(sparsity=sparsity, **kw))(model)


def _kill(conv: nn.Conv2d, bn: nn.BatchNorm2d | None, dead: list[int]) -> None:
    """Channels that are exactly zero after conv (+ BN): removing them must not change the output."""
    with torch.no_grad():
        conv.weight[dead] = 0.0
        if conv.bias is not None:
            conv.bias[dead] = 0.0
        if bn is not None:
            bn.bias[dead] = 0.0
            bn.running_mean[dead] = 0.0


def _x(n: int = 2) -> np.ndarray:
    return RNG.standard_normal((n, 3, 16, 16)).astype(np.float32)


def _removed(before: ir.Model, after: ir.Model) -> float:
    return 1 - model_stats(after)["params"] / model_stats(before)["params"]


def _inits(model: ir.Model) -> dict[str, np.ndarray]:
    return {k: v.const_value.numpy() for k, v in model.graph.initializers.items()}


class MiniResNet(nn.Module):
    """stem → basic block (identity) → basic block (1x1 downsample) → global pool → flatten → linear."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.bn0 = nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16)
        self.c1, self.b1 = nn.Conv2d(16, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16)
        self.c2, self.b2 = nn.Conv2d(16, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16)
        self.c3, self.b3 = nn.Conv2d(16, 32, 3, 2, 1, bias=False), nn.BatchNorm2d(32)
        self.c4, self.b4 = nn.Conv2d(32, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32)
        self.down, self.bd = nn.Conv2d(16, 32, 1, 2, bias=False), nn.BatchNorm2d(32)
        self.fc = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn0(self.stem(x)))
        x = torch.relu(x + self.b2(self.c2(torch.relu(self.b1(self.c1(x))))))
        x = torch.relu(self.bd(self.down(x)) + self.b4(self.c4(torch.relu(self.b3(self.c3(x))))))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


@pytest.fixture(scope="module")
def resnet(tmp_path_factory) -> tuple[MiniResNet, ir.Model]:
    torch.manual_seed(0)
    module = MiniResNet()
    for bn in (module.bn0, module.b1, module.b2, module.b3, module.b4, module.bd):  # non-trivial BN statistics
        bn.running_mean.uniform_(-0.5, 0.5), bn.running_var.uniform_(0.5, 2.0), bn.bias.data.uniform_(-0.2, 0.2)
    dead = [1, 4, 6, 9, 11, 12, 14, 15]
    for conv, bn in ((module.stem, module.bn0), (module.c2, module.b2)):  # the whole first residual group
        _kill(conv, bn, dead)
    return module, _export(module, tmp_path_factory.mktemp("resnet") / "m.onnx")


def _conv(model: ir.Model, module_name: str) -> str:
    return next(n.name for n in model.graph if n.op_type == "Conv" and n.name.startswith(f"/{module_name}/"))


def test_residual_group_is_cut_with_the_same_channels_exactly(resnet):
    _, model = resnet
    # only the first group (stem + c2, whose dead channels match) may go: then the output must not change
    result = _prune(model, exclude=[_conv(model, m) for m in ("c1", "c3", "c4")])
    check_contract(result.model)
    x = _x()
    np.testing.assert_allclose(run(result.model, {"x": x})[0], run(model, {"x": x})[0], rtol=1e-4, atol=1e-5)
    layers = result.stats["layers"]
    assert set(layers) == {_conv(model, "stem"), _conv(model, "c2")}
    assert all(v.startswith("16→8") and v.endswith("[residual group of 2]") for v in layers.values())
    # c4 excluded: its partner in the second group is never cut alone (the Add would get 32 and 16 channels)
    assert "residual" in result.stats["skipped"][_conv(model, "down")] and _conv(model, "down") not in layers


def test_every_block_and_the_pooled_head_shrink(resnet):
    _, model = resnet
    result = _prune(model)
    check_contract(result.model)
    assert len(result.stats["layers"]) == 6 and "warning" not in result.stats
    assert list(result.stats["skipped"]) == ["/fc/Gemm"]  # its output is the model's
    fc = next(v for v in _inits(result.model).values() if v.ndim == 2)  # Gemm weight [10, 32 → 16]: the head reads group 2
    assert fc.shape == (10, 16)
    assert run(result.model, {"x": _x(3)})[0].shape == (3, 10)
    assert _removed(model, result.model) >= 0.5  # both axes of most convs: more than the channel share


class ConcatBlock(nn.Module):
    """Two branches concatenated (DenseNet / Inception), per-channel scale, then a conv reading both."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.a, self.b = nn.Conv2d(16, 16, 1), nn.Conv2d(16, 16, 3, padding=1)
        self.scale = nn.Parameter(torch.rand(1, 48, 1, 1) + 0.5)
        self.mix = nn.Conv2d(48, 16, 1)
        self.fc = nn.Linear(16 * 4 * 4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = torch.relu(self.stem(x))
        cat = torch.cat([s, torch.relu(self.a(s)), torch.relu(self.b(s))], 1) * self.scale
        y = nn.functional.max_pool2d(torch.relu(self.mix(cat)), 4)
        return self.fc(torch.flatten(y, 1))  # flatten keeps H*W features per channel


def test_concat_inputs_are_cut_at_their_offsets(tmp_path):
    torch.manual_seed(1)
    module = ConcatBlock()
    _kill(module.b, None, [0, 3, 5, 6, 8, 9, 12, 13])  # dead in the third concat input only: offset 32
    _kill(module.mix, None, [2, 3, 7, 10, 11, 12, 13, 15])  # dead before the flatten: runs of 16 features
    model = _export(module, tmp_path / "m.onnx")
    result = _prune(model, exclude=[_conv(model, "stem"), _conv(model, "a")])  # live channels: would change the output
    check_contract(result.model)
    assert {v.split()[0] for v in result.stats["layers"].values()} == {"16→8"}
    x = _x()
    np.testing.assert_allclose(run(result.model, {"x": x})[0], run(model, {"x": x})[0], rtol=1e-4, atol=1e-5)
    w = _inits(result.model)
    assert any(v.shape == (8, 40, 1, 1) for v in w.values())  # mix: 16 → 8 out, 48 - 8 in and any(v.shape == (5, 128) for v in w.values())


class InvertedResidual(nn.Module):
    """MobileNetV2: expand 1x1 → ReLU6 → depthwise 3x3 → ReLU6 → project 1x1, with the identity added."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU6())
        self.expand = nn.Sequential(nn.Conv2d(16, 64, 1), nn.BatchNorm2d(64), nn.ReLU6())
        self.dw = nn.Sequential(nn.Conv2d(64, 64, 3, padding=1, groups=64), nn.BatchNorm2d(64), nn.ReLU6())
        self.project = nn.Sequential(nn.Conv2d(64, 16, 1), nn.BatchNorm2d(16))
        self.head = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.stem(x)
        return self.head((s + self.project(self.dw(self.expand(s)))).mean((2, 3)))


def test_depthwise_block_inside_a_residual_group(tmp_path):
    torch.manual_seed(2)
    model = _export(InvertedResidual(), tmp_path / "m.onnx")
    result = _prune(model, sparsity=0.3)
    check_contract(result.model)
    layers = result.stats["layers"]
    assert sorted(v.split()[0] for v in layers.values()) == ["16→12", "16→12", "64→48"]  # 64: blocks of 8
    depthwise = next(n for n in result.model.graph if n.op_type == "Conv" and n.attributes.get("group") is not None
                     and n.attributes["group"].as_int() > 1)
    assert depthwise.attributes["group"].as_int() == 48 and depthwise.inputs[1].const_value.shape[0] == 48
    assert _removed(model, result.model) >= 0.27
    assert run(result.model, {"x": _x(3)})[0].shape == (3, 4)


def test_reduce_mean_head_and_a_shortfall_that_says_so():
    """ReduceMean over H, W (torch.export's global pooling) into a Gemm; a conv added to the input is not cut."""
    w = RNG.standard_normal((8, 8, 1, 1)).astype(np.float32)
    fc = RNG.standard_normal((3, 8)).astype(np.float32)
    nodes = [node("Conv", ["x", "W"], ["c"]), node("Relu", ["c"], ["r"]),
             node("ReduceMean", ["r", "axes"], ["m"], keepdims=0), node("Gemm", ["m", "FC"], ["y"], transB=1)]
    inits = {"W": w, "FC": fc, "axes": np.array([2, 3], dtype=np.int64)}
    model = make_model(nodes, inits, [tensor("x", ["n", 8, 5, 5])], [tensor("y", ["n", 3])], opset=18)
    result = _prune(model)
    assert _inits(result.model)["FC"].shape == (3, 4) and "warning" not in result.stats
    run(result.model, {"x": RNG.standard_normal((2, 8, 5, 5)).astype(np.float32)})
    nodes[1] = node("Add", ["c", "x"], ["r"])  # channels meet the graph input: nothing can be cut
    model = make_model(nodes, inits, [tensor("x", ["n", 8, 5, 5])], [tensor("y", ["n", 3])], opset=18)
    result = _prune(model, multiple_of=1)
    assert not result.modified and result.stats["channels_cut"] == 0.0
    assert result.stats["warning"] and "residual" in result.stats["skipped"]["c"]
