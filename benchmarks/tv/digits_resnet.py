"""A torchvision ResNet-18 with learned weights, trained here in a few minutes: scikit-learn's digits, 32x32.

No pretrained weights are reachable offline, and a random-weight network is a function with no structure
for a pruned copy to keep; a trained one is what users prune. The 1797 8x8 digits are upsampled
(bilinear) to 32x32, grey → 3 channels, standardized; images 0-1299 train the network (and are the
calibration data), 1300-1797 are held out (eval). Weights cached in /tmp/edgepipe-tv/resnet18_digits.pt.
Needs torchvision (benchmarks/tv/models.py's throwaway venv). Run once to train and print its accuracy:
  /tmp/recover-tv-venv/bin/python benchmarks/tv/digits_resnet.py
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits

SIZE = 32
SPLIT = 1300
CACHE = Path(os.environ.get("DIGITS_RESNET", "/tmp/edgepipe-tv/resnet18_digits.pt"))


def images() -> tuple[np.ndarray, np.ndarray]:
    digits = load_digits()
    x = torch.from_numpy(digits.images.astype(np.float32) / 16.0)[:, None]
    x = F.interpolate(x, size=SIZE, mode="bilinear", align_corners=False).repeat(1, 3, 1, 1)
    x = (x - 0.3) / 0.4
    return x.numpy(), digits.target.astype(np.int64)


def _net() -> torch.nn.Module:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import models  # benchmarks/tv/models.py: torchvision without its compiled ops

    torch.manual_seed(0)
    return models._torchvision().resnet18(weights=None, num_classes=10)


def train(epochs: int = 6) -> torch.nn.Module:
    x, y = images()
    net = _net()
    opt = torch.optim.AdamW(net.parameters(), lr=2e-3, weight_decay=1e-4)
    steps = epochs * -(-SPLIT // 64)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps)
    gen = torch.Generator().manual_seed(0)
    xt, yt = torch.from_numpy(x[:SPLIT]), torch.from_numpy(y[:SPLIT])
    for epoch in range(epochs):
        net.train()
        start = time.time()
        for idx in torch.randperm(SPLIT, generator=gen).split(64):
            loss = F.cross_entropy(net(xt[idx]), yt[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        print(f"epoch {epoch + 1}: loss {loss.item():.4f}, held-out top-1 {accuracy(net):.4f} ({time.time() - start:.0f} s)", flush=True)
    return net.eval()


def accuracy(net: torch.nn.Module) -> float:
    x, y = images()
    net.eval()
    with torch.no_grad():
        return float((net(torch.from_numpy(x[SPLIT:])).argmax(1).numpy() == y[SPLIT:]).mean())


def resnet18_digits() -> torch.nn.Module:
    net = _net()
    net.load_state_dict(torch.load(CACHE))
    return net.eval()


def calibration():
    x, _ = images()
    for i in range(0, 256, 32):
        yield {"image": x[i:i + 32]}


def training():
    """Every training image (1300) for recovery fine-tuning."""
    x, _ = images()
    for i in range(0, SPLIT, 50):
        yield {"image": x[i:i + 50]}


def evaluation():
    x, y = images()
    for i in range(SPLIT, len(x), 100):
        yield {"image": x[i:i + 100]}, y[i:i + 100]


if __name__ == "__main__":
    torch.set_num_threads(1)
    CACHE.parent.mkdir(parents=True, exist_ok=True)
    torch.save(train().state_dict(), CACHE)
    print(f"saved {CACHE}: held-out top-1 {accuracy(resnet18_digits()):.4f}")
