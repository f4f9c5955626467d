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


class _Block(nn.Module):
    """A pre-norm transformer block: self-attention (softmax(q·kᵀ·scale)·v), then an MLP; both residual."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads, self.scale = heads, (dim // heads) ** -0.5
        self.ln1, self.qkv, self.proj = nn.LayerNorm(dim), nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.ln2, self.mlp = nn.LayerNorm(dim), nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        attn = ((q @ k.transpose(-2, -1)) * self.scale).softmax(-1)
        x = x + self.proj((attn @ v).transpose(1, 2).reshape(b, n, d))
        return x + self.mlp(self.ln2(x))


class TinyViT(nn.Module):
    """A vision transformer in miniature: a patch-embedding convolution on 3x16x16 images, position embeddings,
    ``layers`` transformer blocks, mean-pooled tokens → class logits. ``convs`` > 0: a hybrid, that many 3x3
    convolutions after the embedding (the compute of MaxViT / MobileViT is mostly convolutions)."""

    def __init__(self, dim: int = 32, heads: int = 2, layers: int = 2, classes: int = 10, convs: int = 0) -> None:
        super().__init__()
        self.embed = nn.Conv2d(3, dim, 4, 4)
        self.convs = nn.Sequential(*(m for _ in range(convs) for m in (nn.Conv2d(dim, dim, 3, padding=1), nn.ReLU())))
        self.pos = nn.Parameter(torch.randn(1, 16, dim) * 0.02)
        self.blocks = nn.Sequential(*(_Block(dim, heads) for _ in range(layers)))
        self.norm, self.head = nn.LayerNorm(dim), nn.Linear(dim, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.convs(self.embed(x)).flatten(2).transpose(1, 2) + self.pos
        return self.head(self.norm(self.blocks(x)).mean(1))


def tiny_vit(convs: int = 0) -> nn.Module:
    torch.manual_seed(0)
    return TinyViT(convs=convs).eval()
