"""torchvision architectures (random weights, BatchNorm statistics set on the calibration images) for benchmarks.

Needs torchvision 0.28 in a throwaway venv beside the test env (see benchmarks/speed_aware.py): its PyPI
build's compiled ops do not load with the CPU torch, the model definitions do not need them.
"""

from __future__ import annotations

import os

import numpy as np
import torch
import torch.library

SIZE = int(os.environ.get("TV_SIZE", 224))  # smaller images for CPU fine-tuning benchmarks


def _torchvision():
    register = torch.library.register_fake

    def tolerant(*args, **kwargs):  # the fake kernels of ops that did not load: skip them
        decorate = register(*args, **kwargs)

        def apply(fn):
            try:
                return decorate(fn)
            except RuntimeError:
                return fn
        return apply

    torch.library.register_fake = tolerant
    try:
        import torchvision.models as tvm
    finally:
        torch.library.register_fake = register
    return tvm


def images(n: int, seed: int) -> np.ndarray:
    """Smooth random images (low-frequency noise upsampled), normalized like ImageNet inputs."""
    rng = np.random.default_rng(seed)
    low = torch.from_numpy(rng.standard_normal((n, 3, 14, 14)).astype(np.float32))
    return torch.nn.functional.interpolate(low, size=SIZE, mode="bilinear").numpy()


def build(arch: str) -> torch.nn.Module:
    torch.manual_seed(0)
    model = getattr(_torchvision(), arch)(weights=None)
    model.train()  # BatchNorm running statistics from real forward passes, not the identity defaults
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.momentum = None  # cumulative average
    with torch.no_grad():
        for seed in range(4):
            model(torch.from_numpy(images(8, 100 + seed)))
    return model.eval()


def calibration():
    for seed in range(4):
        yield {"image": images(8, seed)}


def evaluation():
    for seed in range(2):
        yield {"image": images(8, 50 + seed)}, None


def resnet18() -> torch.nn.Module:
    return build("resnet18")


def mobilenet_v2() -> torch.nn.Module:
    return build("mobilenet_v2")


def mobilenet_v3_small() -> torch.nn.Module:
    return build("mobilenet_v3_small")


def efficientnet_b0() -> torch.nn.Module:
    return build("efficientnet_b0")


def densenet121() -> torch.nn.Module:
    return build("densenet121")


def training():
    """More images of the same kind for recovery fine-tuning (disjoint seeds from calibration and eval)."""
    for seed in range(32):
        yield {"image": images(8, 1000 + seed)}
