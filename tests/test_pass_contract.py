"""The pass contract (docs/passes.md), for every registered pass on the real digits CNN: the result passes
onnx.checker and loads in ORT, the input model is left unchanged, and a second run changes nothing."""

from __future__ import annotations

import onnx_ir as ir
import pytest
from passes_util import check_contract, digits_split, digits_train

from edgepipe.core.runtime import Runner, run_batches
from edgepipe.passes import PASSES, PassContext
from edgepipe.passes.base import load
from edgepipe.pipeline.evaluator import Evaluator
from edgepipe.recipe import AccuracySpec
from edgepipe.sources.accuracy import BUILTIN


def _fingerprint(model: ir.Model) -> bytes:
    return ir.to_proto(model).SerializeToString(deterministic=True)


def _context(tmp_path, source) -> PassContext:
    """Calibration data, a scorer on a small eval split and a budget: what budgeted passes get in a build."""
    images = digits_train(64)
    x, y = digits_split()
    batches = [({"image": x[i : i + 64]}, y[i : i + 64]) for i in range(0, 128, 64)]
    reference = run_batches(Runner(source), batches)
    evaluate = Evaluator(AccuracySpec(metric="top1", max_drop=0.02), BUILTIN["top1"], batches, reference, y[:128],
                         ["CPUExecutionProvider"], tmp_path / "eval")
    baseline = evaluate(load(source))
    return PassContext(workdir=tmp_path / "work", calibration=lambda: iter([{"image": images[:32]}, {"image": images[32:]}]),
                       evaluate=evaluate, accept=lambda score: score >= baseline - 0.02)


@pytest.mark.parametrize("name", sorted(PASSES))
def test_every_pass_keeps_the_contract(name, digits_onnx, tmp_path):
    model = load(digits_onnx)
    before = _fingerprint(model)
    context = _context(tmp_path, digits_onnx)
    p = PASSES[name](context=context)
    first = p(model)
    check_contract(first.model)
    assert _fingerprint(model) == before, f"{name} changed its input model"
    again = PASSES[name](context=context)(first.model)
    assert not again.modified or _fingerprint(again.model) == _fingerprint(first.model), f"{name} is not idempotent"
