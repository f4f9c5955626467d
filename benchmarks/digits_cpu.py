"""Digits CNN on ORT CPU: fp32 vs edgepipe's int8 artifact, measured side by side in one run.

usage: .venv/bin/python benchmarks/digits_cpu.py [--threads 2] [--runs 300]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import yaml

from edgepipe.core.artifact import load_golden
from edgepipe.core.bench import latency, resize_batch
from edgepipe.core.runtime import Runner
from edgepipe.pipeline.build import build
from edgepipe.recipe import parse_recipe

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "models" / "digits" / "recipe.yaml"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=300)
    args = ap.parse_args()
    data = yaml.safe_load(RECIPE.read_text())
    variants = {
        "fp32 (cleanup only)": {"passes": [{"name": "cleanup"}, {"name": "optimize.ort"}]},
        "int8 (cpu default)": {},
    }
    out = Path(tempfile.mkdtemp(prefix="bench-digits-"))
    rows = []
    for label, spec in variants.items():
        recipe = parse_recipe({**data, "name": "bench", "targets": {"cpu": spec}}, RECIPE.parent)
        (result,) = build(recipe, out / label.split()[0], force=True)
        m = result.manifest
        runner = Runner(result.folder / m["model_file"], threads=args.threads)
        inputs, _, _ = load_golden(result.folder / "golden.npz")
        lat = {b: latency(runner, resize_batch(inputs, b), warmup=20, runs=args.runs) for b in (1, 64)}
        rows.append((label, m["size"]["model_bytes"], m["accuracy"]["value"], lat[1]["p50_ms"], lat[64]["p50_ms"]))
    base = rows[0]
    print("| variant | bytes | top-1 (test split) | p50 b1 ms | p50 b64 ms | size × | b1 speed-up | b64 speed-up |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for label, size, acc, b1, b64 in rows:
        print(f"| {label} | {size:,} | {acc:.4f} | {b1:.4f} | {b64:.4f} | {size / base[1]:.2f} | {base[3] / b1:.2f} | {base[4] / b64:.2f} |")
    print(json.dumps({"threads": args.threads, "runs": args.runs}))


if __name__ == "__main__":
    main()
