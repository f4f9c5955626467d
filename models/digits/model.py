"""Small CNN for scikit-learn's 8x8 digits; weights in weights.pt (train with train())."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import torch
from torch import nn

HERE = Path(__file__).parent
WEIGHTS = HERE / "weights.pt"


class DigitsCNN(nn.Module):
    """Three conv blocks and a two-layer head: about 58k parameters at width 16."""

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        w = width
        self.features = nn.Sequential(
            nn.Conv2d(1, w, 3, padding=1),
            nn.BatchNorm2d(w),
            nn.ReLU(),
            nn.Conv2d(w, 2 * w, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),  # 8x8 -> 4x4
            nn.Conv2d(2 * w, 4 * w, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),  # 4x4 -> 2x2
        )
        self.head = nn.Sequential(
            nn.Flatten(),
            nn.Linear(4 * w * 4, 8 * w),
            nn.ReLU(),
            nn.Linear(8 * w, 10),
        )

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(image))


def _data():
    spec = importlib.util.spec_from_file_location("edgepipe_digits_data", HERE / "data.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def train(epochs: int = 30, width: int = 16, seed: int = 0) -> DigitsCNN:
    """Deterministic CPU training on the training split (a few seconds)."""
    torch.manual_seed(seed)
    x_tr, y_tr, _, _ = _data().split()
    model = DigitsCNN(width)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    x, y = torch.from_numpy(x_tr), torch.from_numpy(y_tr)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        model.train()
        for idx in torch.randperm(len(x), generator=gen).split(64):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    return model.eval()


def test_accuracy(model: nn.Module) -> float:
    _, _, x_te, y_te = _data().split()
    with torch.no_grad():
        pred = model(torch.from_numpy(x_te)).argmax(1).numpy()
    return float(np.mean(pred == y_te))


def build() -> nn.Module:
    """Recipe factory: the trained CNN in eval mode (trained and cached on first use)."""
    model = DigitsCNN()
    if not WEIGHTS.exists():
        torch.save(train().state_dict(), WEIGHTS)
    model.load_state_dict(torch.load(WEIGHTS, weights_only=True))
    return model.eval()


if __name__ == "__main__":
    trained = train()
    torch.save(trained.state_dict(), WEIGHTS)
    print(f"saved {WEIGHTS} (test top-1 {test_accuracy(trained):.4f})")
