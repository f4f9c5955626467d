"""Run a decoder: the ONNX graph on ONNX Runtime with its KV cache, and the PyTorch reference, behind one shape.

Both expose ``logits(ids) -> (T, vocab)`` (one sequence, empty cache: teacher forcing) and
``start(prompt) -> logits`` / ``step(token) -> logits`` (generation with a cache).

The graph's I/O is what onnxruntime-genai's model builder writes (and edgepipe's decoder export follows):
``input_ids`` and ``attention_mask`` (batch, total length), optional ``position_ids``, per layer
``past_key_values.N.key|value`` (batch, kv_heads, past_length, head_size) in, ``logits`` and ``present.N.key|value``
out. An empty past (length 0) is a prefill.
"""

from __future__ import annotations

import json
import logging
import re
import time
from pathlib import Path
from typing import Any

import numpy as np

from edgepipe.core.errors import BadInput
from edgepipe.core.runtime import ORT_DTYPES, session

logger = logging.getLogger(__name__)
PAST = re.compile(r"past_key_values\.(\d+)\.(key|value)")
# Checks and golden tokens run on one thread: reproducible (verify replays on the same count), and on a busy
# 2-core machine two spinning ORT threads are ~2x slower than one.
CHECK_THREADS = 1


def _head_size(path: str | Path | bytes, shape: list) -> int:
    if isinstance(shape[-1], int):
        return shape[-1]
    if isinstance(path, bytes):
        raise BadInput("the head size of the KV cache is not fixed in the model; give head_size")
    config = Path(path).parent / "genai_config.json"  # the genai builder leaves the head size symbolic ('kv_cache_dim')
    if config.exists():
        return int(json.loads(config.read_text())["model"]["decoder"]["head_size"])
    raise BadInput(f"{path}: the head size of the KV cache is not fixed in the model and there is no genai_config.json "
                   "beside it; give head_size")


class OrtDecoder:
    """A decoder graph (input_ids, attention_mask[, position_ids], past_key_values.N.key|value) on ORT."""

    def __init__(self, path: str | Path | bytes, threads: int | None = None, providers: list[str] | None = None,
                 session_config: dict[str, str] | None = None, head_size: int | None = None) -> None:
        """``path``: the model file, or its serialized bytes (then a symbolic head size must be given)."""
        start = time.perf_counter()
        self.session = session(path, providers, threads=threads, config=session_config)
        self.load_seconds = time.perf_counter() - start
        self.inputs = {i.name: i for i in self.session.get_inputs()}
        where = "the model" if isinstance(path, bytes) else str(path)
        for required in ("input_ids", "attention_mask"):
            if required not in self.inputs:
                raise BadInput(f"{where}: not a decoder with a KV cache (no {required!r} input; inputs: {sorted(self.inputs)})")
        pasts = sorted((int(m[1]), m[2], name) for name in self.inputs if (m := PAST.fullmatch(name)))
        self.keys = [(str(layer), kind) for layer, kind, _ in pasts]  # ("0", "key"), ("0", "value"), ...
        self.past_names = [name for _, _, name in pasts]
        self.present_names = [n.replace("past_key_values", "present") for n in self.past_names]
        outputs = {o.name for o in self.session.get_outputs()}
        if not self.past_names or not set(self.present_names) <= outputs or "logits" not in outputs:
            raise BadInput(f"{where}: past_key_values inputs and present outputs do not pair up (or no 'logits' output)")
        self.output_names = ["logits", *self.present_names]
        first = self.inputs[self.past_names[0]]
        self.kv_heads, self.head_size = int(first.shape[1]), head_size or _head_size(path, first.shape)
        self.dtype = ORT_DTYPES.get(first.type, np.float32)
        self.past: list[np.ndarray] = []
        self.length = 0

    def empty_past(self, batch: int = 1) -> list[np.ndarray]:
        return [np.zeros((batch, self.kv_heads, 0, self.head_size), self.dtype) for _ in self.past_names]

    def run(self, ids: np.ndarray, past: list[np.ndarray], mask: np.ndarray | None = None) -> tuple[np.ndarray, list[np.ndarray]]:
        """One call: ids (batch, seq) after a cache of ``past``; returns (logits, present)."""
        done = past[0].shape[2]
        batch, seq = ids.shape
        feed: dict[str, Any] = {"input_ids": ids.astype(np.int64),
                                "attention_mask": mask if mask is not None else np.ones((batch, done + seq), np.int64)}
        if "position_ids" in self.inputs:
            feed["position_ids"] = np.broadcast_to(np.arange(done, done + seq, dtype=np.int64), (batch, seq)).copy()
        feed.update(zip(self.past_names, past, strict=True))
        out = self.session.run(self.output_names, feed)
        return out[0], out[1:]

    def logits(self, ids: np.ndarray) -> np.ndarray:
        """Teacher-forced next-token logits (T, vocab) of one sequence (an empty cache)."""
        return self.run(np.asarray(ids, np.int64).reshape(1, -1), self.empty_past())[0][0].astype(np.float32)

    def start(self, prompt: np.ndarray) -> np.ndarray:
        logits, self.past = self.run(np.asarray(prompt, np.int64).reshape(1, -1), self.empty_past())
        return logits[0, -1]

    def step(self, token: int) -> np.ndarray:
        logits, self.past = self.run(np.array([[token]], np.int64), self.past)
        return logits[0, -1]


class TorchDecoder:
    """The transformers model (float32) as the reference, with its own KV cache for generation."""

    def __init__(self, model: Any) -> None:
        self.model = model
        self.cache: Any = None

    def logits(self, ids: np.ndarray) -> np.ndarray:
        import torch

        with torch.no_grad():
            out = self.model(torch.from_numpy(np.ascontiguousarray(ids, np.int64).reshape(1, -1)), use_cache=False)
        return out.logits[0].float().numpy()

    def run(self, ids: np.ndarray, past_len: int = 0) -> np.ndarray:
        """Logits for ``ids`` (1, seq) continuing the current cache (``past_len`` tokens)."""
        import torch

        with torch.no_grad():
            out = self.model(torch.from_numpy(ids), past_key_values=self.cache, use_cache=True)
        self.cache = out.past_key_values
        return out.logits.float().numpy()

    def start(self, prompt: np.ndarray) -> np.ndarray:
        self.cache = None
        return self.run(np.asarray(prompt, np.int64).reshape(1, -1))[0, -1]

    def step(self, token: int) -> np.ndarray:
        return self.run(np.array([[token]], np.int64))[0, -1]
