"""quantize.auto's per-node sensitivity ranking fanned out as Ray tasks: same scores, really remote."""

from __future__ import annotations

import os
import pickle
import socket

import numpy as np
import pytest
from conftest import DIGITS

from edgepipe.core.fanout import ProcessMap, RayMap, local_map
from edgepipe.core.runtime import Runner, run_batches
from edgepipe.passes import PASSES, PassContext, create
from edgepipe.passes.autoquant import quantized_nodes, sensitivity
from edgepipe.passes.base import load
from edgepipe.pipeline.evaluator import Evaluator
from edgepipe.recipe import AccuracySpec
from edgepipe.sources.accuracy import BUILTIN, Metric
from edgepipe.sources.data import eval_batches


@pytest.fixture(scope="module")
def ray_local():
    import ray

    os.environ["EDGEPIPE_FANOUT_MIN_SECONDS"] = "0"  # fan out even the digits model's millisecond runs
    # Ray runs its workers at nice 15: beside another test worker (`make test`) they would get almost no CPU.
    os.environ["RAY_worker_niceness"] = "0"
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        yield ray
    finally:
        ray.shutdown()
        os.environ.pop("EDGEPIPE_FANOUT_MIN_SECONDS", None)
        os.environ.pop("RAY_worker_niceness", None)


@pytest.fixture(scope="module")
def digits_pair(digits_onnx, tmp_path_factory):
    """The float digits model, its dynamic int8 form and an evaluator (cosine to the float outputs, a tight budget)."""
    work = tmp_path_factory.mktemp("sens")
    float_model = load(digits_onnx)
    quantized = PASSES["quantize.dynamic"]()(float_model).model
    batches = eval_batches("data.py:evaluation", DIGITS)
    reference = run_batches(Runner(digits_onnx), batches)
    labels = np.concatenate([y for _, y in batches])
    spec = AccuracySpec(metric="cosine", min_value=0.999999)
    evaluate = Evaluator(spec, BUILTIN["cosine"], batches, reference, labels, ["CPUExecutionProvider"], work / "candidates")
    return float_model, quantized, evaluate, work


def test_ranking_on_ray_equals_the_loop_bit_for_bit(ray_local, digits_pair):
    import onnx_ir as ir

    float_model, quantized, evaluate, work = digits_pair
    fproto, qproto = ir.to_proto(float_model), ir.to_proto(quantized)
    names = [n.name for n in quantized_nodes(fproto, qproto)]
    assert len(names) >= 3
    here, none = sensitivity(qproto, fproto, names, evaluate, 100, local_map, run_seconds=1.0)
    assert none is None
    mapper = RayMap()
    assert mapper.width == 2
    there, fanout = sensitivity(qproto, fproto, names, evaluate, 100, mapper, run_seconds=1.0)
    assert there == here  # every float equal, in node order
    assert fanout["tasks"] == 2 and len(set(fanout["workers"])) == 2
    assert f"{socket.gethostname()}:{os.getpid()}" not in fanout["workers"]  # both chunks ran in Ray workers
    # a custom metric (a user's function) can't travel: the loop runs here
    custom = Evaluator(evaluate.spec, Metric("mine", lambda c, r, y: 1.0), evaluate.batches, evaluate.reference,
                       evaluate.labels, evaluate.providers)
    assert sensitivity(qproto, fproto, names, custom, 100, mapper, run_seconds=1.0) == ([1.0] * len(names), None)
    # too little work for a task (the default threshold, 2 s): the loop too
    os.environ["EDGEPIPE_FANOUT_MIN_SECONDS"] = "2"
    try:
        assert sensitivity(qproto, fproto, names, evaluate, 100, mapper, run_seconds=0.01)[1] is None
    finally:
        os.environ["EDGEPIPE_FANOUT_MIN_SECONDS"] = "0"
    # what a task gets (the first 100+ samples, one ORT thread) pickles with plain pickle too (a process pool)
    shipped = pickle.loads(pickle.dumps(evaluate.portable(100)))
    assert shipped.threads == 1 and len(shipped.labels) == len(next(iter(shipped.reference.values()))) >= 100


def test_quantize_auto_on_ray_ranks_and_keeps_the_same_nodes(ray_local, digits_pair):
    float_model, _, evaluate, work = digits_pair
    accept = lambda s: s >= 0.999999  # noqa: E731 - the spec's min_value on the signed score (cosine: sign +1)
    calls = []

    class Counting(RayMap):
        def __call__(self, fn, items):
            calls.append([len(chunk) for chunk in items])
            return super().__call__(fn, items)

    results = {}
    for label, mapper in (("local", local_map), ("ray", Counting())):
        ctx = PassContext(workdir=work / label, evaluate=evaluate, accept=accept, map=mapper)
        auto = create({"name": "quantize.auto", "method": "dynamic", "search": "stepwise", "max_float": 1.0, "sensitivity_samples": 100}, ctx)
        results[label] = auto(float_model).stats
    local, ray = results["local"], results["ray"]
    assert local["initial_metric"] < 0.999999  # the budget broke: the ranking ran
    assert ray["sensitivity"] == local["sensitivity"] and ray["kept_float"] == local["kept_float"]
    assert ray["steps"] == local["steps"] and ray["final_metric"] == local["final_metric"]
    assert len(calls) == 1 and len(calls[0]) == 2 and sum(calls[0]) == len(local["sensitivity"])  # 2 chunks on Ray
    assert ray == local or {k for k in ray if ray[k] != local[k]} == {"search_seconds"}  # the same stats, timing aside


def test_process_map_gives_the_same_scores(digits_pair, monkeypatch):
    import onnx_ir as ir

    monkeypatch.setenv("EDGEPIPE_FANOUT_MIN_SECONDS", "0")
    float_model, quantized, evaluate, _ = digits_pair
    fproto, qproto = ir.to_proto(float_model), ir.to_proto(quantized)
    names = [n.name for n in quantized_nodes(fproto, qproto)]
    here, _ = sensitivity(qproto, fproto, names, evaluate, 50, local_map, run_seconds=1.0)
    there, fanout = sensitivity(qproto, fproto, names, evaluate, 50, ProcessMap(2), run_seconds=1.0)
    assert there == here and fanout["tasks"] == 2 and f"{socket.gethostname()}:{os.getpid()}" not in fanout["workers"]
