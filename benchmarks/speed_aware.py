"""Speed-aware cpu/mobile int8 on torchvision CNNs: float vs plain int8 vs what edgepipe ships, one run.

Setup (torchvision only in a throwaway venv that sees the project's env):
  python3 -m venv /tmp/tvp && echo "import site; site.addsitedir('$PWD/.venv/lib/python3.11/site-packages')" \
    > /tmp/tvp/lib/python3.11/site-packages/zz.pth && /tmp/tvp/bin/pip install --no-deps torchvision==0.28.0
Run: /tmp/tvp/bin/python benchmarks/speed_aware.py [--arch mobilenet_v3_small efficientnet_b0]
Three builds per model (cpu + mobile each): float (no quantize pass), plain int8 (speed check off), the
default (speed check on); then the three artifacts of each target timed interleaved (batch 1, medians).
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
from pathlib import Path

import yaml

from edgepipe.pipeline.build import build
from edgepipe.recipe import load_recipe
from edgepipe.targets import TARGETS
from edgepipe.targets.speed import time_artifacts

HERE = Path(__file__).resolve().parent
FLOAT = {"cpu": [{"name": "cleanup"}, {"name": "optimize.ort", "level": "basic"}],
         "mobile": [{"name": "cleanup"}, {"name": "optimize.ort", "level": "basic"}]}


def recipe(folder: Path, arch: str, chains: dict | None) -> Path:
    targets = {t: ({"passes": chains[t]} if chains else {}) for t in ("cpu", "mobile")}
    text = {
        "name": arch,
        "model": {"torch": f"{HERE / 'tv' / 'models.py'}:{arch}"},
        "inputs": [{"name": "image", "shape": ["batch", 3, 224, 224], "dtype": "float32"}],
        "data": {"calibration": f"{HERE / 'tv' / 'models.py'}:calibration", "eval": f"{HERE / 'tv' / 'models.py'}:evaluation"},
        "accuracy": {"metric": "cosine", "min_value": 0.0},
        "targets": targets,
    }
    path = folder / f"{arch}-{'float' if chains else 'int8'}.yaml"
    path.write_text(yaml.safe_dump(text), encoding="utf-8")
    return path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", nargs="+", default=["mobilenet_v3_small", "efficientnet_b0"])
    ap.add_argument("--seconds", type=float, default=8.0)
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    work = Path(tempfile.mkdtemp(prefix="speed-aware-"))
    rows = ["| model | target | float p50 ms | plain int8 ms (speed-up) | shipped ms (speed-up) | shipped |", "|---|---|---:|---:|---:|---|"]
    for arch in args.arch:
        out = {}
        for kind in ("float", "plain", "shipped"):
            path = recipe(work, arch, FLOAT if kind == "float" else None)
            for t in ("cpu", "mobile"):
                TARGETS[t].speed_checked = kind != "plain"
            out[kind] = work / kind
            results = build(load_recipe(path), out[kind], force=True)
            assert all(r.passed for r in results), [r.error for r in results]
        for t in ("cpu", "mobile"):
            files = [json.loads((out[k] / arch / t / "manifest.json").read_text())["model_file"] for k in out]
            paths = [out[k] / arch / t / f for k, f in zip(out, files, strict=True)]
            f_ms, p_ms, s_ms = time_artifacts(paths, TARGETS[t](), _sample(), seconds=args.seconds)
            manifest = json.loads((out["shipped"] / arch / t / "manifest.json").read_text())
            speed = next((p["stats"]["speed"] for p in manifest["passes"] if "speed" in p.get("stats", {})), {})
            rows.append(f"| {arch} | {t} | {f_ms:.3f} | {p_ms:.3f} ({f_ms / p_ms:.2f}×) | {s_ms:.3f} ({f_ms / s_ms:.2f}×) | {speed.get('choice', '?')} |")
            print(rows[-1], flush=True)
    print("\n".join(rows))


def _sample() -> dict:
    import sys

    sys.path.insert(0, str(HERE / "tv"))
    import models  # noqa: PLC0415

    return {"image": models.images(1, 7)}


if __name__ == "__main__":
    main()
