"""Installed-style factories for the ``package.module:function`` form (tests put this folder on sys.path)."""

from __future__ import annotations

import torch
from torch import nn


def mlp(features: int = 6, hidden: int = 8, classes: int = 3) -> nn.Module:
    """A small MLP; the keyword arguments come from the recipe's ``model.args``."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(features, hidden), nn.ReLU(), nn.Linear(hidden, classes)).eval()


def zero_head(features: int = 6, classes: int = 4) -> nn.Module:
    """A model whose last layer is zero-initialised (a fresh classifier head): every output is the same."""
    torch.manual_seed(0)
    head = nn.Linear(16, classes)
    nn.init.zeros_(head.weight)
    nn.init.zeros_(head.bias)
    return nn.Sequential(nn.Linear(features, 16), nn.ReLU(), head).eval()


def outlier_mlp() -> nn.Module:
    """An MLP whose hidden layer has one channel 300x the others: per-tensor int8 of that activation loses the rest.

    The next layer reads the outlier channel with a 1/300 weight, so it matters no more than the others in float.
    """
    torch.manual_seed(0)
    first, second = nn.Linear(8, 16), nn.Linear(16, 4)
    with torch.no_grad():
        first.weight[0] *= 300.0
        first.bias[0] = 300.0
        second.weight[:, 0] /= 300.0
    return nn.Sequential(first, nn.ReLU(), second, nn.Tanh(), nn.Linear(4, 4)).eval()



def outlier_deep_mlp() -> nn.Module:
    """Four ordinary layers, then ``outlier_mlp``: keeping the few nodes around the outlier in float recovers it,
    the rest stays int8 (the budget fallback's quantize.auto within half the nodes)."""
    torch.manual_seed(1)
    layers: list[nn.Module] = []
    for _ in range(2):
        layers += [nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8)]
    return nn.Sequential(*layers, *outlier_mlp()).eval()
