"""Mixed int4/int8 chosen by measured sensitivity: which transformer blocks (or the LM head) stay at 8 bits.

1. Rank: for each group alone at 8 bits (the rest int4), the perplexity recovered on a few
   calibration sequences, relative to the all-int4 model.
2. Keep: the top-ranked groups at 8 bits, 1, 2, 4, … of them, until the eval budget holds;
   the fewest that meet it win (the size grows with every int8 group).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import onnx

from edgepipe.pipeline.decoder.metrics import TeacherForced
from edgepipe.pipeline.decoder.quantize import LM_HEAD, Quantized
from edgepipe.pipeline.decoder.runtime import CHECK_THREADS, OrtDecoder

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class Choice:
    model: onnx.ModelProto
    plan: dict[str, int]
    steps: list[dict]
    sensitivity: list[dict]
    block_size: int | None = None
    searched: int = 0  # int4 MatMuls with searched scales


def perplexity_of(model: onnx.ModelProto, sequences: Sequence[np.ndarray]) -> TeacherForced:
    return TeacherForced.measure(OrtDecoder(model.SerializeToString(), threads=CHECK_THREADS).logits, sequences)


def rank(q: Quantized, calibration: Sequence[np.ndarray]) -> list[dict]:
    """Every group's perplexity recovery when it alone is kept at 8 bits, most helpful first.

    Groups are swapped in and out of one all-int4 model (no copy per candidate). A tied LM head
    is not a candidate: its int4 weight is also the embedding table, and an int8 copy would double it.
    """
    work = q.build({})
    tied = any(n.op_type == "GatherBlockQuantized" for n in work.graph.node)
    base = perplexity_of(work, calibration).perplexity
    rows = []
    for group in q.groups():
        if tied and group == LM_HEAD:
            continue
        q.swap(work, group, 8)
        ppl = perplexity_of(work, calibration).perplexity
        q.swap(work, group, 4)
        rows.append({"node": group, "op": "int8", "gain": round(base - ppl, 6), "perplexity": round(ppl, 6)})
    rows.sort(key=lambda r: -r["gain"])
    logger.info(f"        sensitivity: all-int4 perplexity {base:.3f}; most helpful at int8: "
        + ", ".join(f"{r['node']} ({r['gain']:+.3f})" for r in rows[:4]))
    return rows


def choose(q: Quantized, eval_seqs: Sequence[np.ndarray], calibration: Sequence[np.ndarray],
           accept: Callable[[TeacherForced], bool], max_groups: int) -> Choice:
    """The all-int4 model if it meets ``accept``; else the fewest top-ranked int8 groups that do."""
    model = q.build({})
    tf = perplexity_of(model, eval_seqs)
    steps = [{"kept_float": 0, "int8_groups": [], "metric": tf.perplexity, "passed": accept(tf)}]
    logger.info(f"        all int4: perplexity {tf.perplexity:.3f} {'meets' if steps[0]['passed'] else 'breaks'} the budget")
    if steps[0]["passed"] or max_groups == 0:
        return Choice(model, {}, steps, [])
    ranked = rank(q, calibration)
    helpful = [r["node"] for r in ranked if r["gain"] > 0][:max_groups]
    counts = sorted({min(2 ** i, len(helpful)) for i in range(len(helpful).bit_length() + 1)} - {0})
    best = Choice(model, {}, steps, ranked)
    for n in counts:
        plan = dict.fromkeys(helpful[:n], 8)
        candidate = q.build(plan)
        tf = perplexity_of(candidate, eval_seqs)
        ok = accept(tf)
        steps.append({"kept_float": n, "int8_groups": helpful[:n], "metric": tf.perplexity, "passed": ok})
        logger.info(f"        {n} group(s) at int8: perplexity {tf.perplexity:.3f} {'meets' if ok else 'breaks'} the budget")
        best = Choice(candidate, plan, steps, ranked)
        if ok:
            break
    return best


def choose_blocks(prepare: Callable[[int, tuple[int, ...]], Quantized], block_sizes: Sequence[int], eval_seqs: Sequence[np.ndarray],
                  calibration: Sequence[np.ndarray], accept: Callable[[TeacherForced], bool], max_groups: int) -> Choice:
    """Every block int4 at each of ``block_sizes[:-1]`` in turn (larger blocks: fewer scale bytes per decode step)
    until one meets ``accept``; else the last size, with the fewest int8 groups that do (``choose``).

    ``prepare(size, bits)``: the float model quantized at that block size, at each of ``bits``.
    """
    tried: list[dict[str, Any]] = []
    for size in block_sizes[:-1]:
        q = prepare(size, (4,))
        model = q.build({})
        tf = perplexity_of(model, eval_seqs)
        ok = accept(tf)
        tried.append({"block_size": size, "kept_float": 0, "int8_groups": [], "metric": tf.perplexity, "passed": ok})
        logger.info(f"        all int4, block {size}: perplexity {tf.perplexity:.3f} {'meets' if ok else 'breaks'} the budget")
        if ok:
            return Choice(model, {}, tried, [], size, q.searched)
        del q, model
    size = block_sizes[-1]
    q = prepare(size, (4, 8) if max_groups else (4,))
    choice = choose(q, eval_seqs, calibration, accept, max_groups)
    choice.steps = tried + [{"block_size": size} | step for step in choice.steps]
    choice.block_size, choice.searched = size, q.searched
    return choice
