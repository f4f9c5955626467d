"""Decoder speed: prefill latency, time to first token, decode tokens/s, peak RSS."""

from __future__ import annotations

import logging
import time

import numpy as np

from edgepipe.core.bench import peak_rss_mb
from edgepipe.pipeline.decoder.runtime import OrtDecoder

logger = logging.getLogger(__name__)


def bench_decoder(dec: OrtDecoder, prompt: np.ndarray, prefill_tokens: int = 128, decode_tokens: int = 64,
                  runs: int = 3) -> dict[str, float]:
    """Median over ``runs`` of: a ``prefill_tokens`` prefill, then ``decode_tokens`` greedy steps (batch 1)."""
    reps = -(-prefill_tokens // max(len(prompt), 1))
    ids = np.tile(np.asarray(prompt, np.int64), reps)[:prefill_tokens].reshape(1, -1)
    dec.run(ids[:, :8], dec.empty_past())  # warm-up: kernels, allocator
    prefill, ttft, decode = [], [], []
    for _ in range(runs):
        start = time.perf_counter()
        logits, past = dec.run(ids, dec.empty_past())
        token = int(np.argmax(logits[0, -1]))
        first = time.perf_counter()
        prefill.append(first - start)
        ttft.append(first - start)
        for _ in range(decode_tokens):
            logits, past = dec.run(np.array([[token]], np.int64), past)
            token = int(np.argmax(logits[0, -1]))
        decode.append((time.perf_counter() - first) / decode_tokens)
    step = float(np.median(decode))
    return {
        "prefill_tokens": prefill_tokens,
        "prefill_ms": round(float(np.median(prefill)) * 1e3, 2),
        "ttft_ms": round(float(np.median(ttft)) * 1e3, 2),
        "decode_tokens": decode_tokens,
        "decode_ms_per_token": round(step * 1e3, 3),
        "decode_tokens_per_s": round(1.0 / step, 2),
        "p50_ms": round(step * 1e3, 3),  # one decode step: what the generic tables show as batch-1 latency
        "load_ms": round(dec.load_seconds * 1e3, 1),
        "peak_rss_mb": peak_rss_mb(),
    }
