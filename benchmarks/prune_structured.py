"""prune.structured at a given sparsity vs the unpruned model: parameters, size, p50 latency, accuracy.

Run: .venv/bin/python benchmarks/prune_structured.py [--sparsity 0.5] [--no-minilm]
Digits CNN: top-1 on the fixed test split (activation statistics from 256 training images). MiniLM
(all-MiniLM-L6-v2, FFNs only): cosine of sentence embeddings against the unpruned model on held-out real
sentences (statistics from the other half). Latency: ORT CPU, 1 thread, interleaved runs.
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
    from edgepipe.recipe import load_recipe
    from edgepipe.sources.export import export_torch

    bu.CACHE.mkdir(exist_ok=True)
    source = export_torch(load_recipe(ROOT / "models" / "digits" / "recipe.yaml"), bu.CACHE, None)
    return PASSES["cleanup"]()(load(source.onnx_path)).model


def _digits_data():
    sys.path.insert(0, str(ROOT / "models" / "digits"))
    import data  # the model's own data module

    return data


def digits_split() -> tuple[np.ndarray, np.ndarray]:
    _, _, x, y = _digits_data().split()
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


def _variants(base: ir.Model, sparsity: float, max_drop: float, context: PassContext, budget_criterion: str) -> list[tuple[str, ir.Model, dict]]:
    """(label, model, stats) for: L1 at ``sparsity``, activation at ``sparsity``, the budget form."""
    out = []
    for criterion in ("l1", "activation"):
        result = PruneStructured(PruneStructured.Config(sparsity=sparsity, criterion=criterion), context)(base)
        out.append((f"sparsity {sparsity}, {criterion}", result.model, result.stats))
    result = PruneStructured(PruneStructured.Config(max_drop=max_drop, criterion=budget_criterion), context)(base)
    out.append((f"max_drop {max_drop}, {budget_criterion} → sparsity {result.stats['chosen_sparsity']}", result.model, result.stats))
    return out


def bench_digits(sparsity: float, max_drop: float) -> list[str]:
    base = digits_onnx()
    x, y = digits_split()
    train = _digits_data().split()[0][:256]

    def top1(model: ir.Model) -> float:
        return float(np.mean(bu.session(model).run(None, {"image": x})[0].argmax(1) == y))

    context = PassContext(workdir=bu.CACHE / "work", evaluate=top1, calibration=lambda: iter([{"image": train}]))
    lines = []
    variants = _variants(base, sparsity, max_drop, context, "l1")
    for label, model, st in variants:
        sessions = {"base": bu.session(base), "pruned": bu.session(model)}
        lat1 = bu.interleaved_p50(sessions, {"image": x[:1]})
        lat64 = bu.interleaved_p50(sessions, {"image": x[:64]}, rounds=20)
        lines += row(f"digits, {label}, batch 1", base, model, lat1, ("top-1 (test split)", top1(base), top1(model)), st)
        lines.append(f"| digits, {label}, batch 64 | p50 latency (ms) | {lat64['base']:.3f} | {lat64['pruned']:.3f} | {lat64['pruned'] / lat64['base']:.2f}x |")
    lines.append(f"| digits curve (sparsity: top-1) | {curve(variants[-1][2])} | | | |")
    return lines


def bench_minilm(sparsity: float, max_drop: float) -> list[str]:
    base = ir.load(bu.minilm_onnx())
    texts = bu.sentences()
    calibration, held_out = bu.tokenized(texts[::2]), bu.tokenized(texts[1::2])
    reference = bu.sentence_embeddings(bu.session(base, threads=2), held_out)

    def cosine(model: ir.Model) -> float:
        return float(np.mean(np.sum(reference * bu.sentence_embeddings(bu.session(model, threads=2), held_out), axis=1)))

    context = PassContext(workdir=bu.CACHE / "work", evaluate=cosine, calibration=lambda: iter(calibration))
    variants = _variants(base, sparsity, max_drop, context, "activation")
    long = bu.tokenized([" ".join(texts[:12])], max_len=128)[0]
    lines = []
    for label, model, st in variants:
        sessions = {"base": bu.session(base), "pruned": bu.session(model)}
        lat = bu.interleaved_p50(sessions, long, rounds=15, per_round=3)
        lines += row(f"MiniLM FFN, {label}, 1x{long['input_ids'].shape[1]} tokens", base, model, lat,
                     (f"sentence cosine vs unpruned ({len(texts[1::2])} held-out sentences)", 1.0, cosine(model)), st)
    lines.append(f"| MiniLM curve (sparsity: cosine) | {curve(variants[-1][2])} | | | |")
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
