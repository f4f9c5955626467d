"""prune.structured at a given sparsity vs the unpruned model: parameters, size, p50 latency, accuracy.

Run: .venv/bin/python benchmarks/prune_structured.py [--sparsity 0.5] [--no-minilm]
Digits CNN: top-1 on the fixed test split. MiniLM (all-MiniLM-L6-v2, FFNs only): cosine of sentence
embeddings against the unpruned model on real text. Latency: ORT CPU, 1 thread, interleaved runs.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import numpy as np
import onnx_ir as ir

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_util as bu  # noqa: E402
from edgepipe.passes import PassContext  # noqa: E402
from edgepipe.passes.prune_structured import PruneStructured  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def digits_onnx() -> ir.Model:
    from edgepipe.passes import PASSES
    from edgepipe.passes.base import load

    from edgepipe.export import export_torch
    from edgepipe.recipe import load_recipe

    bu.CACHE.mkdir(exist_ok=True)
    source = export_torch(load_recipe(ROOT / "models" / "digits" / "recipe.yaml"), bu.CACHE, None)
    return PASSES["cleanup"]()(load(source.onnx_path)).model


def digits_split() -> tuple[np.ndarray, np.ndarray]:
    sys.path.insert(0, str(ROOT / "models" / "digits"))
    import data  # the model's own data module

    _, _, x, y = data.split()
    return x, y


def row(name: str, base: ir.Model, pruned: ir.Model, lat: dict[str, float], acc: tuple[str, float, float], stats: dict) -> list[str]:
    p0, b0, _ = bu.sizes(base)
    p1, b1, _ = bu.sizes(pruned)
    metric, a0, a1 = acc
    return [
        f"| {name} | params | {p0:,} | {p1:,} | {p1 / p0:.2f}x |",
        f"| {name} | size (bytes) | {b0:,} | {b1:,} | {b1 / b0:.2f}x |",
        f"| {name} | p50 latency (ms) | {lat['base']:.3f} | {lat['pruned']:.3f} | {lat['pruned'] / lat['base']:.2f}x |",
        f"| {name} | {metric} | {a0:.4f} | {a1:.4f} | {a1 - a0:+.4f} |",
        f"| {name} | layers pruned | | {len(stats.get('layers', {}))} | skipped {len(stats.get('skipped', {}))} |",
    ]


def curve(stats: dict) -> str:
    return ", ".join("{}: {:.3f}".format(r["sparsity"], r["metric"]) for r in stats["curve"])


def _budgeted(base: ir.Model, max_drop: float, evaluate) -> tuple[ir.Model, dict]:
    context = PassContext(workdir=bu.CACHE / "work", evaluate=evaluate)
    result = PruneStructured(PruneStructured.Config(max_drop=max_drop), context)(base)
    return result.model, result.stats


def bench_digits(sparsity: float, max_drop: float) -> list[str]:
    base = digits_onnx()
    x, y = digits_split()

    def top1(model: ir.Model) -> float:
        return float(np.mean(bu.session(model).run(None, {"image": x})[0].argmax(1) == y))

    lines = []
    fixed = PruneStructured(PruneStructured.Config(sparsity=sparsity))(base)
    budget, stats = _budgeted(base, max_drop, top1)
    for label, model, st in ((f"digits CNN, sparsity {sparsity}", fixed.model, fixed.stats),
                             (f"digits CNN, max_drop {max_drop} → sparsity {stats['chosen_sparsity']}", budget, stats)):
        sessions = {"base": bu.session(base), "pruned": bu.session(model)}
        lat1 = bu.interleaved_p50(sessions, {"image": x[:1]})
        lat64 = bu.interleaved_p50(sessions, {"image": x[:64]}, rounds=20)
        lines += row(label + ", batch 1", base, model, lat1, ("top-1 (test split)", top1(base), top1(model)), st)
        lines.append(f"| {label}, batch 64 | p50 latency (ms) | {lat64['base']:.3f} | {lat64['pruned']:.3f} | {lat64['pruned'] / lat64['base']:.2f}x |")
    lines.append(f"| digits curve (sparsity: top-1) | {curve(stats)} | | | |")
    return lines


def bench_minilm(sparsity: float, max_drop: float) -> list[str]:
    base = ir.load(bu.minilm_onnx())
    texts = bu.sentences()
    batches = bu.tokenized(texts)
    reference = bu.sentence_embeddings(bu.session(base, threads=2), batches)

    def cosine(model: ir.Model) -> float:
        return float(np.mean(np.sum(reference * bu.sentence_embeddings(bu.session(model, threads=2), batches), axis=1)))

    fixed = PruneStructured(PruneStructured.Config(sparsity=sparsity))(base)
    budget, stats = _budgeted(base, max_drop, cosine)
    long = bu.tokenized([" ".join(texts[:12])], max_len=128)[0]
    lines = []
    for label, model, st in ((f"MiniLM FFN, sparsity {sparsity}", fixed.model, fixed.stats),
                             (f"MiniLM FFN, max_drop {max_drop} → sparsity {stats['chosen_sparsity']}", budget, stats)):
        sessions = {"base": bu.session(base), "pruned": bu.session(model)}
        lat = bu.interleaved_p50(sessions, long, rounds=15, per_round=3)
        lines += row(f"{label}, 1x{long['input_ids'].shape[1]} tokens", base, model, lat,
                     (f"sentence cosine vs unpruned ({len(texts)} sentences)", 1.0, cosine(model)), st)
    lines.append(f"| MiniLM curve (sparsity: cosine) | {curve(stats)} | | | |")
    return lines


def main() -> None:
    logging.basicConfig(level=logging.WARNING, force=True)  # onnx-ir/onnxscript log every rewrite at INFO
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--no-minilm", action="store_true")
    parser.add_argument("--digits-max-drop", type=float, default=0.01)
    parser.add_argument("--minilm-max-drop", type=float, default=0.02)
    args = parser.parse_args()
    lines = ["| model | measure | unpruned | pruned | ratio / delta |", "| --- | --- | --- | --- | --- |"]
    lines += bench_digits(args.sparsity, args.digits_max_drop)
    if not args.no_minilm:
        lines += bench_minilm(args.sparsity, args.minilm_max_drop)
    print(f"prune.structured sparsity={args.sparsity} (ORT CPU, 1 thread, p50 of interleaved runs)")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
