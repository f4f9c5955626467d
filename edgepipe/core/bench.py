"""Latency, throughput, load time and peak memory of an artifact on its runtime."""

from __future__ import annotations

import resource
import sys
import time

import numpy as np

from edgepipe.core.runtime import Runner

Batch = dict[str, np.ndarray]


def resize_batch(feed: Batch, n: int) -> Batch:
    """The first ``n`` samples of a batch, tiled if it holds fewer."""
    out = {}
    for k, v in feed.items():
        reps = -(-n // len(v))
        out[k] = np.concatenate([v] * reps)[:n] if reps > 1 else v[:n]
    return out


def latency(runner: Runner, feed: Batch, warmup: int = 5, runs: int = 50, max_seconds: float = 10.0) -> dict[str, float]:
    """p50/p90/p99 in ms over ``runs`` timed calls after ``warmup`` (stops early past max_seconds)."""
    for _ in range(warmup):
        runner.run(feed)
    times = []
    deadline = time.perf_counter() + max_seconds
    for _ in range(runs):
        start = time.perf_counter()
        runner.run(feed)
        times.append((time.perf_counter() - start) * 1e3)
        if time.perf_counter() > deadline and len(times) >= 5:
            break
    arr = np.array(times)
    batch = len(next(iter(feed.values())))
    return {
        "batch": batch,
        "runs": len(times),
        "p50_ms": round(float(np.percentile(arr, 50)), 4),
        "p90_ms": round(float(np.percentile(arr, 90)), 4),
        "p99_ms": round(float(np.percentile(arr, 99)), 4),
        "throughput_per_s": round(batch * 1e3 / float(np.percentile(arr, 50)), 2),
    }


def peak_rss_mb() -> float:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(rss / (1 << 20) if sys.platform == "darwin" else rss / 1024, 1)
