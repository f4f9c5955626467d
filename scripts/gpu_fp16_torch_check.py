"""Run an fp16 gpu artifact's model.onnx with CUDA fp16 kernels (via onnx2torch) and compare with its golden outputs.

A stop-gap for machines with a GPU but no onnxruntime-gpu: ORT's CPU provider upcasts fp16, so an
overflow inside real fp16 kernels can only show on a GPU. Needs torch with CUDA, torchvision and
onnx2torch (not project dependencies).

usage: python scripts/gpu_fp16_torch_check.py cuda OUT/<name>/gpu [more artifact folders]
"""

from __future__ import annotations

import sys

import numpy as np
import onnx
import torch
from onnx2torch import convert


def check(folder: str, device: str) -> None:
    model = onnx.load(f"{folder}/model.onnx")
    golden = np.load(f"{folder}/golden.npz", allow_pickle=False)
    inputs = {k.split("/", 1)[1]: golden[k] for k in golden.files if k.startswith("input/")}
    try:
        module = convert(model).to(device).eval()
    except NotImplementedError as exc:  # onnx2torch lacks some ops (e.g. Cast-19)
        print(f"{folder}: not convertible: {exc}")
        return
    with torch.no_grad():
        out = module(*[torch.from_numpy(inputs[i.name]).to(device) for i in model.graph.input])
    outs = out if isinstance(out, list | tuple) else [out]
    for got, key in zip(outs, [k for k in golden.files if k.startswith("expected/")], strict=False):
        a, b = got.float().cpu().numpy(), golden[key]
        cos = (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)
        print(f"{folder} {device} {key}: finite {bool(np.isfinite(a).all())}, max |diff| {np.abs(a - b).max():.3g}, cosine min {cos.min():.6f}")


if __name__ == "__main__":
    for artifact in sys.argv[2:]:
        check(artifact, sys.argv[1])
