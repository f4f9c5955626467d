"""Recovery after prune.structured: statistics re-estimation, then a short fine-tune against the unpruned model.

1. ``adapt`` (passes/prune_adapt.py): each layer's output channels get back the unpruned layer's mean
   and spread on the calibration data (BatchNorm adaptation, folded). No training, one forward pass.
2. With ``recover_epochs``: the pruned graph, run in torch (``OnnxModule``), is trained to match the
   unpruned one on the calibration images (the teacher is the pass's input model). What makes a few
   hundred images enough:
   - features as well as outputs: every block output (residual Add, Concat, global pooling) of the
     pruned model is matched to the unpruned model's kept channels, each MSE scaled by the teacher's
     mean square (the logits alone are 10 numbers an image; a ResNet-18 block output is thousands);
   - augmented images (random shifts of up to 1/8 of the side, both models see the same ones), so the
     teacher's function is matched around the images, not only at them;
   - a warm-up then cosine-decayed learning rate, and one image in eight held out: the weights of the
     epoch with the best held-out cosine are kept, and training stops when it stops improving.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Sequence

import numpy as np
import onnx_ir as ir
import torch
import torch.nn.functional as F
from onnx_ir.passes import common

from edgepipe.core import distill as D
from edgepipe.passes.base import clone
from edgepipe.passes.prune_adapt import Kept, adapt
from edgepipe.passes.prune_recover import OnnxModule

logger = logging.getLogger(__name__)
HOLDOUT = 8  # one sample in HOLDOUT is held out for early stopping (with at least 2 x HOLDOUT samples)
ADAPT_SAMPLES = 128  # statistics from this many samples, in one pass (activations of the whole set in memory)
BLOCKS = ("Add", "Concat", "GlobalAveragePool", "ReduceMean")  # block outputs matched as features


@dataclasses.dataclass(frozen=True)
class RecoverConfig:
    epochs: int = 0
    lr: float = 3e-4
    loss: str = "mse"
    batch_size: int = 32
    threads: int = 1
    adapt: bool = True
    features: bool = True
    augment: bool = True
    seed: int = 0


def recover(teacher: ir.Model, student: ir.Model, samples: dict[str, np.ndarray], kept: Kept, cfg: RecoverConfig) -> tuple[ir.Model, dict]:
    """``student`` (the pruned ``teacher``) re-estimated and fine-tuned in place on ``samples``; what was done."""
    teacher = clone(teacher)  # Constant nodes become initializers: the interpreter reads only those
    common.IdentityEliminationPass()(teacher)
    common.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0)(teacher)
    t_mod, s_mod = OnnxModule(teacher), OnnxModule(student)
    t_mod.requires_grad_(False)
    data = _Samples(samples, s_mod.inputs)
    stats: dict = {}
    with D.deterministic(cfg.seed, cfg.threads):
        gen = torch.Generator().manual_seed(cfg.seed)
        order = torch.randperm(data.n, generator=gen).numpy()
        held = order[: data.n // HOLDOUT] if cfg.epochs and data.n >= 2 * HOLDOUT else order[:0]
        train = order[len(held):]
        check = held if len(held) else train
        reference = _outputs(t_mod, data, check)
        cosines = {"before": _cosine(reference, s_mod, data, check)}
        if cfg.adapt:
            stats["adapt"] = adapt(t_mod, s_mod, data.take(train[:ADAPT_SAMPLES]), kept)
            cosines["adapted"] = _cosine(reference, s_mod, data, check)
        if cfg.epochs:
            stats.update(_finetune(t_mod, s_mod, data, train, held, kept, cfg, gen))
            cosines["after"] = _cosine(reference, s_mod, data, check)
    s_mod.write_back(student)
    stats["held_out_cosine" if len(held) else "calibration_cosine"] = {k: round(v, 4) for k, v in cosines.items()}
    stats.update(samples=data.n, held_out=len(held))
    return student, stats


class _Samples:
    def __init__(self, samples: dict[str, np.ndarray], names: list[str]) -> None:
        self.arrays = [samples[name] for name in names]
        self.n = len(self.arrays[0])

    def take(self, idx: np.ndarray) -> list[torch.Tensor]:
        return [torch.from_numpy(np.ascontiguousarray(a[np.sort(idx)])) for a in self.arrays]


def _outputs(module: OnnxModule, data: _Samples, idx: np.ndarray, size: int = 64) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([module(*data.take(idx[i:i + size])) for i in range(0, len(idx), size)]).flatten(1)


def _cosine(reference: torch.Tensor, student: OnnxModule, data: _Samples, idx: np.ndarray) -> float:
    return float(F.cosine_similarity(reference, _outputs(student, data, idx), dim=1).mean())


def features(student: OnnxModule, teacher: OnnxModule, kept: Kept) -> dict[str, torch.Tensor | None]:
    """Block outputs both graphs compute (name → the teacher's kept channel positions, None = all)."""
    produced = {node.outputs[0].name for node in teacher.graph}
    names = [node.outputs[0].name for node in student.graph if node.op_type in BLOCKS]
    if not names:  # a plain chain: every layer's output
        names = [node.outputs[0].name for node in student.graph if node.op_type in ("Conv", "Gemm", "MatMul")]
    return {name: (torch.from_numpy(kept[name][1]) if name in kept else None)
            for name in names if name in produced and name != student.output}


def _nmse(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(s, t) / t.pow(2).mean().clamp(min=1e-12)


def augment(inputs: Sequence[torch.Tensor], gen: torch.Generator) -> list[torch.Tensor]:
    """Image batches (N, C, H, W float), each image shifted at random by up to 1/8 of the side (edges reflected).

    No flips: a mirrored digit or letter is not an input the model sees (on digits, flips cost 0.02-0.07 of
    held-out cosine; shifts alone gained 0.004 on a trained ResNet-18, benchmarks/RESULTS.md)."""
    out = []
    for x in inputs:
        if x.dim() != 4 or not x.is_floating_point() or min(x.shape[2:]) < 8:
            out.append(x)
            continue
        n, _, h, w = x.shape
        p = min(h, w) // 8
        padded = F.pad(x, (p, p, p, p), mode="reflect")
        dy, dx = torch.randint(0, 2 * p + 1, (2, n), generator=gen).tolist()
        out.append(torch.stack([padded[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(n)]))
    return out


def _finetune(t_mod: OnnxModule, s_mod: OnnxModule, data: _Samples, train: np.ndarray, held: np.ndarray, kept: Kept,
              cfg: RecoverConfig, gen: torch.Generator) -> dict:
    matched = features(s_mod, t_mod, kept) if cfg.features else {}
    opt = torch.optim.AdamW(s_mod.parameters(), lr=cfg.lr, weight_decay=0.0)
    per_epoch = -(-len(train) // cfg.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=max(cfg.epochs * per_epoch, 1), pct_start=0.1)
    held_targets = _outputs(t_mod, data, held) if len(held) else None
    best, best_state, top, stale, history = -float("inf"), None, -float("inf"), 0, []
    if held_targets is not None:  # the adapted weights are the ones to beat
        best = _cosine(held_targets, s_mod, data, held)
        best_state = {k: v.detach().clone() for k, v in s_mod.state_dict().items()}
    patience = max(3, cfg.epochs // 4)
    for epoch in range(cfg.epochs):
        start, total = time.perf_counter(), 0.0
        perm = train[torch.randperm(len(train), generator=gen).numpy()]
        for i in range(0, len(perm), cfg.batch_size):
            x = data.take(perm[i:i + cfg.batch_size])
            if cfg.augment:
                x = augment(x, gen)
            with torch.no_grad():
                t = t_mod.run(x, keep=matched)
            s = s_mod.run(x, keep=matched)
            out = s_mod.output
            loss = _nmse(s[out], t[out]) if cfg.loss == "mse" else D.distill_loss(cfg.loss, s[out], t[out], 4.0)
            terms = [_nmse(s[k], t[k] if idx is None else t[k].index_select(1, idx)) for k, idx in matched.items()
                     if s[k].dim() > 1 and (t[k].shape[1] if idx is None else len(idx)) == s[k].shape[1]]
            if terms:
                loss = loss + torch.stack(terms).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(x[0])
        history.append(total / len(train))
        score = _cosine(held_targets, s_mod, data, held) if held_targets is not None else -history[-1]
        logger.info(f"  recover epoch {epoch + 1}/{cfg.epochs}: loss {history[-1]:.5f}, held-out cosine "
                    f"{score if held_targets is not None else float('nan'):.4f} ({time.perf_counter() - start:.1f}s)")
        if score > best:
            best, best_state = score, {k: v.detach().clone() for k, v in s_mod.state_dict().items()}
        # patience counts epochs without progress among the trained ones: the first epochs, at the peak of
        # the schedule, may well score below the re-estimated start and climb past it later
        stale = 0 if score > top + 1e-5 else stale + 1
        top = max(top, score)
        if stale >= patience:
            break
    if best_state is not None:
        s_mod.load_state_dict(best_state)
    return {"epochs": len(history), "loss": cfg.loss, "features": len(matched), "augment": cfg.augment,
            "loss_first_last": [round(history[0], 6), round(history[-1], 6)] if history else []}
