"""Generation checks for the build: teacher-forced perplexity and logits, on the shared metrics of
``edgepipe.sources.llm_metrics`` (the benchmark uses the same ones)."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence

import numpy as np

from edgepipe.sources import llm_metrics as lm

LogitsFn = Callable[[np.ndarray], np.ndarray]  # ids (T,) -> next-token logits (T, vocab)
Generator = lm.Decoder
nll = lm.token_nll
matched = lm.match_length


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
    """Next-token top-1 agreement and logits cosine (mean, min) over every position, as manifest fields."""
    return dataclasses.asdict(lm.agreement(reference, candidate))


def greedy(gen: Generator, prompt: np.ndarray, max_new_tokens: int, eos: Sequence[int] = ()) -> list[int]:
    """Greedy continuation: up to ``max_new_tokens`` ids, stopping after an end-of-sequence id."""
    return [int(t) for t in lm.greedy(gen, prompt, max_new_tokens, eos)]
