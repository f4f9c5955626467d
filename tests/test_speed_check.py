"""Speed-aware int8 (targets/speed.py): the decision with a scripted timer, and once with the real one."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
import torch
from passes_util import run
from torch import nn

from edgepipe.passes import PassContext
from edgepipe.passes.base import load
from edgepipe.pipeline.build import run_passes as _run_passes
from edgepipe.recipe import TargetSpec
from edgepipe.targets import TARGETS
from edgepipe.targets.base import TargetContext
from edgepipe.targets.speed import MARGIN, run_chain, slow_nodes, slower

CHAIN = [{"name": "cleanup"}, {"name": "quantize.static"}]


class Block(nn.Module):
    """MobileNetV3's inverted residual: expand 1x1 + hardswish, depthwise 3x3, squeeze-excitation, project 1x1."""

    def __init__(self, c: int = 16, e: int = 64) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, c, 3, 2, 1), nn.BatchNorm2d(c), nn.Hardswish())
        self.expand = nn.Sequential(nn.Conv2d(c, e, 1), nn.BatchNorm2d(e), nn.Hardswish())
        self.dw = nn.Sequential(nn.Conv2d(e, e, 3, 1, 1, groups=e), nn.BatchNorm2d(e), nn.Hardswish())
        self.se = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(e, e // 4, 1), nn.ReLU(), nn.Conv2d(e // 4, e, 1), nn.Hardsigmoid())
        self.project = nn.Sequential(nn.Conv2d(e, c, 1), nn.BatchNorm2d(c))
        self.head = nn.Linear(c, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        y = self.dw(self.expand(x))
        y = self.project(y * self.se(y))
        return self.head((x + y).mean((2, 3)))


def _images(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 3, 64, 64)).astype(np.float32)


@pytest.fixture(scope="module")
def block_onnx(tmp_path_factory) -> ir.Model:
    torch.manual_seed(0)
    model = Block().eval()
    path = tmp_path_factory.mktemp("block") / "block.onnx"
    torch.onnx.export(model, (torch.from_numpy(_images(1, 0)),), str(path), input_names=["image"], output_names=["logits"],
                      dynamic_axes={"image": {0: "batch"}}, dynamo=False)
    return load(path)


def _context(tmp_path) -> PassContext:
    return PassContext(workdir=tmp_path / "work", calibration=lambda: ({"image": _images(4, s)} for s in range(4)))


def _no_costs(*_args) -> dict:
    return {}  # nothing measured: the known-slow patterns stand in


def _chain(tmp_path, model: ir.Model, timings: list[float], target: str = "cpu", chain: list[dict] = CHAIN, tctx=None,
           costs=_no_costs):
    """run_chain with a timer that answers ``timings`` in turn (float, candidate, float, candidate ...), and a
    per-node cost measurement ``costs``."""
    answers = iter(timings)
    calls = []

    def timer(paths, _target, _sample):
        calls.append([p.suffix for p in paths])
        return [next(answers) for _ in paths]

    out, log = run_chain(TARGETS[target](), tctx, chain, _context(tmp_path), model, {"image": _images(2, 9)}, _run_passes, timer,
                         costs)
    return out, log, calls


def _ops(model: ir.Model) -> set[str]:
    return {n.op_type for n in model.graph}


def test_slow_patterns_are_the_excitation_activations_and_depthwise(block_onnx):
    named = {n.name: n for n in block_onnx.graph}
    slow = [named[n] for n in slow_nodes(block_onnx) if n in named]
    ops = sorted(n.op_type for n in slow)
    assert ops.count("HardSwish") == 3 and ops.count("HardSigmoid") == 1 and "Mul" in ops
    convs = [n for n in slow if n.op_type == "Conv"]  # the depthwise conv and the two 1x1 convs of the SE block
    assert len(convs) == 3 and sum(n.attributes.get("group") is not None and n.attributes["group"].as_int() > 1 for n in convs) == 1
    assert {"Conv", "Gemm"} & {n.op_type for n in block_onnx.graph if n.name not in slow_nodes(block_onnx)}  # the rest stays int8


def test_int8_ships_when_not_slower(tmp_path, block_onnx):
    out, log, calls = _chain(tmp_path, block_onnx, [1.0, 1.0 + MARGIN / 2])  # within the margin: int8 ships
    assert "QuantizeLinear" in _ops(out) and len(calls) == 1
    assert log[-1]["name"] == "quantize.static" and log[-1]["stats"]["speed"]["choice"] == "int8"


def test_slow_patterns_go_float_when_int8_is_slower(tmp_path, block_onnx):
    out, log, calls = _chain(tmp_path, block_onnx, [1.0, 2.0, 1.0, 0.8])
    assert len(calls) == 2
    params = log[-1]["params"]
    assert set(slow_nodes(block_onnx)) <= set(params["nodes_to_exclude"])
    convs = [n for n in out.graph if n.op_type == "Conv"]
    int8_weight = [n.inputs[1].producer() is not None for n in convs]  # a DequantizeLinear feeds an int8 weight
    depthwise = [n.attributes.get("group") is not None and n.attributes["group"].as_int() > 1 for n in convs]
    assert sum(int8_weight) == len(convs) - 3 and not any(w and d for w, d in zip(int8_weight, depthwise, strict=True))
    assert not any(u.op_type == "QuantizeLinear" for n in out.graph if n.op_type == "HardSigmoid" for u, _ in n.outputs[0].uses())
    assert log[-1]["stats"]["speed"] | {"choice": "int8, slow patterns in float", "int8_ms": 2.0, "partial_ms": 0.8} == log[-1]["stats"]["speed"]


def test_the_budget_fallbacks_quantize_auto_is_speed_checked_too(tmp_path, block_onnx):
    """The default fallback's step (quantize.auto) is timed like plain int8: slow patterns float, in its inner options."""
    chain = [{"name": "cleanup"}, {"name": "quantize.auto", "method": "static", "options": {}}]
    out, log, calls = _chain(tmp_path, block_onnx, [1.0, 2.0, 1.0, 0.8], chain=chain)
    assert len(calls) == 2 and log[-1]["name"] == "quantize.auto"
    assert set(slow_nodes(block_onnx)) <= set(log[-1]["params"]["options"]["nodes_to_exclude"])
    assert log[-1]["stats"]["speed"]["choice"] == "int8, slow patterns in float" and "QuantizeLinear" in _ops(out)


def test_float_ships_with_the_reason_when_the_slow_pattern_variant_fails(tmp_path, block_onnx):
    """The slow-pattern variant is best effort (seen: ORT's quantizer writing duplicate node names): float ships."""
    def flaky(chain, pctx, model):
        if chain and "nodes_to_exclude" in chain[0]:
            raise RuntimeError("invalid model: two nodes with same node name")
        return _run_passes(chain, pctx, model)

    answers = iter([1.0, 2.0])
    out, log = run_chain(TARGETS["cpu"](), None, CHAIN, _context(tmp_path), block_onnx, {"image": _images(2, 9)}, flaky,
                         lambda paths, _t, _s: [next(answers), next(answers)], _no_costs)
    assert not {"QuantizeLinear", "DequantizeLinear"} & _ops(out) and log[-1]["name"] == "speed.check"
    assert "two nodes" in log[-1]["stats"]["speed"]["partial_error"]


def test_float_ships_with_a_warning_when_int8_stays_slower(tmp_path, block_onnx):
    out, log, _ = _chain(tmp_path, block_onnx, [1.0, 2.0, 1.0, 1.5])
    assert not {"QuantizeLinear", "DequantizeLinear"} & _ops(out)
    assert [p["name"] for p in log] == ["cleanup", "speed.check"]
    assert log[-1]["stats"]["speed"]["choice"] == "float" and log[-1]["stats"]["warning"]
    x = _images(3, 5)
    np.testing.assert_allclose(run(out, {"image": x})[0], run(block_onnx, {"image": x})[0], rtol=1e-4, atol=1e-4)


def test_speed_check_off_in_the_recipe_ships_int8_untimed(tmp_path, block_onnx):
    tctx = TargetContext(None, TargetSpec(speed_check=False), True)
    out, log, calls = _chain(tmp_path, block_onnx, [1.0, 2.0, 1.0, 1.5], tctx=tctx)  # timings that would ship float
    assert calls == [] and {"QuantizeLinear", "DequantizeLinear"} <= _ops(out)
    assert "speed.check" not in [p["name"] for p in log] and log[-1]["stats"]["speed"] == {"choice": "int8", "checked": False}


def test_mobile_times_the_ort_files_and_gpu_is_not_checked(tmp_path, block_onnx):
    _, _, calls = _chain(tmp_path, block_onnx, [1.0, 0.5], target="mobile")
    assert calls == [[".ort", ".ort"]]
    _, log, calls = _chain(tmp_path, block_onnx, [], target="gpu")
    assert calls == [] and "speed" not in log[-1]["stats"]


def test_real_timer_decides_by_its_own_timings(tmp_path, block_onnx):
    """The real timer once: the shipped model is the one its own measurement chose (no wall-clock threshold here:
    the machine is shared and noisy; the speed figures live in benchmarks/speed_aware.py)."""
    out, log, = run_chain(TARGETS["cpu"](), None, CHAIN, _context(tmp_path), block_onnx, {"image": _images(1, 9)}, _run_passes)
    speed = next(p["stats"]["speed"] for p in log if "speed" in p["stats"])
    assert speed["float_ms"] > 0 and speed["int8_ms"] > 0
    quantized = {"QuantizeLinear", "DequantizeLinear"} & _ops(out)
    if speed["choice"] == "int8":
        assert not slower(speed["int8_ms"], speed["float_ms"]) and quantized
    elif speed["choice"] == "float":
        assert slower(speed["int8_ms"], speed["float_ms"]) and not quantized
        assert slower(speed.get("partial_ms", speed["int8_ms"]), speed.get("float_ms_retimed", speed["float_ms"]))
    else:  # int8 with the slow patterns float: int8 was slower, the partial model was not
        assert slower(speed["int8_ms"], speed["float_ms"]) and not slower(speed["partial_ms"], speed["float_ms_retimed"])
        assert quantized


@pytest.mark.parametrize("faster", ["measured", "patterns"])
def test_nodes_measured_slower_in_int8_go_float(tmp_path, block_onnx, faster):
    """When int8 is slower, the nodes whose int8 form the per-node measurement finds slower (here the stem conv
    only) and the known-slow patterns are each kept float, timed side by side with float: the faster ships."""
    seen = {}

    def costs(float_path, int8_path, graph, target, sample, workdir):
        seen.update(files=[float_path.suffix, int8_path.suffix])
        convs = [n.name for n in graph.node if n.op_type == "Conv"]
        seen["stem"] = convs[0]
        return {convs[0]: {"int8_ms": 0.5, "float_ms": 0.1}, **{c: {"int8_ms": 0.1, "float_ms": 0.3} for c in convs[1:]}}

    times = [1.0, 2.0, 1.0, 0.8, 0.9] if faster == "measured" else [1.0, 2.0, 1.0, 0.9, 0.8]
    out, log, calls = _chain(tmp_path, block_onnx, times, costs=costs)
    assert len(calls) == 2 and len(calls[1]) == 3 and seen["files"] == [".onnx", ".onnx"]
    speed = log[-1]["stats"]["speed"]
    assert speed["partial_ms"] == 0.8 and set(speed["partials_ms"].values()) == {0.8, 0.9}
    if faster == "patterns":
        assert set(log[-1]["params"]["nodes_to_exclude"]) == set(slow_nodes(block_onnx))
        assert speed["choice"] == "int8, slow patterns in float"
        return
    assert log[-1]["params"]["nodes_to_exclude"] == [seen["stem"]]
    assert speed["choice"] == "int8, nodes measured slower in int8 in float" and speed["kept_float"] == 1
    convs = [n for n in out.graph if n.op_type == "Conv"]
    float_weight = [n.inputs[1].producer() is None for n in convs]  # no DequantizeLinear feeds a float weight
    assert float_weight == [True] + [False] * (len(convs) - 1)


def test_the_pattern_list_stands_in_when_the_measurement_fails(tmp_path, block_onnx):
    def broken(*_args):
        raise RuntimeError("profile unreadable")

    _, log, _ = _chain(tmp_path, block_onnx, [1.0, 2.0, 1.0, 0.8], costs=broken)
    assert set(slow_nodes(block_onnx)) <= set(log[-1]["params"]["nodes_to_exclude"])
    assert log[-1]["stats"]["speed"]["cost_error"] == "profile unreadable"
