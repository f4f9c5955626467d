"""quantize.int4, and quantize.static's option checks and attention-mask guard."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from passes_util import I64, check_contract, digits_train, make_model, node, run, same, tensor, top1

from edgepipe.passes import PassContext
from edgepipe.passes.base import load
from edgepipe.passes.float_guard import attention_mask_nodes
from edgepipe.passes.int4 import QuantizeInt4
from edgepipe.passes.quantize import QuantizeStatic

RNG = np.random.default_rng(3)


def _matmul_model() -> ir.Model:
    w = RNG.standard_normal((64, 32)).astype(np.float32)
    return make_model([node("MatMul", ["x", "W"], ["y"])], {"W": w}, [tensor("x", ["n", 64])], [tensor("y", ["n", 32])])


def test_int4_matmul_becomes_matmulnbits_runs_on_cpu_and_is_idempotent():
    model = _matmul_model()
    result = QuantizeInt4()(model)
    assert result.stats["MatMulNBits"] == 1 and [n.op_type for n in result.model.graph] == ["MatMulNBits"]
    check_contract(result.model)
    x = RNG.standard_normal((4, 64)).astype(np.float32)
    got, ref = run(result.model, {"x": x})[0], run(model, {"x": x})[0]
    assert np.linalg.norm(got - ref) / np.linalg.norm(ref) < 0.15  # 4-bit weights, blocks of 32
    again = QuantizeInt4()(result.model)
    assert not again.modified and same(again.model, result.model)


def test_int4_block_size_must_be_a_power_of_two():
    with pytest.raises(ValueError, match="power of two"):
        QuantizeInt4.Config(block_size=48)


def test_int4_on_digits_rewrites_gemms_and_keeps_top1(digits_onnx):
    model = load(digits_onnx)
    result = QuantizeInt4()(model)
    assert result.stats["gemm_rewritten"] == 2 and result.stats["MatMulNBits"] == 2
    assert [v.name for v in result.model.graph.outputs] == ["logits"]
    check_contract(result.model)
    assert top1(result.model) >= top1(model) - 0.01


def _calibration():
    x = digits_train(64)
    return lambda: iter([{"image": x}])


def _qdq_weights(model: ir.Model) -> set[str]:
    """Names of nodes whose weight input (input 1) comes through a DequantizeLinear."""
    return {n.name for n in model.graph if len(n.inputs) > 1 and n.inputs[1] is not None
            and n.inputs[1].producer() is not None and n.inputs[1].producer().op_type == "DequantizeLinear"}


def test_static_op_types_and_nodes_to_exclude_are_honoured(digits_onnx, tmp_path):
    model = load(digits_onnx)
    convs = [n.name for n in model.graph if n.op_type == "Conv"]
    gemms = [n.name for n in model.graph if n.op_type == "Gemm"]
    context = PassContext(workdir=tmp_path, calibration=_calibration())
    only_conv = QuantizeStatic(QuantizeStatic.Config(op_types=["Conv"]), context)(model).model
    assert set(convs) <= _qdq_weights(only_conv) and not set(gemms) & _qdq_weights(only_conv)
    minus_one = QuantizeStatic(QuantizeStatic.Config(nodes_to_exclude=[convs[0]]), context)(model).model
    quantized = _qdq_weights(minus_one)
    assert convs[0] not in quantized and set(convs[1:]) <= quantized
    assert top1(minus_one) >= top1(model) - 0.02


def _attention() -> ir.Model:
    """scores = q·K; scores + (1 - mask) · float-min; Softmax; · V (the shape of a BERT attention block)."""
    inits = {
        "K": RNG.standard_normal((8, 6)).astype(np.float32),
        "V": RNG.standard_normal((6, 8)).astype(np.float32),
        "one": np.array(1.0, np.float32),
        "fmin": np.array(np.finfo(np.float32).min, np.float32),
        "axis1": np.array([1], np.int64),
    }
    nodes = [
        node("MatMul", ["q", "K"], ["scores"]),
        node("Sub", ["one", "mask"], ["inv"]),
        node("Mul", ["inv", "fmin"], ["bias"]),
        node("Unsqueeze", ["bias", "axis1"], ["bias3"]),
        node("Add", ["scores", "bias3"], ["masked"]),
        node("Softmax", ["masked"], ["probs"], axis=-1),
        node("MatMul", ["probs", "V"], ["y"]),
    ]
    return make_model(nodes, inits, [tensor("q", ["n", 4, 8]), tensor("mask", ["n", 6])], [tensor("y", ["n", 4, 8])])


def _attention_batch(n: int = 32) -> dict[str, np.ndarray]:
    mask = np.ones((n, 6), np.float32)
    mask[:, 4:] = 0.0  # padding
    return {"q": RNG.standard_normal((n, 4, 8)).astype(np.float32), "mask": mask}


def test_mask_path_is_detected_from_the_graph():
    found = attention_mask_nodes(_attention())
    assert set(found) == {"bias", "bias3", "masked", "probs"}  # Mul, Unsqueeze, Add, Softmax
    assert "max |x| 3.4e+38" in found["masked"]


def test_static_keeps_the_attention_mask_in_float(tmp_path):
    model = _attention()
    batch = _attention_batch()
    context = PassContext(workdir=tmp_path, calibration=lambda: iter([batch]))
    guarded = QuantizeStatic(QuantizeStatic.Config(), context)(model)
    naive = QuantizeStatic(QuantizeStatic.Config(keep_attention_mask_float=False), context)(model)
    assert set(guarded.stats["kept_float"]) == {"bias", "bias3", "masked", "probs"}
    assert "kept_float" not in naive.stats
    check_contract(guarded.model)
    test = _attention_batch(8)
    ref = run(model, test)[0].ravel()

    def cosine(m: ir.Model) -> float:
        got = run(m, test)[0].ravel()
        return float(got @ ref / np.linalg.norm(got) / np.linalg.norm(ref))

    assert cosine(guarded.model) > 0.99
    assert cosine(naive.model) < cosine(guarded.model) - 0.1  # what the guard prevents


def test_int4_gather_option_quantizes_embeddings_too():
    table = RNG.standard_normal((64, 32)).astype(np.float32)
    w = RNG.standard_normal((32, 16)).astype(np.float32)
    nodes = [node("Gather", ["E", "ids"], ["h"]), node("MatMul", ["h", "W"], ["y"])]
    model = make_model(nodes, {"E": table, "W": w}, [tensor("ids", ["n", 5], I64)], [tensor("y", ["n", 5, 16])])
    result = QuantizeInt4(QuantizeInt4.Config(gather=True))(model)
    assert result.stats["GatherBlockQuantized"] == 1 and result.stats["MatMulNBits"] == 1
    ids = RNG.integers(0, 64, (2, 5)).astype(np.int64)
    got, ref = run(result.model, {"ids": ids})[0], run(model, {"ids": ids})[0]
    assert np.linalg.norm(got - ref) / np.linalg.norm(ref) < 0.2


def test_int4_import_leaves_the_root_logger_alone():
    """ORT's int4 module calls logging.basicConfig(level=INFO) on import; the CLI must stay quiet."""
    import logging
    import sys

    from edgepipe.passes.int4 import _quantizer_class

    sys.modules.pop("onnxruntime.quantization.matmul_nbits_quantizer", None)
    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)
    assert _quantizer_class().__name__ == "MatMulNBitsQuantizer"
    assert root.level == level and root.handlers == handlers
