"""Recovery after prune.structured: the ONNX graph fine-tuned in torch against the unpruned model."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from passes_util import make_model, node, run, tensor
from sklearn.datasets import load_digits
from test_prune_cnn import ConcatBlock, InvertedResidual, MiniResNet, _export

from edgepipe.core.errors import BadInput
from edgepipe.passes import PassContext
from edgepipe.passes.prune_adapt import channel_stats
from edgepipe.passes.prune_finetune import augment
from edgepipe.passes.prune_recover import OnnxModule
from edgepipe.passes.prune_structured import PruneStructured, prune_structured

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


@pytest.fixture(scope="module")
def digits_resnet(tmp_path_factory):
    """MiniResNet trained on scikit-learn's digits (16x16, 3 channels): learned weights, real images.

    Images 0-1199 train it (the first 256 are the calibration data), 1200-1796 are held out."""
    x = torch.from_numpy(load_digits().images.astype(np.float32) / 16.0)[:, None]
    x = (torch.nn.functional.interpolate(x, size=16, mode="bilinear").repeat(1, 3, 1, 1) - 0.3) / 0.4
    y = torch.from_numpy(load_digits().target)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    module = MiniResNet()
    opt = torch.optim.Adam(module.parameters(), lr=3e-3)
    for _ in range(3):
        for idx in torch.randperm(1200).split(50):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(module.train()(x[idx]), y[idx]).backward()
            opt.step()
    torch.set_num_threads(threads)
    top1 = float((module.eval()(x[1200:]).argmax(1) == y[1200:]).float().mean())
    assert top1 > 0.8, top1  # a trained network, not a random function
    return _export(module, tmp_path_factory.mktemp("digits-resnet") / "m.onnx"), x.numpy()


def _pruned(model, images, tmp_path, **config):
    context = PassContext(workdir=tmp_path, calibration=lambda: ({"x": images[i:i + 64]} for i in range(0, 256, 64)))
    return PruneStructured(PruneStructured.Config(sparsity=0.5, **config), context)(model)


def test_statistics_re_estimation_restores_the_channels_the_cut_shifted(digits_resnet, tmp_path):
    model, images = digits_resnet
    held_out = images[1200:]
    reference = run(model, {"x": held_out})[0]
    one_shot = _pruned(model, images, tmp_path, recover_adapt=False).model
    result = _pruned(model, images, tmp_path)  # the default: re-estimated (no fine-tuning)
    before, after = _cos(run(one_shot, {"x": held_out})[0], reference), _cos(run(result.model, {"x": held_out})[0], reference)
    assert after > before + 0.1, (before, after)
    # the residual stream after the first block: per kept channel, mean and spread back to the unpruned model's
    kept: dict = {}
    prune_structured(model, 0.5, PruneStructured.Config(sparsity=0.5), kept=kept)
    add = next(n.outputs[0].name for n in result.model.graph if n.op_type == "Add")
    axis, channels = kept[add]
    x = torch.from_numpy(held_out)

    def shift(pruned) -> float:
        with torch.no_grad():
            t = OnnxModule(model).run([x], keep=[add])[add].index_select(axis, torch.from_numpy(channels))
            s = OnnxModule(pruned).run([x], keep=[add])[add]
        (tm, ts), (sm, _) = channel_stats(t, axis), channel_stats(s, axis)
        return float(((sm - tm).abs() / ts).mean())

    assert shift(result.model) < 0.1 < shift(one_shot), (shift(result.model), shift(one_shot))
    assert [v.const_value.shape for v in result.model.graph.initializers.values()] == [
        v.const_value.shape for v in one_shot.graph.initializers.values()]  # same pruned graph, new weights


def test_fine_tuning_recovers_more_than_re_estimation_on_held_out_digits(digits_resnet, tmp_path):
    model, images = digits_resnet
    held_out = images[1200:]
    reference = run(model, {"x": held_out})[0]
    adapted = _pruned(model, images, tmp_path).model
    result = _pruned(model, images, tmp_path, recover_epochs=6, recover_lr=3e-3)
    before, after = _cos(run(adapted, {"x": held_out})[0], reference), _cos(run(result.model, {"x": held_out})[0], reference)
    assert after > before + 0.1, (before, after)
    stats = result.stats["recover"]
    assert stats["held_out"] == 32 and stats["features"] >= 2  # early stopping on 1 in 8, block outputs matched


def test_augmented_images_are_shifted_copies():
    x = torch.arange(2 * 3 * 16 * 16, dtype=torch.float32).reshape(2, 3, 16, 16)
    ids = torch.arange(4)
    [out, same] = augment([x, ids], torch.Generator().manual_seed(0))
    assert out.shape == x.shape and not torch.equal(out, x) and torch.equal(same, ids)
    for image, source in zip(out, x, strict=True):  # the middle of each image is the source shifted by at most 2 pixels each way
        found = [(dy, dx) for dy in range(-2, 3) for dx in range(-2, 3)
                 if torch.equal(image[:, 4:12, 4:12], source[:, 4 + dy:12 + dy, 4 + dx:12 + dx])]
        assert len(found) == 1, found


def test_recovery_needs_calibration_and_supported_ops(tmp_path):
    with pytest.raises(BadInput, match="calibration"):
        PruneStructured(PruneStructured.Config(sparsity=0.5, recover_epochs=1, multiple_of=1),
                        PassContext(workdir=tmp_path))(_mlp_with("Relu"))
    context = PassContext(workdir=tmp_path, calibration=lambda: iter([{"x": RNG.standard_normal((4, 8)).astype(np.float32)}]))
    with pytest.raises(BadInput, match="Softsign"):
        PruneStructured(PruneStructured.Config(sparsity=0.5, recover_epochs=1, multiple_of=1), context)(_mlp_with("Softsign"))
    # without recover_epochs the re-estimation is a default extra: the plain cut ships, with the reason
    result = PruneStructured(PruneStructured.Config(sparsity=0.5, multiple_of=1), context)(_mlp_with("Softsign"))
    assert result.model.graph.initializers["W1"].const_value.shape == (8, 8)
    assert run(result.model, {"x": RNG.standard_normal((4, 8)).astype(np.float32)})[0].shape == (4, 4)


def _mlp_with(activation: str):
    w1, w2 = RNG.standard_normal((8, 16)).astype(np.float32), RNG.standard_normal((16, 4)).astype(np.float32)
    nodes = [node("MatMul", ["x", "W1"], ["h"]), node(activation, ["h"], ["r"]), node("MatMul", ["r", "W2"], ["y"])]
    return make_model(nodes, {"W1": w1, "W2": w2}, [tensor("x", ["n", 8])], [tensor("y", ["n", 4])])
