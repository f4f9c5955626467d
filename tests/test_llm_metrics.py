"""edgepipe.sources.llm_metrics on tiny hand-checkable language models (a bigram table is a real causal LM)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from edgepipe.sources import llm_metrics as lm

V = 5
rng = np.random.default_rng(0)
TABLE = rng.normal(size=(V, V))  # bigram LM: logits after token a are TABLE[a]


def bigram(ids: np.ndarray) -> np.ndarray:
    return TABLE[np.asarray(ids)]


def test_uniform_model_has_perplexity_of_the_vocabulary() -> None:
    uniform = lambda ids: np.zeros((len(ids), V))  # noqa: E731
    assert lm.perplexity(uniform, [np.array([0, 1, 2, 3]), np.array([4, 4])]) == pytest.approx(V)


def test_token_nll_by_hand() -> None:
    logits = np.array([[0.0, math.log(3.0)], [math.log(3.0), 0.0], [0.0, 0.0]])  # p(1|.)=3/4, then p(0|.)=3/4
    assert lm.token_nll(logits, np.array([1, 1, 0])) == pytest.approx([-math.log(0.75)] * 2)


def test_sliding_window_scores_every_token_once_within_the_window() -> None:
    ids = rng.integers(0, V, size=23)
    calls: list[int] = []

    def recording(x: np.ndarray) -> np.ndarray:
        calls.append(len(x))
        return bigram(x)

    full = lm.sequence_nll(bigram, ids)
    windowed = lm.sequence_nll(recording, ids, window=8, stride=3)
    assert len(windowed) == len(ids) - 1 and max(calls) <= 8 and len(calls) > 1
    np.testing.assert_allclose(windowed, full)  # a bigram needs one token of context, so windows change nothing


def test_sliding_window_gives_each_token_the_context_of_its_window() -> None:
    # a model that only predicts well with >= 4 tokens of context: windowing must keep window - stride of context
    ids = np.arange(30) % V

    def needs_context(x: np.ndarray) -> np.ndarray:
        out = np.zeros((len(x), V))
        for t in range(len(x)):
            if t >= 3:
                out[t, (x[t] + 1) % V] = 20.0
        return out

    short = lm.sequence_nll(needs_context, ids, window=10, stride=6)  # context of 4 left at each window start
    assert short[3:].max() < 1e-6  # every token after the first window's warm-up is predicted confidently
    starved = lm.sequence_nll(needs_context, ids, window=10, stride=9)  # only 1 token of context kept
    assert starved.max() > 1.0


def test_window_and_stride_validation() -> None:
    ids = np.arange(10) % V
    with pytest.raises(ValueError, match="stride"):
        lm.sequence_nll(bigram, ids, window=4, stride=4)
    with pytest.raises(ValueError, match="window"):
        lm.sequence_nll(bigram, ids, window=1)
    with pytest.raises(ValueError, match="at least one"):
        lm.perplexity(bigram, [np.array([1])])


def test_agreement_top1_and_cosine() -> None:
    seqs = [rng.integers(0, V, size=6), rng.integers(0, V, size=4)]
    ref = [bigram(s) for s in seqs]
    same = lm.compare(bigram, bigram, seqs)
    assert (same.top1, same.positions) == (1.0, 10) and same.cosine == pytest.approx(1.0)
    scaled = lm.agreement(ref, [2.0 * r + 0.0 for r in ref])
    assert scaled.top1 == 1.0 and scaled.cosine == pytest.approx(1.0)
    flipped = [r.copy() for r in ref]
    row = flipped[0][2]
    row[np.argmin(row)] = row.max() + 1.0  # one position now prefers another token
    off = lm.agreement(ref, flipped)
    assert off.top1 == pytest.approx(9 / 10) and off.cosine < 1.0 and off.cosine_min < off.cosine
    assert lm.agreement(ref, [-r for r in ref]).cosine == pytest.approx(-1.0)


def test_agreement_rejects_mismatched_inputs() -> None:
    with pytest.raises(ValueError, match="shapes differ"):
        lm.agreement([np.zeros((3, V))], [np.zeros((2, V))])
    with pytest.raises(ValueError, match="sequences"):
        lm.agreement([np.zeros((3, V))], [])


def test_greedy_follows_the_argmax_chain_and_stops_at_eos() -> None:
    chain = np.full((V, V), -5.0)
    for a in range(V):
        chain[a, (a + 2) % V] = 5.0  # after a comes a + 2
    dec = lm.RecomputeDecoder(lambda ids: chain[ids])
    assert lm.greedy(dec, np.array([0]), 6).tolist() == [2, 4, 1, 3, 0, 2]
    assert lm.greedy(dec, np.array([3, 0]), 6, eos=[1]).tolist() == [2, 4, 1]
    assert lm.greedy(dec, np.array([0]), 1).tolist() == [2]


class CachedBigram:
    """A decoder with state that mimics a KV cache (only the last token is kept)."""

    def start(self, prompt: np.ndarray) -> np.ndarray:
        self.last = int(prompt[-1])
        return TABLE[self.last]

    def step(self, token: int) -> np.ndarray:
        self.last = token
        return TABLE[token]


def test_greedy_match_counts_tokens_before_the_first_divergence() -> None:
    assert lm.match_length([1, 2, 3, 4], [1, 2, 0, 4]) == 2
    assert lm.match_length([1, 2], [1, 2, 3]) == 2
    assert lm.match_length([], [1]) == 0
    prompts = [np.array([p]) for p in range(V)]
    assert lm.greedy_match(lm.RecomputeDecoder(bigram), CachedBigram(), prompts, 12) == [12] * V
    other = TABLE.copy()
    other[TABLE[0].argmax()] = np.roll(other[TABLE[0].argmax()], 1)  # changes the token after the first one
    matched = lm.greedy_match(lm.RecomputeDecoder(bigram), lm.RecomputeDecoder(lambda i: other[i]), [np.array([0])], 8)
    assert matched == [1]
