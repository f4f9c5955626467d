"""prune.structured: channel groups traced producer → consumer, on inline graphs, digits and a tiny BERT."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from passes_util import check_contract, digits_train, make_model, node, run, same, tensor, top1

from edgepipe.core.errors import BadInput
from edgepipe.passes import PassContext
from edgepipe.passes.base import load, model_stats
from edgepipe.passes.prune_structured import PruneStructured

RNG = np.random.default_rng(1)


def _prune(model, sparsity=0.5, multiple_of=1, **kw):
    return PruneStructured(PruneStructured.Config(sparsity=sparsity, multiple_of=multiple_of, **kw))(model)


def _inits(model) -> dict[str, np.ndarray]:
    return {k: v.const_value.numpy() for k, v in model.graph.initializers.items()}


def _mlp(dead: list[int]) -> ir.Model:
    w1 = RNG.standard_normal((8, 16)).astype(np.float32)
    b1 = RNG.standard_normal(16).astype(np.float32)
    w1[:, dead] = 0.0
    b1[dead] = -1.0  # relu(-1) = 0: these neurons contribute nothing
    w2 = RNG.standard_normal((16, 4)).astype(np.float32)
    nodes = [node("MatMul", ["x", "W1"], ["h"]), node("Add", ["h", "B1"], ["hb"]), node("Relu", ["hb"], ["r"]), node("MatMul", ["r", "W2"], ["y"])]
    return make_model(nodes, {"W1": w1, "B1": b1, "W2": w2}, [tensor("x", ["n", 8])], [tensor("y", ["n", 4])])


def test_mlp_dead_neurons_are_removed_exactly_and_idempotent():
    dead = [1, 3, 4, 7, 9, 10, 12, 15]
    model = _mlp(dead)
    result = _prune(model)
    w = _inits(result.model)
    assert w["W1"].shape == (8, 8) and w["B1"].shape == (8,) and w["W2"].shape == (8, 4)
    np.testing.assert_array_equal(w["W1"], _inits(model)["W1"][:, [i for i in range(16) if i not in dead]])
    assert result.stats["layers"] == {"h": "16→8 (y)"}
    check_contract(result.model)
    x = RNG.standard_normal((5, 8)).astype(np.float32)
    np.testing.assert_allclose(run(result.model, {"x": x})[0], run(model, {"x": x})[0], rtol=1e-5, atol=1e-6)
    again = _prune(result.model)
    assert not again.modified and same(again.model, result.model)


def test_multiple_of_rounds_the_kept_width_up_and_adapts_to_small_layers():
    result = _prune(_mlp([]), sparsity=0.7, multiple_of=4)
    assert _inits(result.model)["W1"].shape == (8, 8)  # 16 - 11 = 5 kept → rounded up to 8
    assert _inits(_prune(_mlp([]), sparsity=0.7, multiple_of=16).model)["W1"].shape == (8, 8)  # 16 wide: blocks of 16 // 4
    wide = RNG.standard_normal((8, 128)).astype(np.float32)
    nodes = [node("MatMul", ["x", "W1"], ["h"]), node("Relu", ["h"], ["r"]), node("MatMul", ["r", "W2"], ["y"])]
    model = make_model(nodes, {"W1": wide, "W2": wide.T.copy()}, [tensor("x", ["n", 8])], [tensor("y", ["n", 8])])
    assert _inits(_prune(model, sparsity=0.7, multiple_of=16).model)["W1"].shape == (8, 48)  # 38 kept → 48


def test_residual_add_is_left_alone_and_reported():
    w = RNG.standard_normal((16, 16)).astype(np.float32)
    nodes = [node("MatMul", ["x", "W"], ["h"]), node("Add", ["h", "x"], ["a"]), node("MatMul", ["a", "W2"], ["y"])]
    model = make_model(nodes, {"W": w, "W2": w.copy()}, [tensor("x", ["n", 16])], [tensor("y", ["n", 16])])
    result = _prune(model)
    assert not result.modified and _inits(result.model)["W"].shape == (16, 16)
    assert "residual" in result.stats["skipped"]["h"]


def test_conv_batchnorm_pool_flatten_gemm_dead_channels():
    w = RNG.standard_normal((8, 1, 3, 3)).astype(np.float32)
    dead = [0, 2, 5, 6]
    w[dead] = 0.0
    bias = RNG.standard_normal(8).astype(np.float32)
    bias[dead] = 0.0
    scale, mean = RNG.uniform(0.5, 2, 8).astype(np.float32), RNG.standard_normal(8).astype(np.float32)
    shift, var = RNG.standard_normal(8).astype(np.float32), RNG.uniform(0.5, 2, 8).astype(np.float32)
    mean[dead], shift[dead] = 0.0, 0.0  # BN(0) = 0 on dead channels
    fc = RNG.standard_normal((10, 32)).astype(np.float32)
    nodes = [
        node("Conv", ["x", "W", "Bc"], ["c"], pads=[1, 1, 1, 1]),
        node("BatchNormalization", ["c", "S", "Sh", "M", "V"], ["bn"]),
        node("Relu", ["bn"], ["r"]),
        node("MaxPool", ["r"], ["p"], kernel_shape=[2, 2], strides=[2, 2]),
        node("Flatten", ["p"], ["f"]),
        node("Gemm", ["f", "FC"], ["y"], transB=1),
    ]
    inits = {"W": w, "Bc": bias, "S": scale, "Sh": shift, "M": mean, "V": var, "FC": fc}
    model = make_model(nodes, inits, [tensor("x", ["n", 1, 4, 4])], [tensor("y", ["n", 10])])
    result = _prune(model)
    got = _inits(result.model)
    assert got["W"].shape == (4, 1, 3, 3) and got["S"].shape == (4,) and got["FC"].shape == (10, 16)
    check_contract(result.model)
    x = RNG.standard_normal((3, 1, 4, 4)).astype(np.float32)
    np.testing.assert_allclose(run(result.model, {"x": x})[0], run(model, {"x": x})[0], rtol=1e-5, atol=1e-5)


def test_decomposed_gelu_ffn_is_pruned_but_its_residual_output_is_not():
    w1, b1 = RNG.standard_normal((8, 16)).astype(np.float32), RNG.standard_normal(16).astype(np.float32)
    dead = list(range(0, 16, 2))
    w1[:, dead], b1[dead] = 0.0, 0.0  # gelu(0) = 0
    w2 = RNG.standard_normal((16, 8)).astype(np.float32)
    consts = {"W1": w1, "B1": b1, "W2": w2, "sqrt2": np.array(1.4142135, np.float32), "one": np.array(1.0, np.float32), "half": np.array(0.5, np.float32)}
    nodes = [
        node("MatMul", ["x", "W1"], ["h"]), node("Add", ["h", "B1"], ["hb"]), node("Div", ["hb", "sqrt2"], ["d"]),
        node("Erf", ["d"], ["e"]), node("Add", ["e", "one"], ["e1"]), node("Mul", ["hb", "e1"], ["m"]),
        node("Mul", ["m", "half"], ["g"]), node("MatMul", ["g", "W2"], ["o"]), node("Add", ["o", "x"], ["y"]),
    ]
    model = make_model(nodes, consts, [tensor("x", ["b", "s", 8])], [tensor("y", ["b", "s", 8])])
    result = _prune(model)
    got = _inits(result.model)
    assert got["W1"].shape == (8, 8) and got["B1"].shape == (8,) and got["W2"].shape == (8, 8)
    assert list(result.stats["layers"]) == ["h"] and "o" in result.stats["skipped"]
    x = RNG.standard_normal((2, 3, 8)).astype(np.float32)
    np.testing.assert_allclose(run(result.model, {"x": x})[0], run(model, {"x": x})[0], rtol=1e-5, atol=1e-5)


def test_digits_cnn_half_the_channels(digits_onnx):
    model = load(digits_onnx)
    result = _prune(model, multiple_of=1)
    layers = result.stats["layers"]
    assert len(layers) == 4 and all("→" in v for v in layers.values())  # 3 convs + hidden Gemm; logits Gemm kept
    # conv 1→8, 8→16, 16→32 (3x3 + bias), Gemm 32·4→64 (+bias), Gemm 64→10 (+bias), reshape shape (2)
    expected = (8 * 9 + 8) + (16 * 8 * 9 + 16) + (32 * 16 * 9 + 32) + (64 * 128 + 64) + (10 * 64 + 10) + 2
    assert model_stats(result.model)["params"] == expected
    assert expected / model_stats(model)["params"] < 0.27
    check_contract(result.model)
    assert top1(result.model) > 0.5  # one-shot, no fine-tuning: it drops (0.986 → 0.79); the budget form bounds it


def test_digits_default_widths_are_blocks_that_fit_the_layer(digits_onnx):
    result = PruneStructured(PruneStructured.Config(sparsity=0.5))(load(digits_onnx))
    shapes = {k: [int(x) for x in v.split()[0].split("→")] for k, v in result.stats["layers"].items()}
    # 16 multiple_of by default; a layer under 64 channels rounds to channels // 4 (16 → 4, 32 → 8)
    assert sorted(shapes.values()) == [[16, 8], [32, 16], [64, 32], [128, 64]]
    assert all(kept % min(16, width // 4) == 0 for width, kept in shapes.values())


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    import torch
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
    module = BertModel(config).eval()
    path = tmp_path_factory.mktemp("bert") / "bert.onnx"
    ids = torch.randint(0, 100, (2, 6))
    torch.onnx.export(module, (ids, torch.ones_like(ids)), str(path), dynamo=True, input_names=["input_ids", "attention_mask"],
                      output_names=["last_hidden_state", "pooler_output"], external_data=False,
                      dynamic_shapes=({0: torch.export.Dim("b"), 1: torch.export.Dim("s")},) * 2)
    return load(path)


def test_tiny_bert_ffn_neurons_only(tiny_bert):
    result = _prune(tiny_bert)
    assert sorted(result.stats["layers"].values()) == ["64→32 " + v.split(" ", 1)[1] for v in sorted(result.stats["layers"].values())]
    assert len(result.stats["layers"]) == 2  # one FFN per layer; attention and residual outputs untouched
    assert any("LayerNormalization" in why or "residual" in why for why in result.stats["skipped"].values())
    check_contract(result.model)
    ids = RNG.integers(0, 100, (2, 9)).astype(np.int64)
    out = run(result.model, {"input_ids": ids, "attention_mask": np.ones_like(ids)})
    assert out[0].shape == (2, 9, 32) and np.isfinite(out[0]).all()
    before, after = model_stats(tiny_bert)["params"], model_stats(result.model)["params"]
    # per layer: half of W1 and of W2; the two (zero, so deduplicated by the exporter) intermediate
    # biases of 64 were one shared tensor and are now two private halves: no net change there
    assert before - after == 2 * (32 * 32 + 32 * 32)


def _constant_neuron_mlp() -> ir.Model:
    w1 = RNG.standard_normal((6, 4)).astype(np.float32) * 3
    b1 = np.zeros(4, np.float32)
    w1[:, 0], b1[0] = 0.0, 2.0  # neuron 0 always outputs relu(2) = 2: prunable with its mean folded into b2
    w2 = RNG.standard_normal((4, 3)).astype(np.float32)
    w2[0] *= 0.05
    b2 = RNG.standard_normal(3).astype(np.float32)
    nodes = [node("MatMul", ["x", "W1"], ["h"]), node("Add", ["h", "B1"], ["hb"]), node("Relu", ["hb"], ["r"]),
             node("MatMul", ["r", "W2"], ["o"]), node("Add", ["o", "B2"], ["y"])]
    return make_model(nodes, {"W1": w1, "B1": b1, "W2": w2, "B2": b2}, [tensor("x", ["n", 6])], [tensor("y", ["n", 3])])


def test_activation_criterion_compensates_the_mean_of_pruned_neurons(tmp_path):
    model = _constant_neuron_mlp()
    x = RNG.standard_normal((64, 6)).astype(np.float32)
    context = PassContext(workdir=tmp_path, calibration=lambda: iter([{"x": x}]))
    config = {"sparsity": 0.25, "multiple_of": 1, "criterion": "activation"}
    result = PruneStructured(PruneStructured.Config(**config), context)(model)
    assert result.stats["layers"] == {"h": "4→3 (o)"}
    np.testing.assert_allclose(run(result.model, {"x": x})[0], run(model, {"x": x})[0], rtol=1e-5, atol=1e-5)
    plain = PruneStructured(PruneStructured.Config(**config, compensate=False), context)(model)
    assert np.abs(run(plain.model, {"x": x})[0] - run(model, {"x": x})[0]).max() > 0.05  # what compensation fixed


def test_activation_criterion_needs_calibration(tmp_path):
    with pytest.raises(BadInput, match="calibration"):
        PruneStructured(PruneStructured.Config(criterion="activation"), PassContext(workdir=tmp_path))(_constant_neuron_mlp())


def test_activation_criterion_on_digits(digits_onnx, tmp_path):
    context = PassContext(workdir=tmp_path, calibration=lambda: iter([{"image": digits_train(128)}]))
    model = load(digits_onnx)
    pruned = PruneStructured(PruneStructured.Config(sparsity=0.25, multiple_of=1, criterion="activation"), context)(model)
    check_contract(pruned.model)
    assert model_stats(pruned.model)["params"] < 0.6 * model_stats(model)["params"]
    assert top1(pruned.model) >= top1(model) - 0.03  # L1 ranking loses 0.04 here


def test_bias_behind_an_identity_is_still_a_constant():
    """TorchScript exports equal biases once and feeds the copies through Identity nodes."""
    model = _mlp([0, 2, 4, 6, 8, 10, 12, 14])
    proto = ir.to_proto(model)
    add = next(n for n in proto.graph.node if n.op_type == "Add")
    add.input[1] = "B1_shared"
    proto.graph.node.insert(0, node("Identity", ["B1"], ["B1_shared"]))
    shared = ir.from_proto(proto)
    result = _prune(shared)
    assert result.stats["layers"] == {"h": "16→8 (y)"}
    x = RNG.standard_normal((4, 8)).astype(np.float32)
    np.testing.assert_allclose(run(result.model, {"x": x})[0], run(shared, {"x": x})[0], rtol=1e-5, atol=1e-6)


def test_mobilenet_block_prunes_through_the_depthwise_conv():
    """pointwise (1x1) → Relu → depthwise 3x3 (group = channels) → Relu → pointwise: channels pass through."""
    pw1 = RNG.standard_normal((8, 4, 1, 1)).astype(np.float32)
    dead = [1, 2, 5, 7]
    pw1[dead] = 0.0
    dw = RNG.standard_normal((8, 1, 3, 3)).astype(np.float32)
    dwb = RNG.standard_normal(8).astype(np.float32)
    dwb[dead] = -1.0  # relu(0 * w - 1) = 0: dead channels stay dead through the depthwise conv
    pw2 = RNG.standard_normal((6, 8, 1, 1)).astype(np.float32)
    nodes = [
        node("Conv", ["x", "PW1"], ["a"]), node("Relu", ["a"], ["ar"]),
        node("Conv", ["ar", "DW", "DWB"], ["d"], group=8, pads=[1, 1, 1, 1]), node("Relu", ["d"], ["dr"]),
        node("Conv", ["dr", "PW2"], ["y"]),
    ]
    model = make_model(nodes, {"PW1": pw1, "DW": dw, "DWB": dwb, "PW2": pw2}, [tensor("x", ["n", 4, 5, 5])], [tensor("y", ["n", 6, 5, 5])])
    result = _prune(model)
    got = _inits(result.model)
    assert got["PW1"].shape == (4, 4, 1, 1) and got["DW"].shape == (4, 1, 3, 3) and got["PW2"].shape == (6, 4, 1, 1)
    depthwise = next(n for n in result.model.graph if n.name == "d")
    assert depthwise.attributes["group"].as_int() == 4
    assert "d" in result.stats["skipped"]  # the depthwise conv is not a producer of its own
    check_contract(result.model)
    x = RNG.standard_normal((2, 4, 5, 5)).astype(np.float32)
    np.testing.assert_allclose(run(result.model, {"x": x})[0], run(model, {"x": x})[0], rtol=1e-5, atol=1e-5)
