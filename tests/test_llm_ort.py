"""edgepipe.pipeline.decoder.ortlm (over runtime.OrtDecoder) on a tiny KV-cache decoder built inline: a cache that must grow token by token."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgepipe.core.errors import BadInput
from edgepipe.pipeline.decoder.ortlm import OrtCausalLM
from edgepipe.sources import llm_metrics as lm

V, D, LAYERS = 11, 4, 2


def cumulative_decoder(path: Path, head_dim: int | str = D) -> Path:
    """logits[t] = (sum of the embeddings of tokens 0..t, read from the cache) @ W: every past token counts."""
    rng = np.random.default_rng(1)
    inits = [numpy_helper.from_array(rng.normal(size=(V, D)).astype(np.float32), "E"),
             numpy_helper.from_array(rng.normal(size=(D, V)).astype(np.float32), "W"),
             numpy_helper.from_array(np.array([0, 1, -1, D], dtype=np.int64), "shape4"),
             numpy_helper.from_array(np.array([0, -1, D], dtype=np.int64), "shape3"),
             numpy_helper.from_array(np.array([2], dtype=np.int64), "axis2"),
             numpy_helper.from_array(np.array(2, dtype=np.int64), "axis2s"),
             numpy_helper.from_array(np.array([1], dtype=np.int64), "axis1"),
             numpy_helper.from_array(np.array([np.iinfo(np.int64).max], dtype=np.int64), "end")]
    nodes = [helper.make_node("Gather", ["E", "input_ids"], ["x"]),
             helper.make_node("Reshape", ["x", "shape4"], ["x4"]),
             helper.make_node("Shape", ["input_ids"], ["ids_shape"]),
             helper.make_node("Gather", ["ids_shape", "axis1"], ["t"], axis=0),
             helper.make_node("Neg", ["t"], ["minus_t"])]
    total = None
    inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "sequence"]),
              helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "total"])]
    outputs = []
    for i in range(LAYERS):
        for kind in ("key", "value"):
            past, present = f"past_key_values.{i}.{kind}", f"present.{i}.{kind}"
            inputs.append(helper.make_tensor_value_info(past, TensorProto.FLOAT, ["batch", 1, "past", head_dim]))
            outputs.append(helper.make_tensor_value_info(present, TensorProto.FLOAT, ["batch", 1, "total", head_dim]))
            nodes.append(helper.make_node("Concat", [past, "x4"], [present], axis=2))
        total = f"present.{i}.key"
    nodes += [helper.make_node("CumSum", [total, "axis2s"], ["cum"]),
              helper.make_node("Slice", ["cum", "minus_t", "end", "axis2"], ["last"]),
              helper.make_node("Reshape", ["last", "shape3"], ["h"]),
              helper.make_node("MatMul", ["h", "W"], ["logits"])]
    outputs.insert(0, helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "sequence", V]))
    graph = helper.make_graph(nodes, "cumulative", inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    onnx.save(model, path)
    return path


def test_prefill_plus_cached_steps_equal_the_full_sequence(tmp_path: Path) -> None:
    model = OrtCausalLM(cumulative_decoder(tmp_path / "model.onnx"))
    ids = np.array([3, 1, 4, 1, 5, 9, 2, 6])
    full = model.logits(ids)
    assert full.shape == (len(ids), V)
    decoder = model.decoder()
    steps = [decoder.start(ids[:3])] + [decoder.step(int(t)) for t in ids[3:]]
    np.testing.assert_allclose(np.stack(steps), full[2:], rtol=1e-5, atol=1e-5)
    assert decoder.cache[("1", "value")].shape == (1, 1, len(ids), D)  # the cache grew by one per step
    assert lm.greedy(model.decoder(), ids[:2], 6).tolist() == lm.greedy(lm.RecomputeDecoder(model.logits), ids[:2], 6).tolist()


def test_symbolic_head_size_comes_from_genai_config(tmp_path: Path) -> None:
    path = cumulative_decoder(tmp_path / "model.onnx", head_dim="kv_cache_dim")
    with pytest.raises(BadInput, match="head size"):
        OrtCausalLM(path)
    (tmp_path / "genai_config.json").write_text(json.dumps({"model": {"decoder": {"head_size": D}}}))
    assert OrtCausalLM(path).logits(np.array([1, 2, 3])).shape == (3, V)


def test_a_model_without_a_kv_cache_interface_is_bad_input(tmp_path: Path) -> None:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])
    model = helper.make_model(helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g", [x], [y]),
                              opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(model, tmp_path / "m.onnx")
    with pytest.raises(BadInput, match="input_ids"):
        OrtCausalLM(tmp_path / "m.onnx")
