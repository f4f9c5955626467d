"""A Llama-family decoder straight from its weights to one fused ONNX graph with a KV cache.

The graph is the form onnxruntime-genai's model builder writes (and ORT's
CPU kernels are fastest on): per layer SkipSimplifiedLayerNormalization,
a packed Q/K/V MatMul, GroupQueryAttention with the rotary embedding
inside, and a SiLU-gated MLP. Weights stay float32 here; the int4/int8
passes quantize the MatMuls afterwards.

Inputs: ``input_ids`` (batch, sequence), ``attention_mask`` (batch,
total_sequence_length), ``past_key_values.%d.key|value`` (batch,
kv_heads, past_sequence_length, head_size). Outputs: ``logits`` (batch,
sequence, vocab), ``present.%d.key|value``. An empty past (length 0)
is a prefill; one token with a past is a decode step.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

logger = logging.getLogger(__name__)

LLAMA_FAMILY = ("llama", "qwen2", "mistral", "smollm3")  # RMSNorm + GQA + rotary + SiLU MLP
OPSET = 21  # GatherBlockQuantized (an int4 embedding) needs 21
PAST = "past_key_values.%d.%s"
PRESENT = "present.%d.%s"


class Unsupported(Exception):
    """This architecture or option is not built here (the caller falls back to a generic exporter)."""


def supports(config: Any) -> str | None:
    """None when ``config`` can be built by ``build_graph``, else why not."""
    if config.model_type not in LLAMA_FAMILY:
        return f"model_type {config.model_type!r} is not in the fused builder's family {LLAMA_FAMILY}"
    if getattr(config, "hidden_act", "silu") != "silu":
        return f"hidden_act {config.hidden_act!r} (only silu)"
    scaling = getattr(config, "rope_scaling", None)
    if scaling and scaling.get("rope_type", scaling.get("type")) not in (None, "default"):
        return f"rope_scaling {scaling} (only the default rotary embedding)"
    if getattr(config, "mlp_bias", False):
        return "mlp_bias"
    if getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", False):
        return "sliding-window attention"
    return None


def geometry(config: Any) -> dict[str, int]:
    heads = config.num_attention_heads
    return {
        "layers": config.num_hidden_layers,
        "hidden": config.hidden_size,
        "heads": heads,
        "kv_heads": getattr(config, "num_key_value_heads", None) or heads,
        "head_size": getattr(config, "head_dim", None) or config.hidden_size // heads,
        "vocab": config.vocab_size,
    }


def _rotary_caches(config: Any, head_size: int) -> tuple[np.ndarray, np.ndarray]:
    theta = float(getattr(config, "rope_theta", 10000.0))
    length = int(getattr(config, "max_position_embeddings", 2048))
    inv_freq = 1.0 / (theta ** (np.arange(0, head_size, 2, dtype=np.int64).astype(np.float32) / head_size))
    freqs = np.outer(np.arange(length, dtype=np.float32), inv_freq)  # (length, head_size / 2)
    return np.cos(freqs).astype(np.float32), np.sin(freqs).astype(np.float32)


class _Graph:
    """Nodes and initializers, with generated names."""

    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []

    def init(self, name: str, array: np.ndarray) -> str:
        self.inits.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def op(self, op_type: str, inputs: list[str], name: str, n_out: int = 1, domain: str = "", **attrs: Any) -> list[str]:
        outputs = [f"{name}/output_{i}" for i in range(n_out)]
        self.nodes.append(helper.make_node(op_type, inputs, outputs, name=name, domain=domain, **attrs))
        return outputs


def build_graph(model: Any, path: Path) -> dict[str, Any]:
    """Write ``model`` (a transformers Llama-family causal LM, float32) as one fused decoder graph to ``path``.

    Returns the geometry (layers, heads, kv_heads, head_size, hidden, vocab).
    """
    config = model.config
    why = supports(config)
    if why:
        raise Unsupported(why)
    geo = geometry(config)
    hs, kv, heads = geo["head_size"], geo["kv_heads"], geo["heads"]
    eps = float(getattr(config, "rms_norm_eps", 1e-6))
    state = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    g = _Graph()

    embed = g.init("model.embed_tokens.weight", state["model.embed_tokens.weight"])
    one = g.init("const/int64_1", np.array([1], np.int64))
    idx1 = g.init("const/int64_scalar_1", np.array(1, np.int64))
    cos, sin = _rotary_caches(config, hs)
    cos_name, sin_name = g.init("cos_cache", cos), g.init("sin_cache", sin)

    # GQA's view of the 2-D mask: seqlens_k = valid tokens - 1 per row; total length as int32.
    total = g.op("ReduceSum", ["attention_mask", one], "/mask/ReduceSum", keepdims=0)[0]
    seqlens = g.op("Cast", [g.op("Sub", [total, one], "/mask/Sub")[0]], "/mask/seqlens_k", to=TensorProto.INT32)[0]
    shape = g.op("Shape", ["attention_mask"], "/mask/Shape")[0]
    total_len = g.op("Cast", [g.op("Gather", [shape, idx1], "/mask/Gather", axis=0)[0]], "/mask/total_seq_len", to=TensorProto.INT32)[0]

    hidden = g.op("Gather", [embed, "input_ids"], "/embed/Gather", axis=0)[0]
    residual: str | None = None
    pending = hidden  # what the next norm adds to the residual stream
    for i in range(geo["layers"]):
        p = f"model.layers.{i}"
        normed, residual = _norm(g, pending, residual, state[f"{p}.input_layernorm.weight"], f"/layers.{i}/input_norm", eps)
        q, k, v = (state[f"{p}.self_attn.{n}_proj.weight"] for n in "qkv")
        qkv = g.op("MatMul", [normed, g.init(f"{p}.attn.qkv_proj.weight", np.concatenate([q, k, v], 0).T)], f"/layers.{i}/attn/qkv_proj/MatMul")[0]
        if f"{p}.self_attn.q_proj.bias" in state:  # Qwen2
            bias = np.concatenate([state[f"{p}.self_attn.{n}_proj.bias"] for n in "qkv"])
            qkv = g.op("Add", [qkv, g.init(f"{p}.attn.qkv_proj.bias", bias)], f"/layers.{i}/attn/qkv_proj/Add")[0]
        attn = g.op(
            "GroupQueryAttention",
            [qkv, "", "", PAST % (i, "key"), PAST % (i, "value"), seqlens, total_len, cos_name, sin_name],
            f"/layers.{i}/attn/GroupQueryAttention", n_out=3, domain="com.microsoft",
            num_heads=heads, kv_num_heads=kv, do_rotary=1, rotary_interleaved=0, scale=float(hs ** -0.5),
        )
        g.nodes[-1].output[1], g.nodes[-1].output[2] = PRESENT % (i, "key"), PRESENT % (i, "value")
        out = g.op("MatMul", [attn[0], g.init(f"{p}.attn.o_proj.weight", state[f"{p}.self_attn.o_proj.weight"].T)], f"/layers.{i}/attn/o_proj/MatMul")[0]
        normed, residual = _norm(g, out, residual, state[f"{p}.post_attention_layernorm.weight"], f"/layers.{i}/post_attention_norm", eps)
        gate = g.op("MatMul", [normed, g.init(f"{p}.mlp.gate_proj.weight", state[f"{p}.mlp.gate_proj.weight"].T)], f"/layers.{i}/mlp/gate_proj/MatMul")[0]
        up = g.op("MatMul", [normed, g.init(f"{p}.mlp.up_proj.weight", state[f"{p}.mlp.up_proj.weight"].T)], f"/layers.{i}/mlp/up_proj/MatMul")[0]
        act = g.op("Mul", [gate, g.op("Sigmoid", [gate], f"/layers.{i}/mlp/act/Sigmoid")[0]], f"/layers.{i}/mlp/act/Mul")[0]
        prod = g.op("Mul", [act, up], f"/layers.{i}/mlp/Mul")[0]
        pending = g.op("MatMul", [prod, g.init(f"{p}.mlp.down_proj.weight", state[f"{p}.mlp.down_proj.weight"].T)], f"/layers.{i}/mlp/down_proj/MatMul")[0]
    final, _ = _norm(g, pending, residual, state["model.norm.weight"], "/final_norm", eps, last=True)
    head = state.get("lm_head.weight", state["model.embed_tokens.weight"])
    g.nodes.append(helper.make_node("MatMul", [final, g.init("lm_head.weight", head.T)], ["logits"], name="/lm_head/MatMul"))

    _write(g, geo, path)
    logger.info("fused decoder graph: %d layers, %d nodes → %s", geo["layers"], len(g.nodes), path)
    return geo


def _norm(g: _Graph, x: str, residual: str | None, weight: np.ndarray, name: str, eps: float, last: bool = False) -> tuple[str, str]:
    """RMSNorm of (x + residual); returns (normed, new residual)."""
    w = g.init(f"{name}.weight", weight)
    if residual is None:
        return g.op("SimplifiedLayerNormalization", [x, w], f"{name}/SimplifiedLayerNorm", axis=-1, epsilon=eps, stash_type=1)[0], x
    outs = g.op("SkipSimplifiedLayerNormalization", [x, residual, w], f"{name}/SkipSimplifiedLayerNorm", n_out=4, domain="com.microsoft", epsilon=eps)
    node = g.nodes[-1]
    del node.output[:]
    node.output.extend([outs[0], "", "", "" if last else outs[3]])
    return outs[0], outs[3]


def _write(g: _Graph, geo: dict[str, int], path: Path) -> None:
    f32, i64 = TensorProto.FLOAT, TensorProto.INT64
    past = ["batch_size", geo["kv_heads"], "past_sequence_length", geo["head_size"]]
    present = ["batch_size", geo["kv_heads"], "total_sequence_length", geo["head_size"]]
    inputs = [
        helper.make_tensor_value_info("input_ids", i64, ["batch_size", "sequence_length"]),
        helper.make_tensor_value_info("attention_mask", i64, ["batch_size", "total_sequence_length"]),
    ]
    outputs = [helper.make_tensor_value_info("logits", f32, ["batch_size", "sequence_length", geo["vocab"]])]
    for i in range(geo["layers"]):
        for kind in ("key", "value"):
            inputs.append(helper.make_tensor_value_info(PAST % (i, kind), f32, past))
            outputs.append(helper.make_tensor_value_info(PRESENT % (i, kind), f32, present))
    graph = helper.make_graph(g.nodes, "decoder", inputs, outputs, g.inits)
    g.inits.clear()  # make_graph copied them: one copy of the weights in memory while saving
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid("com.microsoft", 1)])
    model.ir_version = 10
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=path.name + ".data", size_threshold=1024)
