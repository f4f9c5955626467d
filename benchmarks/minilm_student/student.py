"""The distilled 3-layer MiniLM student as a torch recipe source (until the hf source lands): factory and text data."""

from __future__ import annotations

import importlib.util
import os
import random
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from torch import nn

HERE = Path(__file__).resolve().parent
# Written by: python benchmarks/distill_minilm.py --out benchmarks/out/minilm-student
FOLDER = Path(os.environ.get("EDGEPIPE_MINILM_STUDENT", HERE.parent / "out" / "minilm-student"))
MAX_LEN = 48


class SentenceEmbedder(nn.Module):
    """Encoder → mean pooling over real tokens → L2 normalisation (what sentence-transformers returns)."""

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        return nn.functional.normalize(pooled, dim=-1)


def build() -> nn.Module:
    from transformers import AutoModel

    if not (FOLDER / "config.json").exists():
        raise FileNotFoundError(f"{FOLDER}: run benchmarks/distill_minilm.py --out {FOLDER} first")
    return SentenceEmbedder(AutoModel.from_pretrained(str(FOLDER))).eval()


def _texts() -> tuple[list[str], list[str]]:
    spec = importlib.util.spec_from_file_location("distill_minilm", HERE.parent / "distill_minilm.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    texts = bench.sentences()
    random.Random(0).shuffle(texts)  # the benchmark's split: the first 500 are held out
    return texts[500:], texts[:500]


def _batches(texts: list[str], batch: int) -> Iterator[dict[str, np.ndarray]]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(FOLDER))
    for i in range(0, len(texts), batch):
        enc = tokenizer(texts[i : i + batch], padding=True, truncation=True, max_length=MAX_LEN, return_tensors="np")
        yield {"input_ids": enc["input_ids"].astype(np.int64), "attention_mask": enc["attention_mask"].astype(np.int64)}


def calibration() -> Iterator[dict[str, np.ndarray]]:
    yield from _batches(_texts()[0][:64], 16)


def evaluation() -> Iterator[tuple[dict[str, np.ndarray], None]]:
    for batch in _batches(_texts()[1][:128], 32):
        yield batch, None
