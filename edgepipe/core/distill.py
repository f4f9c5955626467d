"""Knowledge distillation before export: shrink a teacher into a student and train it on the teacher's outputs."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from edgepipe.core.errors import BadInput

Batch = dict[str, torch.Tensor]
Forward = Callable[[nn.Module, Batch], torch.Tensor]
LOSSES = ("kl", "mse", "cosine")
KNN = 10

logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- shrink helpers


def param_count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_NORM = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def shrink_width(teacher: nn.Module, factor: float, example: tuple[torch.Tensor, ...]) -> nn.Module:
    """The teacher's architecture with every hidden Conv/Linear width scaled by ``factor`` (fresh weights).

    Works on chains where modules are declared in data-flow order (Conv → BatchNorm → … → Flatten →
    Linear); the model's input channels and its last layer's outputs are kept. Anything else (branches,
    grouped convs, reshapes the chain cannot follow) is a BadInput asking for a student factory.
    """
    student = copy.deepcopy(teacher)
    layers = [(n, m) for n, m in student.named_modules() if isinstance(m, _CONV + _NORM + (nn.Linear,))]
    weighted = [n for n, m in layers if not isinstance(m, _NORM)]
    if not weighted:
        raise BadInput("distill.shrink.width: the model has no Conv/Linear layers to shrink; give distill.student: path.py:function")
    old = new = None  # channels flowing out of the previous weighted layer (teacher, student)
    for name, m in layers:
        if isinstance(m, _NORM):
            if m.num_features != old:
                raise _unsupported(name)
            repl: nn.Module = type(m)(new, eps=m.eps, momentum=m.momentum, affine=m.affine, track_running_stats=m.track_running_stats)
        else:
            last = name == weighted[-1]
            if isinstance(m, _CONV):
                if m.groups != 1 or (old is not None and m.in_channels != old):
                    raise _unsupported(name)
                cin = m.in_channels if old is None else new
                cout = m.out_channels if last else max(1, round(m.out_channels * factor))
                repl = type(m)(cin, cout, m.kernel_size, m.stride, m.padding, m.dilation, 1, m.bias is not None, m.padding_mode)
                old, new = m.out_channels, cout
            else:
                if old is None or m.in_features == old:
                    fin = m.in_features if old is None else new
                elif m.in_features % old == 0:  # flattened feature map: channels × spatial
                    fin = new * (m.in_features // old)
                else:
                    raise _unsupported(name)
                fout = m.out_features if last else max(1, round(m.out_features * factor))
                repl = nn.Linear(fin, fout, bias=m.bias is not None)
                old, new = m.out_features, fout
        student.set_submodule(name, repl)
    with torch.no_grad():
        try:
            got, want = student.eval()(*example), teacher.eval()(*example)
        except RuntimeError as exc:
            raise _unsupported(f"the forward pass ({type(exc).__name__})") from None
    if _first(got).shape != _first(want).shape:
        raise _unsupported("the output shape")
    return student


def _unsupported(where: str) -> BadInput:
    return BadInput(
        f"distill.shrink.width cannot follow the model at {where} (it handles Conv/BatchNorm/Linear chains declared "
        "in data-flow order); give distill.student: path.py:function that builds the smaller model"
    )


def shrink_to_params(teacher: nn.Module, ratio: float, example: tuple[torch.Tensor, ...]) -> tuple[nn.Module, float]:
    """The widest ``shrink_width`` student with at most ``ratio`` × the teacher's parameters."""
    budget = ratio * param_count(teacher)
    lo, hi, best = 0.0, 1.0, None
    for _ in range(14):
        mid = (lo + hi) / 2
        candidate = shrink_width(teacher, mid, example)
        if param_count(candidate) <= budget:
            lo, best = mid, (candidate, mid)
        else:
            hi = mid
    if best is None:
        raise BadInput(f"distill.shrink.params: no width shrink reaches {ratio:g} of the teacher's parameters; raise it")
    return best


def layer_list(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The encoder's stack of transformer layers (the longest ModuleList, e.g. ``encoder.layer``)."""
    lists = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m) > 1]
    if not lists:
        raise BadInput("distill.shrink.layers: the model has no stack of layers (nn.ModuleList) to take layers from")
    return max(lists, key=lambda item: len(item[1]))


