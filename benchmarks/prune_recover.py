"""Recovery after prune.structured: a pruned torchvision model's cosine to the unpruned one, one-shot vs fine-tuned.

Setup: the throwaway torchvision venv of benchmarks/speed_aware.py; the model exported once with edgepipe
(cached under /tmp/edgepipe-tv). Run:
  TV_SIZE=64 /tmp/tvp/bin/python benchmarks/prune_recover.py resnet18 EPOCHS IMAGES LR LOSS
Calibration (training) images and the 32 held-out eval images are disjoint draws of the same smooth noise.
"""

from __future__ import annotations

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
import models  # noqa: E402


def exported(arch: str) -> ir.Model:
    cache = Path(f"/tmp/edgepipe-tv/{arch}{models.SIZE}.onnx")
    if not cache.is_file():
        cache.parent.mkdir(parents=True, exist_ok=True)
        recipe = parse_recipe({"name": arch, "model": {"torch": f"models.py:{arch}"}, "targets": ["cpu"],
                               "inputs": [{"name": "image", "shape": ["batch", 3, models.SIZE, models.SIZE], "dtype": "float32"}]}, HERE / "tv")
        source = export_torch(recipe, cache.parent / arch, {"image": models.images(2, 3)})
        save(PASSES["cleanup"]()(load(source.onnx_path)).model, cache)
    return load(cache)


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.mean((a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)))


def main() -> None:
    arch, epochs, n, lr, loss = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4]), sys.argv[5]
    model = exported(arch)
    context = PassContext(workdir=Path("/tmp/edgepipe-tv/work"), calibration=lambda: ({"image": models.images(16, 1000 + s)} for s in range(n // 16)))
    x = models.images(32, 5)

    def run(m: ir.Model) -> np.ndarray:
        return ort.InferenceSession(ir.to_proto(m).SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"image": x})[0]

    reference = run(model)
    for ep in (0, epochs):
        start = time.time()
        config = PruneStructured.Config(sparsity=0.3, recover_epochs=ep, recover_lr=lr, recover_loss=loss)
        result = PruneStructured(config, context)(model)
        removed = 1 - model_stats(result.model)["params"] / model_stats(model)["params"]
        print(f"| {arch} {models.SIZE}px | {ep} | {n if ep else '-'} | {loss if ep else '-'} | {removed:.1%} | "
              f"{cosine(run(result.model), reference):.4f} | {result.stats.get('recover', {}).get('calibration_cosine', '-')} | {time.time() - start:.0f} s |", flush=True)


if __name__ == "__main__":
    main()
