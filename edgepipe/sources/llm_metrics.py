"""Generation metrics for causal language models: perplexity, teacher-forced agreement, greedy match length.

Everything here works on numpy arrays and plain callables, so the same code measures PyTorch, an ORT session or
onnxruntime-genai. Two shapes of model are accepted:

- a *logits function* ``ids -> logits``: token ids of one sequence, shape (T,), to next-token logits at every
  position, shape (T, vocab) (teacher forcing: position t scores token t + 1);
- a :class:`Decoder` for generation: ``start(prompt)`` returns the logits after the prompt, ``step(token)``
  appends one token and returns the logits after it (a KV cache lives behind it, or :class:`RecomputeDecoder`
  recomputes the whole sequence, the reference a cached decoder must equal).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

logger = logging.getLogger(__name__)

LogitsFn = Callable[[np.ndarray], np.ndarray]


class Decoder(Protocol):
    """Step-by-step next-token logits of one sequence (batch 1)."""

    def start(self, prompt: np.ndarray) -> np.ndarray:
        """Forget any earlier sequence, read ``prompt`` (T,), return the next-token logits (vocab,)."""
        ...

    def step(self, token: int) -> np.ndarray:
        """Append ``token``, return the logits (vocab,) for the token after it."""
        ...


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """log_softmax over the last axis, in float64 (a float32 sum over a 50k vocabulary loses digits)."""
    x = np.asarray(logits, dtype=np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def token_nll(logits: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Negative log-likelihood of ids[1:] given logits[:-1] (both of one sequence): shape (T - 1,)."""
    ids = np.asarray(ids).reshape(-1)
    logits = np.asarray(logits).reshape(len(ids), -1)
    lp = log_softmax(logits[:-1])
    return -lp[np.arange(len(ids) - 1), ids[1:]]


def sequence_nll(fn: LogitsFn, ids: np.ndarray, window: int | None = None, stride: int | None = None) -> np.ndarray:
    """NLL of every token after the first, each scored exactly once, with at most ``window`` tokens per call.

    A sequence longer than ``window`` is read in windows that start ``stride`` tokens apart (default window // 2);
    a window scores only the tokens no earlier window scored, so each of them sees at least window - stride tokens
    of context (the sliding-window perplexity of the transformers docs).
    """
    ids = np.asarray(ids, dtype=np.int64).reshape(-1)
    n = len(ids)
    if n < 2:
        return np.zeros(0)
    if window is None or n <= window:
        return token_nll(fn(ids), ids)
    if window < 2:
        raise ValueError(f"window must be at least 2 tokens, got {window}")
    stride = stride or max(1, window // 2)
    if not 0 < stride <= window - 1:
        raise ValueError(f"stride must be in 1..window-1 ({window - 1}), got {stride}")
    parts, scored = [], 1  # tokens [0, scored) are done; token 0 is never predicted
    for begin in range(0, n, stride):
        end = min(begin + window, n)
        nll = token_nll(fn(ids[begin:end]), ids[begin:end])  # nll[j] scores token begin + j + 1
        parts.append(nll[scored - begin - 1 :])
        scored = end
        if end == n:
            break
    return np.concatenate(parts)


def perplexity(fn: LogitsFn, sequences: Iterable[np.ndarray], window: int | None = None,
               stride: int | None = None) -> float:
    """exp(mean token NLL) over all sequences together (each sequence starts with an empty context)."""
    total, count = 0.0, 0
    for ids in sequences:
        nll = sequence_nll(fn, ids, window, stride)
        total += float(nll.sum())
        count += len(nll)
    if count == 0:
        raise ValueError("perplexity needs at least one sequence of two or more tokens")
    return math.exp(total / count)


@dataclass(frozen=True)
class LogitsAgreement:
    """Teacher-forced agreement of a candidate's next-token logits with a reference's, over all positions."""

    top1: float  # share of positions where both pick the same next token
    cosine: float  # mean cosine similarity of the logits vectors
    cosine_min: float
    positions: int


def agreement(reference: Sequence[np.ndarray], candidate: Sequence[np.ndarray]) -> LogitsAgreement:
    """Compare per-sequence logits arrays (T, vocab), reference[i] against candidate[i]."""
    if len(reference) != len(candidate):
        raise ValueError(f"{len(reference)} reference sequences but {len(candidate)} candidate sequences")
    same, cosines = 0, []
    for ref, cand in zip(reference, candidate, strict=True):
        ref = np.asarray(ref, dtype=np.float64).reshape(-1, np.shape(ref)[-1])
        cand = np.asarray(cand, dtype=np.float64).reshape(-1, np.shape(cand)[-1])
        if ref.shape != cand.shape:
            raise ValueError(f"logits shapes differ: reference {ref.shape}, candidate {cand.shape}")
        same += int((ref.argmax(-1) == cand.argmax(-1)).sum())
        norms = np.linalg.norm(ref, axis=-1) * np.linalg.norm(cand, axis=-1)
        cosines.append((ref * cand).sum(-1) / np.maximum(norms, 1e-30))
    cos = np.concatenate(cosines) if cosines else np.zeros(0)
    if len(cos) == 0:
        raise ValueError("agreement needs at least one position")
    return LogitsAgreement(top1=same / len(cos), cosine=float(cos.mean()), cosine_min=float(cos.min()),
                           positions=len(cos))


def compare(reference: LogitsFn, candidate: LogitsFn, sequences: Iterable[np.ndarray]) -> LogitsAgreement:
    """Teacher-forced agreement of two logits functions on the same token sequences."""
    seqs = [np.asarray(s, dtype=np.int64).reshape(-1) for s in sequences]
    return agreement([reference(s) for s in seqs], [candidate(s) for s in seqs])


class RecomputeDecoder:
    """A :class:`Decoder` that reruns a logits function on the whole sequence at every step (no cache)."""

    def __init__(self, fn: LogitsFn) -> None:
        self.fn = fn
        self.ids = np.zeros(0, dtype=np.int64)

    def start(self, prompt: np.ndarray) -> np.ndarray:
        self.ids = np.asarray(prompt, dtype=np.int64).reshape(-1)
        return np.asarray(self.fn(self.ids))[-1]

    def step(self, token: int) -> np.ndarray:
        self.ids = np.append(self.ids, np.int64(token))
        return np.asarray(self.fn(self.ids))[-1]


def greedy(decoder: Decoder, prompt: np.ndarray, max_new_tokens: int, eos: Iterable[int] = ()) -> np.ndarray:
    """Greedy continuation of ``prompt``: up to ``max_new_tokens`` ids, stopping after an ``eos`` id."""
    stop = set(eos)
    out: list[int] = []
    logits = decoder.start(np.asarray(prompt, dtype=np.int64).reshape(-1))
    while len(out) < max_new_tokens:
        token = int(np.argmax(logits))
        out.append(token)
        if token in stop or len(out) == max_new_tokens:
            break
        logits = decoder.step(token)
    return np.asarray(out, dtype=np.int64)


def match_length(reference: Sequence[int], candidate: Sequence[int]) -> int:
    """How many tokens the two sequences share before they first differ."""
    n = 0
    for a, b in zip(reference, candidate, strict=False):
        if int(a) != int(b):
            break
        n += 1
    return n


def greedy_match(reference: Decoder, candidate: Decoder, prompts: Iterable[np.ndarray],
                 max_new_tokens: int = 32) -> list[int]:
    """Per prompt, how many greedy tokens the candidate produces equal to the reference's before diverging."""
    return [match_length(greedy(reference, p, max_new_tokens), greedy(candidate, p, max_new_tokens)) for p in prompts]
