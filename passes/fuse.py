"""fuse.transformer: onnxruntime.transformers fusion, counted against what the graph should give, kept only if faster."""

from __future__ import annotations

import contextlib
import io
import logging
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Literal

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort

from edgepipe.core.logs import quiet
from edgepipe.core.runtime import session as ort_session
from edgepipe.passes.base import EdgepipePass, PassConfig, StatsResult, clone, load, save

# fused op -> the float ops whose count says how many of it a fully fused graph has
GELU_OPS = ("Gelu", "BiasGelu", "FastGelu")


class FuseConfig(PassConfig):
    model_type: Literal["bert", "bart", "gpt2", "t5", "vit", "clip"] = "bert"
    num_heads: int = 0  # 0: detected from the graph
    hidden_size: int = 0
    opt_level: int = 1  # 0 leaves symbolic shape inference failing on torch's mask graph: no Attention
    keep: Literal["auto", "always", "never"] = "auto"  # auto: keep only when measured faster
    threads: int = 2
    sequence: int = 128  # timing shape for dynamic sequence dims
    runs: int = 20
    min_gain: float = 0.05  # keep the fused graph only if at least this much faster (smaller gaps are timing noise)
    compare_as: Literal["float", "int8"] = "float"  # int8: time both graphs after dynamic int8 (for int8 targets)


def expected_fusions(model: onnx.ModelProto) -> dict[str, int]:
    """What a fully fused BERT-like graph holds: one Attention per Softmax, two SkipLayerNorm per layer, one Gelu per Erf."""
    ops = Counter(n.op_type for n in model.graph.node)
    layers = ops["Softmax"]
    expected = {"Attention": layers, "SkipLayerNormalization": 2 * layers, "Gelu": ops["Erf"] + ops["Gelu"] + ops["FastGelu"]}
    if ops["LayerNormalization"] > 2 * layers:  # the embedding LayerNorm
        expected["EmbedLayerNormalization"] = 1
    return expected


def achieved_fusions(model: onnx.ModelProto) -> dict[str, int]:
    ops = Counter(n.op_type for n in model.graph.node)
    return {
        "Attention": ops["Attention"] + ops["MultiHeadAttention"],
        "SkipLayerNormalization": ops["SkipLayerNormalization"],
        "Gelu": sum(ops[o] for o in GELU_OPS),
        "EmbedLayerNormalization": ops["EmbedLayerNormalization"],
    }


def shape_inference_failure(model: onnx.ModelProto) -> str | None:
    """Run ORT's symbolic shape inference; on failure, name the node it failed on and why."""
    from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

    try:
        with contextlib.redirect_stdout(io.StringIO()):
            SymbolicShapeInference.infer_shapes(model, auto_merge=True)
    except Exception as exc:
        node = None
        tb = sys.exc_info()[2]
        while tb is not None:  # the innermost frame holding the node being inferred
            candidate = tb.tb_frame.f_locals.get("node")
            if isinstance(candidate, onnx.NodeProto):
                node = candidate
            tb = tb.tb_next
        where = f"node '{node.name}' ({node.op_type})" if node is not None else "an unknown node"
        return f"{where}: {type(exc).__name__}: {exc}"[:300]
    return None


def _feed(session: ort.InferenceSession, sequence: int) -> dict[str, np.ndarray]:
    feed = {}
    rng = np.random.default_rng(0)
    for i in session.get_inputs():
        shape = [d if isinstance(d, int) else (1 if n == 0 else sequence) for n, d in enumerate(i.shape)]
        if "int" in i.type:
            ids = "mask" not in i.name
            feed[i.name] = rng.integers(1000, 2000, size=shape).astype(np.int64) if ids else np.ones(shape, np.int64)
        else:
            feed[i.name] = rng.standard_normal(shape).astype(np.float32)
    return feed


