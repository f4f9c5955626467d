"""share.dedupe and share.cluster on inline graphs, a torch tied embedding, and the digits CNN."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
import torch
from passes_util import check_contract, run, same, top1
from torch import nn

from edgepipe.passes import PASSES
from edgepipe.passes.base import load
from edgepipe.passes.share import ShareCluster, ShareDedupe, kmeans_1d

RNG = np.random.default_rng(0)


def _graph(nodes: list, inits: dict[str, np.ndarray], inputs: list, outputs: list) -> ir.Model:
    graph = onnx.helper.make_graph(nodes, "g", inputs, outputs, [onnx.numpy_helper.from_array(v, k) for k, v in inits.items()])
    return ir.from_proto(onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)]))


def _tensor(name: str, elem: int, shape: list) -> onnx.ValueInfoProto:
    return onnx.helper.make_tensor_value_info(name, elem, shape)


F, I64 = onnx.TensorProto.FLOAT, onnx.TensorProto.INT64


def _tied(gemm: bool = False) -> ir.Model:
    """Gather(W[50,16]) then a projection by a separately stored W.T (MatMul) or W (Gemm transB=0 on W.T)."""
    w = RNG.standard_normal((50, 16)).astype(np.float32)
    dup = np.ascontiguousarray(w.T)
    proj = onnx.helper.make_node("Gemm", ["h2", "WT"], ["y"]) if gemm else onnx.helper.make_node("MatMul", ["h", "WT"], ["y"])
    nodes = [onnx.helper.make_node("Gather", ["W", "ids"], ["h"])]
    if gemm:
        nodes.append(onnx.helper.make_node("Reshape", ["h", "shape"], ["h2"]))
    nodes.append(proj)
    inits = {"W": w, "WT": dup, "shape": np.array([-1, 16], np.int64)}
    return _graph(nodes, inits, [_tensor("ids", I64, ["b", 5])], [_tensor("y", F, ["n", 50] if gemm else ["b", 5, 50])])


def test_exact_duplicates_of_large_weights_are_stored_once():
    w = RNG.standard_normal((64, 64)).astype(np.float32)  # 4096 elements: above onnx-ir's default size limit
    nodes = [onnx.helper.make_node("MatMul", ["x", "A"], ["h"]), onnx.helper.make_node("MatMul", ["h", "B"], ["y"])]
    model = _graph(nodes, {"A": w, "B": w.copy()}, [_tensor("x", F, [2, 64])], [_tensor("y", F, [2, 64])])
    result = ShareDedupe()(model)
    assert result.modified and result.stats["merged"] == 1 and result.stats["bytes_saved"] == w.nbytes
    assert len(result.model.graph.initializers) == 1
    check_contract(result.model)
    x = RNG.standard_normal((2, 64)).astype(np.float32)
    np.testing.assert_allclose(run(result.model, {"x": x})[0], run(model, {"x": x})[0], rtol=1e-6)
    assert len(model.graph.initializers) == 2  # the input model is untouched


def test_transposed_copy_becomes_a_transpose_and_is_idempotent():
    model = _tied()
    result = ShareDedupe()(model)
    assert result.stats["transposed_merged"] == 1 and result.stats["bytes_saved"] == 50 * 16 * 4
    assert list(result.model.graph.initializers) == ["W", "shape"]
    assert [n.op_type for n in result.model.graph].count("Transpose") == 1
    check_contract(result.model)
    ids = RNG.integers(0, 50, (3, 5)).astype(np.int64)
    np.testing.assert_array_equal(run(result.model, {"ids": ids})[0], run(model, {"ids": ids})[0])
    again = ShareDedupe()(result.model)
    assert not again.modified and same(again.model, result.model)


def test_transposed_copy_feeding_gemm_flips_trans_b_without_a_transpose():
    model = _tied(gemm=True)
    result = ShareDedupe()(model)
    ops = [n.op_type for n in result.model.graph]
    assert "Transpose" not in ops and result.stats["transposed_merged"] == 1
    gemm = next(n for n in result.model.graph if n.op_type == "Gemm")
    assert gemm.inputs[1].name == "W" and gemm.attributes["transB"].as_int() == 1
    ids = RNG.integers(0, 50, (2, 5)).astype(np.int64)
    np.testing.assert_allclose(run(result.model, {"ids": ids})[0], run(model, {"ids": ids})[0], rtol=1e-6)


class TiedLM(nn.Module):
    def __init__(self, vocab: int = 200, dim: int = 32) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.mid = nn.Linear(dim, dim)
        self.out = nn.Linear(dim, vocab, bias=False)
        self.out.weight = self.emb.weight  # tied

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(self.mid(self.emb(ids))))


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_torchscript_tied_embedding_is_stored_once(tmp_path):
    torch.manual_seed(0)
    module = TiedLM().eval()
    path = tmp_path / "tied.onnx"
    ids = torch.randint(0, 200, (2, 7))
    torch.onnx.export(module, (ids,), str(path), dynamo=False, input_names=["ids"], output_names=["logits"], dynamic_axes={"ids": {0: "b", 1: "s"}})
    model = load(path)
    shapes = sorted(tuple(v.const_value.shape) for v in model.graph.initializers.values())
    assert (32, 200) in shapes and (200, 32) in shapes  # the exporter really wrote it twice
    result = PASSES["share.dedupe"]()(model)
    assert result.stats["bytes_saved"] == 200 * 32 * 4
    after = sorted(tuple(v.const_value.shape) for v in result.model.graph.initializers.values())
    assert (32, 200) not in after and (200, 32) in after
    check_contract(result.model)
    with torch.no_grad():
        expected = module(ids).numpy()
    np.testing.assert_allclose(run(result.model, {"ids": ids.numpy()})[0], expected, rtol=1e-4, atol=1e-5)


def test_kmeans_1d_finds_the_clusters():
    x = np.concatenate([RNG.normal(c, 0.01, 500) for c in (-1.0, 0.0, 2.0)])
    book, idx = kmeans_1d(x, 3, 30)
    np.testing.assert_allclose(book, [-1.0, 0.0, 2.0], atol=0.01)
    assert np.abs(book[idx] - x).max() < 0.1


def test_cluster_palettizes_large_weights_only_and_runs():
    big = RNG.standard_normal((128, 64)).astype(np.float32)
    small = RNG.standard_normal((64, 8)).astype(np.float32)
    nodes = [onnx.helper.make_node("MatMul", ["x", "Big"], ["h"]), onnx.helper.make_node("MatMul", ["h", "Small"], ["y"])]
    model = _graph(nodes, {"Big": big, "Small": small}, [_tensor("x", F, [4, 128])], [_tensor("y", F, [4, 8])])
    result = ShareCluster(ShareCluster.Config(bits=4, min_elements=4096))(model)
    assert list(result.stats["layers"]) == ["Big"]
    assert result.stats["bytes_after"] < big.nbytes / 3  # uint8 indices + 16 floats instead of float32
    assert 0 < result.stats["layers"]["Big"]["rel_error"] < 0.15
    check_contract(result.model)
    x = RNG.standard_normal((4, 128)).astype(np.float32)
    got = run(result.model, {"x": x})[0]
    palette = np.sort(next(v for k, v in result.model.graph.initializers.items() if k.endswith("__palette")).const_value.numpy())
    assert len(palette) == 16
    ref = run(model, {"x": x})[0]
    assert np.linalg.norm(got - ref) / np.linalg.norm(ref) < 0.2
    again = ShareCluster(ShareCluster.Config(bits=4, min_elements=4096))(result.model)
    assert not again.modified and same(again.model, result.model)


def test_dedupe_and_cluster_on_digits(digits_onnx):
    model = load(digits_onnx)
    assert not ShareDedupe()(model).modified  # nothing is shared in this CNN
    clustered = ShareCluster(ShareCluster.Config(bits=6, min_elements=4096))(model)
    assert clustered.stats["tensors"] == 3  # both big convs and the 256x128 Gemm
    assert clustered.stats["bytes_after"] < 0.4 * clustered.stats["bytes_before"]
    check_contract(clustered.model)
    assert top1(clustered.model) >= top1(model) - 0.01
