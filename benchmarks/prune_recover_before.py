"""The recovery before re-estimation and feature matching (commit c6a383e) on the trained digits ResNet-18.

Same model, calibration (first 256 training images) and held-out images (497) as
benchmarks/prune_recover.py resnet18_digits, 30 % of the channels. Setup: the old tree beside this one,
and a throwaway venv whose editable finder points at it:
  git archive c6a383e | tar -x -C /tmp/recover-old
  (a copy of the torchvision venv with __editable___edgepipe_0_1_0_finder.py's paths set to /tmp/recover-old)
Run: EP=8 PY benchmarks/prune_recover_before.py LR [LR ...]
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import numpy as np
import onnx_ir as ir
import onnxruntime as ort

from edgepipe.passes.base import PassContext, load
from edgepipe.passes.prune_structured import PruneStructured

sys.path.insert(0, str(Path(__file__).resolve().parent / "tv"))
import digits_resnet as D  # noqa: E402


def main() -> None:
    epochs = int(os.environ.get("EP", 8))
    x, _ = D.images()
    batches, held = [x[i:i + 16] for i in range(0, 256, 16)], x[D.SPLIT:]
    model = load("/tmp/edgepipe-tv/resnet18_digits32.onnx")  # exported by benchmarks/prune_recover.py

    def run(m: ir.Model) -> np.ndarray:
        return ort.InferenceSession(ir.to_proto(m).SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"image": held})[0]

    def cos(a: np.ndarray, b: np.ndarray) -> float:
        return float(np.mean((a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)))

    ref = run(model)
    ctx = PassContext(workdir=Path("/tmp/recover-old-work"), calibration=lambda: ({"image": b} for b in batches))
    for lr in map(float, sys.argv[1:]):
        start = time.time()
        config = PruneStructured.Config(sparsity=0.3, recover_epochs=epochs, recover_lr=lr, recover_loss="mse")
        r = PruneStructured(config, ctx)(model)
        print(f"before, {epochs} epochs, lr {lr:g}: held-out cosine {cos(run(r.model), ref):.4f}, "
              f"calibration {r.stats['recover']['calibration_cosine']}, {time.time() - start:.0f} s", flush=True)


if __name__ == "__main__":
    main()
