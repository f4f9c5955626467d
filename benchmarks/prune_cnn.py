"""prune.structured at 30 % on torchvision CNNs through `edgepipe build` + `edgepipe verify`; optional recovery.

Setup: the throwaway torchvision venv of benchmarks/speed_aware.py.
Run: /tmp/tvp/bin/python benchmarks/prune_cnn.py [--arch resnet18 mobilenet_v2 densenet121] [--recover-epochs N]
Random weights (BatchNorm statistics from the calibration images), cpu target, float chain
[cleanup, prune.structured, optimize.ort] so the table shows pruning alone; parameters before/after from
the manifest's pass stats, cosine against the unpruned model on held-out images (eval data).
TV_SIZE=64 sets the image size (fine-tuning on CPU).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import yaml

from edgepipe.cli import main as cli
from edgepipe.pipeline.build import build
from edgepipe.recipe import load_recipe

HERE = Path(__file__).resolve().parent


def recipe(folder: Path, arch: str, size: int, sparsity: float, epochs: int, lr: float) -> Path:
    prune = {"name": "prune.structured", "sparsity": sparsity}
    if epochs:
        prune.update(recover_epochs=epochs, recover_lr=lr)
    models = HERE / "tv" / "models.py"
    text = {
        "name": arch,
        "model": {"torch": f"{models}:{arch}"},
        "inputs": [{"name": "image", "shape": ["batch", 3, size, size], "dtype": "float32"}],
        "data": {"calibration": f"{models}:{'training' if epochs else 'calibration'}", "eval": f"{models}:evaluation"},
        "accuracy": {"metric": "cosine", "min_value": 0.0, "outputs_min_cosine": -1.0},  # measure, do not gate
        "targets": {"cpu": {"passes": [{"name": "cleanup"}, prune, {"name": "optimize.ort", "level": "basic"}]}},
    }
    path = folder / f"{arch}.yaml"
    path.write_text(yaml.safe_dump(text), encoding="utf-8")
    return path


def main() -> None:
    import os

    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", nargs="+", default=["resnet18", "mobilenet_v2", "densenet121"])
    ap.add_argument("--sparsity", type=float, default=0.3)
    ap.add_argument("--recover-epochs", type=int, default=0)
    ap.add_argument("--lr", type=float, default=3e-4)
    args = ap.parse_args()
    size = int(os.environ.get("TV_SIZE", 224))
    work = Path(tempfile.mkdtemp(prefix="prune-cnn-"))
    rows = ["| model | params before | after | removed | cosine vs unpruned (eval) | recovery | verify |", "|---|---:|---:|---:|---:|---|---|"]
    for arch in args.arch:
        path = recipe(work, arch, size, args.sparsity, args.recover_epochs, args.lr)
        [result] = build(load_recipe(path), work / "out", force=True)
        m = result.manifest
        prune = next(p for p in m["passes"] if p["name"] == "prune.structured")
        before, after = prune["stats"]["before"]["params"], prune["stats"]["after"]["params"]
        rec = prune["stats"].get("recover", {})
        rec = rec.get("held_out_cosine", rec.get("calibration_cosine", "-"))
        ok = cli(["verify", str(work / "out" / arch / "cpu")]) == 0
        rows.append(f"| {arch} | {before:,} | {after:,} | {1 - after / before:.1%} | {m['accuracy']['value']:.4f} | {rec} | {'ok' if ok else 'FAILED'} |")
        print(rows[-1], flush=True)
    print("\n".join(rows))


if __name__ == "__main__":
    main()
