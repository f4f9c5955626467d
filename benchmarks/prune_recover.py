"""Recovery after prune.structured at 30 %: a pruned ResNet-18's cosine to the unpruned one, one-shot vs recovered.

Setup: a throwaway venv with torchvision 0.28 beside the test env (benchmarks/tv/models.py), importing this
worktree's edgepipe. The model is exported once with edgepipe (cached under /tmp/edgepipe-tv). Run:
  TV_SIZE=64 PY benchmarks/prune_recover.py resnet18 EPOCHS IMAGES LR [--no-adapt] [--no-features] [--no-augment] [--loss mse]
  PY benchmarks/prune_recover.py resnet18_digits EPOCHS IMAGES LR [...]
resnet18: random weights (BatchNorm statistics from smooth-noise images), calibration and the 32 held-out
images disjoint draws of the same noise. resnet18_digits: trained on scikit-learn digits at 32x32
(benchmarks/tv/digits_resnet.py); calibration = the first IMAGES training images, held out = the 497
test images. One row: params removed, held-out cosine, recovery stats, seconds.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import onnx_ir as ir
import onnxruntime as ort

from edgepipe.passes import PASSES
from edgepipe.passes.base import PassContext, load, model_stats, save
from edgepipe.passes.prune_structured import PruneStructured
from edgepipe.recipe import parse_recipe
from edgepipe.sources.export import export_torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE / "tv"))
import digits_resnet  # noqa: E402

import models  # noqa: E402


def exported(arch: str, size: int, example: np.ndarray) -> ir.Model:
    cache = Path(f"/tmp/edgepipe-tv/{arch}{size}.onnx")
    if not cache.is_file():
        (cache.parent / arch).mkdir(parents=True, exist_ok=True)
        module = "digits_resnet" if arch == "resnet18_digits" else "models"
        recipe = parse_recipe({"name": arch, "model": {"torch": f"{module}.py:{arch}"}, "targets": ["cpu"],
                               "inputs": [{"name": "image", "shape": ["batch", 3, size, size], "dtype": "float32"}]}, HERE / "tv")
        source = export_torch(recipe, cache.parent / arch, {"image": example})
        save(PASSES["cleanup"]()(load(source.onnx_path)).model, cache)
    return load(cache)


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.mean((a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)))


def data(arch: str, n: int) -> tuple[list[np.ndarray], np.ndarray, int]:
    """Calibration batches (n images), held-out images, image side."""
    if arch == "resnet18_digits":
        x, _ = digits_resnet.images()
        return [x[i:i + 16] for i in range(0, n, 16)], x[digits_resnet.SPLIT:], digits_resnet.SIZE
    return [models.images(16, 1000 + s) for s in range(n // 16)], models.images(32, 5), models.SIZE


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("arch", choices=["resnet18", "resnet18_digits"])
    ap.add_argument("epochs", type=int)
    ap.add_argument("images", type=int)
    ap.add_argument("lr", type=float)
    ap.add_argument("--loss", default="mse")
    ap.add_argument("--sparsity", type=float, default=0.3)
    for flag in ("adapt", "features", "augment"):
        ap.add_argument(f"--no-{flag}", dest=flag, action="store_false")
    args = ap.parse_args()
    batches, held_out, size = data(args.arch, args.images)
    model = exported(args.arch, size, batches[0][:2])
    context = PassContext(workdir=Path("/tmp/edgepipe-tv/work"), calibration=lambda: ({"image": b} for b in batches))

    def run(m: ir.Model) -> np.ndarray:
        return ort.InferenceSession(ir.to_proto(m).SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"image": held_out})[0]

    reference = run(model)
    start = time.time()
    config = PruneStructured.Config(sparsity=args.sparsity, recover_epochs=args.epochs, recover_lr=args.lr, recover_loss=args.loss,
                                    recover_adapt=args.adapt, recover_features=args.features, recover_augment=args.augment)
    result = PruneStructured(config, context)(model)
    removed = 1 - model_stats(result.model)["params"] / model_stats(model)["params"]
    rec = result.stats.get("recover", {})
    what = ", ".join(f for f in ("adapt", "features", "augment") if getattr(args, f)) or "none"
    print(f"| {args.arch} {size}px | {args.epochs} | {args.images} | {args.lr:g} | {what} | {removed:.1%} | "
          f"{cosine(run(result.model), reference):.4f} | {rec.get('held_out_cosine', rec.get('calibration_cosine', '-'))} | "
          f"{rec.get('epochs', '-')} | {time.time() - start:.0f} s |", flush=True)


if __name__ == "__main__":
    main()