def pick_layers(total: int, keep: int | list[int]) -> list[int]:
    """Teacher layer indices to keep: a list as given, or ``keep`` evenly spaced from the first to the last.

    Keeping the last layer starts the student in the teacher's output space (MiniLM 6 → 3: [0, 3, 5]
    starts at cosine 0.65 to the teacher, every other [0, 2, 4] at 0.36); 12 → 6 gives DistilBERT's
    [0, 2, 4, 7, 9, 11].
    """
    if isinstance(keep, list):
        index = keep
    elif keep == 1:
        index = [total - 1]
    else:
        index = sorted({int(np.floor(x + 0.5)) for x in np.linspace(0, total - 1, keep)})
    if not index or any(i < 0 or i >= total for i in index) or len(set(index)) != len(index):
        raise BadInput(f"distill.shrink.layers: {keep} does not name distinct layers of the teacher's {total} (0..{total - 1})")
    return index


def shrink_layers(teacher: nn.Module, keep: int | list[int]) -> tuple[nn.Module, list[int]]:
    """A copy of a BERT-style encoder keeping only some layers, initialized from those teacher layers."""
    student = copy.deepcopy(teacher)
    name, stack = layer_list(student)
    index = pick_layers(len(stack), keep)
    student.set_submodule(name, nn.ModuleList([stack[i] for i in index]))
    config = getattr(student, "config", None)
    if config is not None and hasattr(config, "num_hidden_layers"):
        config.num_hidden_layers = len(index)
    return student, index


# ----------------------------------------------------------------------------- training


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    loss: str = "kl"
    temperature: float = 4.0
    epochs: int = 20
    lr: float = 2e-3
    batch_size: int = 64
    seed: int = 0
    threads: int = 2


@contextlib.contextmanager
def deterministic(seed: int, threads: int) -> Iterator[None]:
    """Seeded, single-configuration CPU math: fixed threads, deterministic kernels; restored afterwards."""
    prev_threads, prev_det = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    prev_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.manual_seed(seed)
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.set_num_threads(prev_threads)
        torch.use_deterministic_algorithms(prev_det, warn_only=prev_warn)


def positional(names: list[str]) -> Forward:
    """Call the module with the inputs in recipe order (as the exporter does); first output."""
    return lambda module, batch: _first(module(*[batch[n] for n in names]))


def mean_pooled(module: nn.Module, batch: Batch) -> torch.Tensor:
    """Sentence embedding of an HF encoder: mean of last_hidden_state over real tokens."""
    hidden = module(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)


def _first(out: Any) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, dict):
        return next(iter(out.values()))
    if hasattr(out, "last_hidden_state"):
        return out.last_hidden_state
    return out[0]


