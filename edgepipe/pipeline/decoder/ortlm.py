"""A decoder's ORT session as llm_metrics' logits function and Decoder, for benchmarks: ``runtime.OrtDecoder``
(the one ORT decoder runner: I/O, KV cache, checks) with the cache keyed by (layer, key|value)."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from edgepipe.pipeline.decoder.runtime import OrtDecoder

logger = logging.getLogger(__name__)
Cache = dict[tuple[str, str], np.ndarray]


class OrtCausalLM:
    """``logits(ids)`` (teacher forcing, empty past), ``run(ids, past)`` and ``decoder()`` (a fresh generation)."""

    def __init__(self, path: str | Path, threads: int | None = None, head_size: int | None = None) -> None:
        self.ort = OrtDecoder(Path(path), threads=threads, head_size=head_size)
        self.session = self.ort.session

    def run(self, ids: np.ndarray, past: Cache | None = None) -> tuple[np.ndarray, Cache]:
        """One call: ids (batch, T) after ``past`` (None: empty) -> logits (batch, T, vocab), the new cache."""
        ids = np.asarray(ids, dtype=np.int64)
        cache = self.ort.empty_past(len(ids)) if past is None else [past[k] for k in self.ort.keys]
        logits, present = self.ort.run(ids, cache)
        return logits, dict(zip(self.ort.keys, present, strict=True))

    def logits(self, ids: np.ndarray) -> np.ndarray:
        """Teacher-forced next-token logits (T, vocab) of one sequence (T,): llm_metrics' logits function."""
        return self.run(np.asarray(ids).reshape(1, -1))[0][0]

    def decoder(self) -> Generation:
        return Generation(self)


class Generation:
    """llm_metrics.Decoder over OrtCausalLM: a prefill, then one token per call on the growing KV cache."""

    def __init__(self, model: OrtCausalLM) -> None:
        self.model = model
        self.cache: Cache | None = None

    def start(self, prompt: np.ndarray) -> np.ndarray:
        logits, self.cache = self.model.run(np.asarray(prompt).reshape(1, -1))
        return logits[0, -1]

    def step(self, token: int) -> np.ndarray:
        logits, self.cache = self.model.run(np.array([[token]], dtype=np.int64), self.cache)
        return logits[0, -1]
