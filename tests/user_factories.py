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
