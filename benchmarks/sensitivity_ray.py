"""Per-node sensitivity analysis (quantize.auto's ranking) on MiniLM: in-process vs 2 local Ray workers, one run.

The MiniLM recipe's cpu chain runs up to quantize.auto (fuse.transformer, cleanup, smoothquant), the model is
quantized as quantize.auto quantizes it (dynamic, per-channel), and then the ranking step — every quantized
node kept alone in float and scored on the first ``sensitivity_samples`` (32) eval sentences — runs side by
side: in-process (ORT's default threads, what a local build does; and one ORT thread), on a 2-worker spawn
process pool, and as Ray tasks on a local 2-CPU Ray (cold: workers start; warm: the same again). Every row
must give the same scores bit for bit (hence the same ranking).

Usage: HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/sensitivity_ray.py [--samples N] [--fuse never|always|both]
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def prepare(work: Path, fuse: str):
    """(float proto, quantized proto, candidate nodes, evaluator, quantize.auto config) of the MiniLM cpu chain.

    ``fuse``: fuse.transformer's ``keep`` (the recipe's ``auto`` decides by timing, so the node count would
    depend on the machine's load: ``never`` gives the 39-node unfused graph, ``always`` the 25-node fused one).
    """
    import onnx_ir as ir

    from edgepipe.passes import PassContext, create
    from edgepipe.passes.autoquant import METHODS, quantized_nodes
    from edgepipe.passes.base import load
    from edgepipe.pipeline import build as b
    from edgepipe.recipe import load_recipe
    from edgepipe.sources.accuracy import resolve_metric
    from edgepipe.sources.source import load_source
    from edgepipe.targets import TARGETS, TargetContext

    recipe = load_recipe(ROOT / "models" / "minilm" / "recipe.yaml")
    calibration, eval_data = b._data_sources(recipe)
    source = load_source(recipe, work, eval_data[0][0])
    ev = b._evaluation(source, eval_data, calibration)
    target = TARGETS["cpu"]()
    tctx = TargetContext(recipe, recipe.targets["cpu"], calibration is not None)
    spec = target.accuracy(tctx)
    pctx = PassContext(workdir=work / "cpu", calibration=calibration, target="cpu")
    pctx.evaluate, pctx.accept = b._evaluator(target, spec, resolve_metric(spec.metric, recipe.base_dir), ev, work / "candidates")
    chain = target.variants(tctx)[0].passes
    chain = [{**p, "keep": fuse} if p["name"] == "fuse.transformer" else p for p in chain]
    at = next(i for i, p in enumerate(chain) if p["name"] == "quantize.auto")
    model, _ = b._run_passes(chain[:at], pctx, load(source.onnx_path), lambda m: print(m, flush=True))
    config = create(chain[at], pctx).config
    inner = METHODS[config.method]
    quantized = inner(inner.Config(**config.options), pctx)(model).model
    fproto, qproto = ir.to_proto(model), ir.to_proto(quantized)
    return fproto, qproto, quantized_nodes(fproto, qproto, config.candidate_ops), pctx.evaluate, config


def measure(fproto, qproto, nodes, evaluate, config, ray_rows: list[str]) -> tuple[list, float, list[str]]:
    """Rows (setup, seconds, note) of the ranking step run every way; the base run's seconds; the ranking."""
    import ray

    from edgepipe.core.fanout import ProcessMap, RayMap, local_map
    from edgepipe.passes.autoquant import keep_float, rank, sensitivity

    n, names = config.sensitivity_samples, [node.name for node in nodes]
    start = time.perf_counter()
    base = evaluate(keep_float(qproto, fproto, []), samples=n)
    run_seconds = time.perf_counter() - start  # what quantize.auto estimates the work from
    rows, first = [], None
    setups = [("in-process, ORT default threads (a local build)", evaluate, lambda: local_map),
              ("in-process, ORT 1 thread", dataclasses.replace(evaluate, threads=1), lambda: local_map),
              ("process pool, 2 workers × 1 thread", evaluate, lambda: ProcessMap(2))]
    setups += [(f"ray, 2 local workers × 1 thread, {how}", evaluate, RayMap) for how in ray_rows]
    for label, ev, make in setups:
        if label.startswith("ray") and not ray.is_initialized():
            start = time.perf_counter()
            ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
            rows.append(("ray.init (once, not in the rows below)", time.perf_counter() - start, ""))
        start = time.perf_counter()
        scores, fanout = sensitivity(qproto, fproto, names, ev, n, make(), run_seconds)
        seconds = time.perf_counter() - start
        order = [r["node"] for r in rank(fproto, nodes, scores, base, config.rank)]
        first = first or (scores, order)
        note = f"{fanout['tasks']} tasks on {len(set(fanout['workers']))} workers; " if fanout else ""
        note += f"scores bit-identical: {'yes' if scores == first[0] else 'NO'}, ranking identical: {'yes' if order == first[1] else 'NO'}"
        rows.append((label, seconds, note))
        print(f"  {label}: {seconds:.2f} s", flush=True)
    return rows, run_seconds, first[1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=None, help="eval sentences per run (default: the recipe's sensitivity_samples, 32)")
    ap.add_argument("--fuse", choices=["never", "always", "both"], default="both")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import ray

    print(f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}, python {sys.version.split()[0]}", flush=True)
    tables = []
    with tempfile.TemporaryDirectory(prefix="sens-bench-") as tmp:
        chains = [("never", ["cold", "warm"]), ("always", ["warm"])] if args.fuse == "both" else [(args.fuse, ["cold", "warm"])]
        for fuse, ray_rows in chains:
            start = time.perf_counter()
            (Path(tmp) / fuse).mkdir()
            fproto, qproto, nodes, evaluate, config = prepare(Path(tmp) / fuse, fuse)
            if args.samples:
                config = config.model_copy(update={"sensitivity_samples": args.samples})
            print(f"prepared in {time.perf_counter() - start:.1f} s: {len(nodes)} quantized nodes", flush=True)
            rows, run_seconds, order = measure(fproto, qproto, nodes, evaluate, config, ray_rows)
            title = "unfused" if fuse == "never" else "fused"
            tables.append((f"{title} graph (fuse.transformer keep: {fuse}): {len(nodes)} nodes × {config.sensitivity_samples} sentences, "
                           f"one run {run_seconds:.2f} s", rows, order))
        ray.shutdown()
    for title, rows, order in tables:
        default, single = rows[0][1], rows[1][1]
        print(f"\nsensitivity ranking, MiniLM cpu chain, {title}")
        print(f"{'setup':<52} {'seconds':>8} {'vs default':>11} {'vs 1 thread':>12}  note")
        for label, seconds, note in rows:
            ratios = ("", "") if "init" in label else (f"{default / seconds:.2f}×", f"{single / seconds:.2f}×")
            print(f"{label:<52} {seconds:8.2f} {ratios[0]:>11} {ratios[1]:>12}  {note}")
        print(f"most sensitive first: {order[:3]}")
    print("\n2 cores: ≤ 2× is the ceiling for any fan-out here.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