def stack_batches(batches: Iterable[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """One array per input (first axis = samples); ragged axes (sequence lengths) are zero-padded."""
    batches = list(batches)
    if not batches:
        raise BadInput("distill: the distillation data yielded no batches")
    out = {}
    for key in batches[0]:
        arrays = [np.asarray(b[key]) for b in batches]
        width = np.max([a.shape for a in arrays], axis=0)[1:]
        padded = [np.pad(a, [(0, 0)] + [(0, int(w - s)) for w, s in zip(width, a.shape[1:], strict=True)]) for a in arrays]
        out[key] = np.concatenate(padded)
    return out


def _trim(batch: Batch) -> Batch:
    """Drop padding columns beyond the longest sequence in this batch (speed only, same result)."""
    mask = batch.get("attention_mask")
    if mask is None or mask.ndim != 2:
        return batch
    length = int(mask.sum(1).max())
    return {k: (v[:, :length] if v.ndim == 2 and v.shape[1] == mask.shape[1] else v) for k, v in batch.items()}


def _batches(samples: dict[str, np.ndarray], size: int, order: list[torch.Tensor] | None = None) -> Iterator[tuple[torch.Tensor, Batch]]:
    n = len(next(iter(samples.values())))
    for idx in order if order is not None else torch.arange(n).split(size):
        yield idx, _trim({k: torch.from_numpy(np.ascontiguousarray(v[idx.numpy()])) for k, v in samples.items()})


def epoch_order(samples: dict[str, np.ndarray], size: int, gen: torch.Generator, bucket: int = 16) -> list[torch.Tensor]:
    """A seeded shuffle into batches; with an attention_mask, similar lengths share a batch (less padding).

    Each run of ``bucket`` shuffled batches is sorted by length before it is cut, then the batch
    order is shuffled again, so batches stay random but are trimmed to short lengths.
    """
    n = len(next(iter(samples.values())))
    perm = torch.randperm(n, generator=gen)
    mask = samples.get("attention_mask")
    if mask is None or mask.ndim != 2:
        return list(perm.split(size))
    lengths = torch.from_numpy(mask.sum(1))
    batches = []
    for chunk in perm.split(size * bucket):
        batches.extend(chunk[torch.argsort(lengths[chunk], stable=True)].split(size))
    return [batches[i] for i in torch.randperm(len(batches), generator=gen).tolist()]


def outputs(module: nn.Module, samples: dict[str, np.ndarray], forward: Forward, batch_size: int = 256) -> torch.Tensor:
    """The module's outputs on every sample, in order (eval mode, no grad)."""
    module.eval()
    with torch.no_grad():
        return torch.cat([forward(module, b) for _, b in _batches(samples, batch_size)])


def distill_loss(kind: str, student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL on temperature-softened logits (× T², Hinton et al.), MSE, or 1 - cosine per sample."""
    if kind == "kl":
        t = temperature
        log_p = F.log_softmax(student / t, dim=-1)
        return F.kl_div(log_p, F.log_softmax(teacher / t, dim=-1), log_target=True, reduction="batchmean") * t * t
    if kind == "mse":
        return F.mse_loss(student, teacher)
    if kind == "cosine":
        return (1 - F.cosine_similarity(student.flatten(1), teacher.flatten(1), dim=1)).mean()
    raise BadInput(f"distill.loss '{kind}' is unknown; use one of {', '.join(LOSSES)}")


def train(
    teacher: nn.Module, student: nn.Module, samples: dict[str, np.ndarray], forward: Forward, cfg: TrainConfig,
) -> list[float]:
    """Train ``student`` to match the teacher's outputs on ``samples``; returns the mean loss per epoch.

    Deterministic on CPU: seeded init is the caller's, the shuffle comes from a seeded generator,
    threads are fixed and kernels deterministic. The teacher's targets are computed once (eval mode).
    """
    history = []
    with deterministic(cfg.seed, cfg.threads):
        targets = outputs(teacher, samples, forward)
        opt = torch.optim.AdamW(student.parameters(), lr=cfg.lr, weight_decay=0.0)
        n = len(targets)
        steps = cfg.epochs * -(-n // cfg.batch_size)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=max(steps, 1), pct_start=0.1)
        gen = torch.Generator().manual_seed(cfg.seed)
        for epoch in range(cfg.epochs):
            student.train()
            total, start = 0.0, time.perf_counter()
            for idx, batch in _batches(samples, cfg.batch_size, epoch_order(samples, cfg.batch_size, gen)):
                loss = distill_loss(cfg.loss, forward(student, batch), targets[idx], cfg.temperature)
                opt.zero_grad()
                loss.backward()
                opt.step()
                sched.step()
                total += loss.item() * len(idx)
            history.append(total / n)
            if epoch == 0 or (epoch + 1) % max(1, cfg.epochs // 5) == 0:
                logger.info(f"  distill epoch {epoch + 1}/{cfg.epochs}: loss {history[-1]:.5f} ({time.perf_counter() - start:.1f}s/epoch)")
    student.eval()
    return history


# ----------------------------------------------------------------------------- metrics


def knn_overlap(student: np.ndarray, teacher: np.ndarray, k: int = KNN) -> float:
    """Mean share of each sample's k nearest neighbours (cosine, among the same samples) that agree."""
    k = min(k, len(teacher) - 1)
    if k < 1:
        return float("nan")

    def neighbours(x: np.ndarray) -> np.ndarray:
        x = x.reshape(len(x), -1).astype(np.float64)
        x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
        sim = x @ x.T
        np.fill_diagonal(sim, -np.inf)
        return np.argsort(-sim, axis=1, kind="stable")[:, :k]

    a, b = neighbours(student), neighbours(teacher)
    return float(np.mean([len(set(x) & set(y)) / k for x, y in zip(a, b, strict=True)]))


def compare_outputs(student: np.ndarray, teacher: np.ndarray, labels: np.ndarray | None, kind: str) -> dict[str, float]:
    """Teacher vs student on eval data: label top-1 and agreement for logits; cosine and k-NN overlap otherwise."""
    s, t = student.reshape(len(student), -1), teacher.reshape(len(teacher), -1)
    out: dict[str, float] = {"samples": len(s)}
    if kind == "kl":
        if labels is not None:
            out["teacher_top1"] = float(np.mean(t.argmax(1) == labels))
            out["student_top1"] = float(np.mean(s.argmax(1) == labels))
            out["top1_drop"] = out["teacher_top1"] - out["student_top1"]
        out["agreement"] = float(np.mean(s.argmax(1) == t.argmax(1)))
    else:
        den = np.linalg.norm(s, axis=1) * np.linalg.norm(t, axis=1)
        out["cosine_to_teacher"] = float(np.mean((s * t).sum(1) / np.maximum(den, 1e-12)))
        out[f"knn{KNN}_overlap"] = knn_overlap(s, t)
    return {k: (round(v, 6) if isinstance(v, float) else v) for k, v in out.items()}
