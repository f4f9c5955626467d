"""quantize.static on MiniLM with and without the attention-mask float guard: sentence-embedding cosine.

Run: .venv/bin/python benchmarks/static_mask_guard.py
Calibration: the first half of the real sentences (padded batches, so masks hold zeros); evaluation:
the other half, cosine of mean-pooled sentence embeddings against the float32 model.
"""

from __future__ import annotations

import logging
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx_ir as ir

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_util as bu  # noqa: E402

from edgepipe.passes import PassContext  # noqa: E402
from edgepipe.passes.quantize import QuantizeStatic  # noqa: E402


def main() -> None:
    logging.basicConfig(level=logging.WARNING, force=True)
    base = ir.load(bu.minilm_onnx())
    texts = bu.sentences()
    calib, held_out = bu.tokenized(texts[::2]), bu.tokenized(texts[1::2])
    reference = bu.sentence_embeddings(bu.session(base, threads=2), held_out)
    context = PassContext(workdir=Path(tempfile.mkdtemp(prefix="mask-guard-")), calibration=lambda: iter(calib))
    rows = []
    for label, options in (
        ("all ops, no guard (Olive-style default)", {"keep_attention_mask_float": False}),
        ("all ops, mask guard (edgepipe default)", {}),
        ("MatMul only, no guard", {"keep_attention_mask_float": False, "op_types": ["MatMul"]}),
        ("MatMul only, mask guard", {"op_types": ["MatMul"]}),
    ):
        start = time.perf_counter()
        result = QuantizeStatic(QuantizeStatic.Config(**options), context)(base)
        emb = bu.sentence_embeddings(bu.session(result.model, threads=2), held_out)
        cosine = np.sum(emb * reference, axis=1)
        kept = len(result.stats.get("kept_float", {}))
        rows.append(f"| {label} | {kept} | {cosine.mean():.4f} | {cosine.min():.4f} | {time.perf_counter() - start:.0f} s |")
    print(f"MiniLM quantize.static (QDQ U8S8 per-channel, MinMax), {len(held_out)} eval batches / {sum(len(b['input_ids']) for b in held_out)} sentences")
    print("| variant | nodes kept float | mean cosine | min cosine | time |")
    print("| --- | --- | --- | --- | --- |")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
