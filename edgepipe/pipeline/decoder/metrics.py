"""Generation checks: perplexity, teacher-forced agreement with the reference, greedy tokens and where they diverge."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Protocol

import numpy as np

LogitsFn = Callable[[np.ndarray], np.ndarray]  # ids (T,) -> next-token logits (T, vocab)


class Generator(Protocol):
    def start(self, prompt: np.ndarray) -> np.ndarray: ...
    def step(self, token: int) -> np.ndarray: ...


def nll(logits: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Negative log-likelihood of ids[1:] under logits[:-1] (float64: a 50k-way softmax in float32 loses digits)."""
    x = np.asarray(logits[:-1], np.float64)
    x = x - x.max(-1, keepdims=True)
    logp = x - np.log(np.exp(x).sum(-1, keepdims=True))
    return -logp[np.arange(len(ids) - 1), np.asarray(ids[1:])]


@dataclasses.dataclass
class TeacherForced:
    """One model's teacher-forced view of the eval text: its logits per sequence and their perplexity."""

    logits: list[np.ndarray]
    perplexity: float

    @classmethod
    def measure(cls, fn: LogitsFn, sequences: Sequence[np.ndarray]) -> TeacherForced:
        logits = [np.asarray(fn(s), np.float32) for s in sequences]
        losses = np.concatenate([nll(lg, s) for lg, s in zip(logits, sequences, strict=True)])
        return cls(logits, float(math.exp(losses.mean())))


def agreement(reference: list[np.ndarray], candidate: list[np.ndarray]) -> dict[str, float]:
    """Next-token top-1 agreement and logits cosine (mean, min) over every position, one sequence at a time."""
    same, cosines = 0, []
    for r, c in zip(reference, candidate, strict=True):
        r, c = r.astype(np.float64), c.astype(np.float64)  # one sequence in float64: memory stays small
        same += int((r.argmax(-1) == c.argmax(-1)).sum())
        cosines.append((r * c).sum(-1) / np.maximum(np.linalg.norm(r, axis=-1) * np.linalg.norm(c, axis=-1), 1e-30))
    cos = np.concatenate(cosines)
    return {"top1": same / len(cos), "cosine": float(cos.mean()), "cosine_min": float(cos.min()), "positions": int(len(cos))}


def greedy(gen: Generator, prompt: np.ndarray, max_new_tokens: int, eos: Sequence[int] = ()) -> list[int]:
    """Greedy continuation: up to ``max_new_tokens`` ids, stopping after an end-of-sequence id."""
    out: list[int] = []
    logits = gen.start(np.asarray(prompt, np.int64))
    while True:
        token = int(np.argmax(logits))
        out.append(token)
        if token in eos or len(out) >= max_new_tokens:
            return out
        logits = gen.step(token)


def matched(reference: Sequence[int], candidate: Sequence[int]) -> int:
    """Tokens the two sequences share before they first differ."""
    n = 0
    for a, b in zip(reference, candidate, strict=False):
        if a != b:
            break
        n += 1
    return n
