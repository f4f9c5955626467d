"""Recovery after prune.structured: the ONNX graph fine-tuned in torch against the unpruned model."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from passes_util import make_model, node, run, tensor
from test_prune_cnn import ConcatBlock, InvertedResidual, MiniResNet, _export

from edgepipe.core.errors import BadInput
from edgepipe.passes import PassContext
from edgepipe.passes.prune_recover import OnnxModule
from edgepipe.passes.prune_structured import PruneStructured

RNG = np.random.default_rng(5)


def _images(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 3, 16, 16)).astype(np.float32)


def _cos(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.reshape(len(a), -1), b.reshape(len(b), -1)
    return float(np.mean((a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)))


@pytest.mark.parametrize("module", [MiniResNet, ConcatBlock, InvertedResidual])
def test_the_interpreter_matches_onnxruntime(module, tmp_path):
    torch.manual_seed(0)
    model = _export(module(), tmp_path / "m.onnx")
    x = _images(3, 1)
    with torch.no_grad():
        got = OnnxModule(model)(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(got, run(model, {"x": x})[0], rtol=1e-4, atol=1e-5)


def test_recovery_brings_the_pruned_model_back_toward_the_unpruned_one(tmp_path):
    torch.manual_seed(0)
    model = _export(MiniResNet(), tmp_path / "m.onnx")
    context = PassContext(workdir=tmp_path, calibration=lambda: ({"x": _images(32, s)} for s in range(2)))
    config = {"sparsity": 0.5, "recover_loss": "cosine", "recover_lr": 3e-3, "recover_batch_size": 16}
    one_shot = PruneStructured(PruneStructured.Config(**config), context)(model).model
    result = PruneStructured(PruneStructured.Config(**config, recover_epochs=4), context)(model)
    held_out = _images(32, 99)  # not in the calibration data
    reference = run(model, {"x": held_out})[0]
    before, after = _cos(run(one_shot, {"x": held_out})[0], reference), _cos(run(result.model, {"x": held_out})[0], reference)
    assert after > before + 0.02, (before, after)
    assert result.stats["recover"]["calibration_cosine"]["after"] > result.stats["recover"]["calibration_cosine"]["before"]
    assert [v.const_value.shape for v in result.model.graph.initializers.values()] == [
        v.const_value.shape for v in one_shot.graph.initializers.values()]  # same pruned graph, new weights


def test_recovery_needs_calibration_and_supported_ops(tmp_path):
    with pytest.raises(BadInput, match="calibration"):
        PruneStructured(PruneStructured.Config(sparsity=0.5, recover_epochs=1, multiple_of=1),
                        PassContext(workdir=tmp_path))(_mlp_with("Relu"))
    context = PassContext(workdir=tmp_path, calibration=lambda: iter([{"x": RNG.standard_normal((4, 8)).astype(np.float32)}]))
    with pytest.raises(BadInput, match="Softsign"):
        PruneStructured(PruneStructured.Config(sparsity=0.5, recover_epochs=1, multiple_of=1), context)(_mlp_with("Softsign"))


def _mlp_with(activation: str):
    w1, w2 = RNG.standard_normal((8, 16)).astype(np.float32), RNG.standard_normal((16, 4)).astype(np.float32)
    nodes = [node("MatMul", ["x", "W1"], ["h"]), node(activation, ["h"], ["r"]), node("MatMul", ["r", "W2"], ["y"])]
    return make_model(nodes, {"W1": w1, "W2": w2}, [tensor("x", ["n", 8])], [tensor("y", ["n", 4])])