def p50_ms(paths: list[Path], threads: int, sequence: int, runs: int) -> list[float]:
    """Median latency (ms) of each model on the CPU provider at batch 1, ``sequence`` tokens.

    Runs alternate between the models so that both see the same background load. Worker threads do not
    spin between runs: a spinning pool of one session steals the cores the next session is timed on.
    """
    sessions = [ort_session(p, threads=threads, config={"session.intra_op.allow_spinning": "0"}) for p in paths]
    feeds = [_feed(s, sequence) for s in sessions]
    times: list[list[float]] = [[] for _ in sessions]
    for r in range(runs + 3):
        for i, (session, feed) in enumerate(zip(sessions, feeds, strict=True)):
            start = time.perf_counter()
            session.run(None, feed)
            if r >= 3:
                times[i].append((time.perf_counter() - start) * 1e3)
    return [float(np.median(t)) for t in times]


def _int8(path: Path) -> Path:
    """The dynamic int8 form of a model, to compare graphs as an int8 target will ship them."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    out = path.with_suffix(".int8.onnx")
    with quiet():  # "Please consider to run pre-processing before quantization"
        quantize_dynamic(path, out, per_channel=True, weight_type=QuantType.QInt8, extra_options={"DefaultTensorType": 1})
    return out


class FuseTransformer(EdgepipePass):
    """Fuses Attention / SkipLayerNorm / Gelu with onnxruntime.transformers.optimizer and reports the counts."""

    name = "fuse.transformer"
    Config = FuseConfig

    def call(self, model: ir.Model) -> StatsResult:
        from onnxruntime.transformers.optimizer import optimize_model

        c = self.config
        folder = self.context.scratch("fuse")
        src = save(model, folder / "in.onnx")
        proto = onnx.load(str(src))
        log = io.StringIO()
        handler = logging.StreamHandler(log)
        logging.getLogger("onnxruntime.transformers").addHandler(handler)
        try:
            with contextlib.redirect_stdout(log):
                fused = optimize_model(
                    str(src), model_type=c.model_type, num_heads=c.num_heads, hidden_size=c.hidden_size,
                    opt_level=c.opt_level, use_gpu=False,
                )
        finally:
            logging.getLogger("onnxruntime.transformers").removeHandler(handler)
        out = folder / "fused.onnx"
        fused.save_model_to_file(str(out))
        expected, achieved = expected_fusions(proto), achieved_fusions(fused.model)
        missing = {k: v - achieved.get(k, 0) for k, v in expected.items() if achieved.get(k, 0) < v}
        stats: dict = {"expected": expected, "achieved": achieved, "complete": not missing}
        if missing:
            stats["missing"] = missing
            if "failed in shape inference" in log.getvalue() or missing.get("Attention"):
                failure = shape_inference_failure(proto)
                if failure:
                    stats["shape_inference"] = failure
        summary = ", ".join(f"{k} {achieved.get(k, 0)}/{v}" for k, v in expected.items())
        if "shape_inference" in stats:
            summary += f"; symbolic shape inference failed at {stats['shape_inference']}"
        elif missing:
            summary += "; the unfused ops do not match onnxruntime's fusion patterns"
        keep, why = c.keep == "always", f"keep: {c.keep}"
        if c.keep == "auto":
            keep, why = False, "nothing fused"
            if sum(achieved.values()):
                pair = [src, out] if c.compare_as == "float" else [_int8(src), _int8(out)]
                unfused, fused_ms = p50_ms(pair, c.threads, c.sequence, c.runs)
                keep = fused_ms < unfused * (1 - c.min_gain)
                why = (f"fused {fused_ms:.2f} ms vs unfused {unfused:.2f} ms ({c.compare_as}, b1, seq {c.sequence}, "
                       f"{c.threads} threads; kept only if ≥{c.min_gain:.0%} faster)")
                stats["timing_ms"] = {
                    "unfused": round(unfused, 3), "fused": round(fused_ms, 3), "as": c.compare_as,
                    "threads": c.threads, "sequence": c.sequence, "runs": c.runs,
                }
        stats["kept"] = keep
        stats["decision"] = f"{'kept' if keep else 'dropped'} the fused graph: {why}"
        stats["summary"] = f"{summary}; {stats['decision']}"
        if not keep:
            return StatsResult(clone(model), modified=False, stats=stats)
        return StatsResult(load(out), modified=True, stats=stats)
