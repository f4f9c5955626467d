"""prune.magnitude and the budget search both prune passes share."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from passes_util import check_contract, make_model, node, run, same, tensor, top1

from edgepipe.core.errors import BadInput
from edgepipe.passes import PassContext
from edgepipe.passes.base import load, model_stats
from edgepipe.passes.prune import PruneMagnitude
from edgepipe.passes.prune_structured import PruneStructured

RNG = np.random.default_rng(2)


def _two_layers() -> ir.Model:
    w1 = RNG.standard_normal((32, 32)).astype(np.float32)
    w2 = (0.01 * RNG.standard_normal((32, 16))).astype(np.float32)  # much smaller: global pruning hits it first
    bias = RNG.standard_normal(32).astype(np.float32)
    nodes = [node("MatMul", ["x", "W1"], ["h"]), node("Add", ["h", "B"], ["hb"]), node("MatMul", ["hb", "W2"], ["y"])]
    return make_model(nodes, {"W1": w1, "B": bias, "W2": w2}, [tensor("x", ["n", 32])], [tensor("y", ["n", 16])])


def _weights(model: ir.Model) -> dict[str, np.ndarray]:
    return {k: v.const_value.numpy() for k, v in model.graph.initializers.items()}


def _magnitude(model, **kw):
    return PruneMagnitude(PruneMagnitude.Config(**kw))(model)


def test_per_tensor_zeroes_exactly_the_smallest_and_is_idempotent():
    model = _two_layers()
    result = _magnitude(model, sparsity=0.5)
    before, after = _weights(model), _weights(result.model)
    for name in ("W1", "W2"):
        assert np.count_nonzero(after[name] == 0) == before[name].size // 2
        kept = np.abs(before[name][after[name] != 0])
        assert kept.min() >= np.abs(before[name][after[name] == 0]).max()
    np.testing.assert_array_equal(after["B"], before["B"])  # biases are not pruned
    assert result.stats["achieved_sparsity"] == 0.5
    assert result.stats["zip_bytes_after"] < result.stats["zip_bytes_before"]
    assert "do not make ONNX Runtime" in result.stats["note"]
    check_contract(result.model)
    again = _magnitude(result.model, sparsity=0.5)
    assert not again.modified and same(again.model, result.model)


def test_global_scope_prunes_the_small_tensor_harder():
    result = _magnitude(_two_layers(), sparsity=0.5, scope="global")
    layers = result.stats["layers"]
    assert layers["W2"] > 0.99 and layers["W1"] < 0.5
    assert result.stats["achieved_sparsity"] == 0.5


def test_digits_half_sparse_keeps_accuracy(digits_onnx):
    model = load(digits_onnx)
    result = _magnitude(model, sparsity=0.5)
    assert result.stats["tensors"] == 4  # two big convs and both Gemms (the first conv has 144 weights < 256)
    assert model_stats(result.model)["sparsity"] > 0.45
    check_contract(result.model)
    assert top1(result.model) >= top1(model) - 0.01


def _sparsity_metric(model: ir.Model) -> float:
    """A fake evaluator: the metric falls as the weights lose L1 mass (monotone, like accuracy)."""
    return -float(sum(np.count_nonzero(v.const_value.numpy() == 0) for v in model.graph.initializers.values())) / 1536


def test_budget_search_finds_the_highest_sparsity_within_max_drop(tmp_path):
    context = PassContext(workdir=tmp_path, evaluate=_sparsity_metric)
    result = PruneMagnitude(PruneMagnitude.Config(max_drop=0.3, min_elements=16), context)(_two_layers())
    chosen = result.stats["chosen_sparsity"]
    assert 0.25 < chosen <= 0.3  # drop = sparsity here; bisection over [0, 0.9] with 5 steps lands within 0.03
    curve = result.stats["curve"]
    assert curve[0] == {"sparsity": 0.0, "metric": 0.0, "drop": 0.0} and len(curve) == 7
    assert all(row["drop"] <= 0.3 + 1e-9 for row in curve if row["sparsity"] <= chosen)
    assert result.stats["achieved_sparsity"] == pytest.approx(chosen, abs=0.01)
    again = PruneMagnitude(PruneMagnitude.Config(max_drop=0.3, min_elements=16), context)(result.model)
    assert not again.modified  # the model says it was already pruned to a budget


def test_budget_needs_an_evaluator(tmp_path):
    with pytest.raises(BadInput, match="needs evaluation data"):
        PruneStructured(PruneStructured.Config(max_drop=0.01), PassContext(workdir=tmp_path))(_two_layers())


def test_sparsity_and_max_drop_are_exclusive():
    with pytest.raises(ValueError, match="not both"):
        PruneStructured.Config(sparsity=0.5, max_drop=0.01)


def test_structured_budget_on_digits_with_real_accuracy(digits_onnx, tmp_path):
    model = load(digits_onnx)
    context = PassContext(workdir=tmp_path, evaluate=top1)
    result = PruneStructured(PruneStructured.Config(max_drop=0.02, search_steps=4), context)(model)
    stats = result.stats
    assert 0.0 < stats["chosen_sparsity"] < 0.5  # 50% costs 0.2 top-1, so the budget stops well before
    assert top1(result.model) >= stats["reference_metric"] - 0.02
    assert model_stats(result.model)["params"] < model_stats(model)["params"]
    assert any(row["drop"] > 0.02 for row in stats["curve"])  # the curve shows where it breaks
    x = np.zeros((1, 1, 8, 8), np.float32)
    assert run(result.model, {"image": x})[0].shape == (1, 10)


def test_recipe_errors_for_the_new_options_are_one_clear_line():
    from edgepipe.passes import validate_spec

    cases = {
        "pass prune.structured: give sparsity or max_drop, not both": {"name": "prune.structured", "sparsity": 0.5, "max_drop": 0.01},
        "pass prune.magnitude: sparsity: Input should be less than 1": {"name": "prune.magnitude", "sparsity": 1.5},
        "did you mean 'prune.structured'": {"name": "prune.structrued"},
        "pass share.cluster: unknown option 'bitz'; valid options: bits": {"name": "share.cluster", "bitz": 4},
    }
    for expected, spec in cases.items():
        with pytest.raises(ValueError, match=expected):
            validate_spec(spec)
