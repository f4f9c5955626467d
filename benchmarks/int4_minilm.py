"""quantize.int4 on MiniLM: file size and sentence-embedding cosine, MatMul only vs MatMul + Gather.

Run: .venv/bin/python benchmarks/int4_minilm.py
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import numpy as np
import onnx_ir as ir

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_util as bu  # noqa: E402

from edgepipe.passes.int4 import QuantizeInt4  # noqa: E402


def main() -> None:
    logging.basicConfig(level=logging.WARNING, force=True)
    base = ir.load(bu.minilm_onnx())
    batches = bu.tokenized(bu.sentences())
    reference = bu.sentence_embeddings(bu.session(base, threads=2), batches)
    size = bu.sizes(base)[1]
    print("| variant | MatMulNBits | GatherBlockQuantized | bytes | size × | mean cosine |")
    print("| --- | --- | --- | --- | --- | --- |")
    print(f"| fp32 | 0 | 0 | {size:,} | 1.00 | 1.0000 |")
    for gather in (False, True):
        result = QuantizeInt4(QuantizeInt4.Config(gather=gather))(base)
        emb = bu.sentence_embeddings(bu.session(result.model, threads=2), batches)
        nbytes = bu.sizes(result.model)[1]
        label = "int4 MatMul + Gather" if gather else "int4 MatMul"
        print(f"| {label} | {result.stats['MatMulNBits']} | {result.stats['GatherBlockQuantized']} | {nbytes:,} | "
              f"{nbytes / size:.2f} | {np.mean(np.sum(emb * reference, axis=1)):.4f} |")


if __name__ == "__main__":
    main()
