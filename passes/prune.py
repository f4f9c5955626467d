"""prune.magnitude, and what both prune passes share: sparsity-or-budget options and the budget search."""

from __future__ import annotations

import zlib
from collections.abc import Callable
from typing import Literal

import numpy as np
import onnx_ir as ir
from pydantic import Field, model_validator

from edgepipe.core.errors import BadInput
from edgepipe.passes.base import EdgepipePass, PassConfig, StatsResult, clone

DEFAULT_SPARSITY = 0.5
NO_SPEEDUP = (
    "zeros alone do not make ONNX Runtime on CPU faster or smaller in memory: the weights stay dense; "
    "only the compressed (zip) size drops. Use prune.structured for speed."
)


class BudgetConfig(PassConfig):
    """Either a fixed ``sparsity`` or a ``max_drop`` accuracy budget searched by bisection."""

    sparsity: float | None = Field(None, ge=0.0, lt=1.0)
    max_drop: float | None = Field(None, ge=0.0)  # metric drop allowed vs. the pass's input model
    max_sparsity: float = Field(0.9, gt=0.0, lt=1.0)  # upper end of the search
    search_steps: int = Field(5, ge=1, le=12)  # bisection steps after the first probe
    exclude: list[str] = []  # node names left alone

    @model_validator(mode="after")
    def _one_of(self) -> BudgetConfig:
        if self.sparsity is not None and self.max_drop is not None:
            raise ValueError("give sparsity or max_drop, not both")
        return self

    @property
    def target(self) -> float:
        return DEFAULT_SPARSITY if self.sparsity is None else self.sparsity


class StructuredConfig(BudgetConfig):
    # Kept channels are rounded up to a multiple of this: ORT CPU's conv kernels work in blocks of 8 (AVX2)
    # or 16 (AVX-512); other widths measured up to 2x slower than the unpruned model (docs/passes.md).
    multiple_of: int = Field(16, ge=1)
    # l1: L1 norm of the producer's weights per channel; l1_in_out: times the L1 of what consumers read from it
    # activation: mean |activation| on calibration data x consumer weight L1 (Wanda-style; needs data)
    criterion: Literal["l1", "l1_in_out", "activation"] = "l1"
    calibration_samples: int = Field(64, ge=1)
    compensate: bool = True  # with activation: fold pruned channels' mean output into the consumer bias
    # Recovery: fine-tune the pruned graph's weights to the unpruned model's outputs on the calibration data
    # (passes/prune_recover.py); 0 = one-shot.
    recover_epochs: int = Field(0, ge=0)
    recover_lr: float = Field(3e-4, gt=0.0)  # the re-estimated model is a good start: 1e-3 first undid it (digits ResNet-18)
    recover_loss: Literal["mse", "cosine", "kl"] = "mse"
    recover_batch_size: int = Field(32, ge=1)
    # Right after the cut, each layer's output channels get back the unpruned model's mean and spread on the
    # calibration data (BatchNorm adaptation, folded; passes/prune_adapt.py): on whenever there is calibration data.
    recover_adapt: bool = True
    # Fine-tuning: match block outputs (residual Adds, Concats, pooling) too, and augment the images (random shifts)
    recover_features: bool = True
    recover_augment: bool = True
    # torch threads: 1 by default; on a loaded machine 2 threads measured 20x slower than 1 (spin-waiting)
    recover_threads: int = Field(1, ge=1)


class MagnitudeConfig(BudgetConfig):
    scope: Literal["per_tensor", "global"] = "per_tensor"
    op_types: list[str] = ["MatMul", "Gemm", "Conv"]
    min_elements: int = Field(256, ge=1)


MARK = "edgepipe.pruned."


def marker(model: ir.Model, name: str) -> str | None:
    """What an earlier run of pass ``name`` recorded in the model, if any (keeps passes idempotent)."""
    return model.metadata_props.get(MARK + name)


def set_marker(model: ir.Model, name: str, text: str) -> None:
    model.metadata_props[MARK + name] = text


Prune = Callable[[ir.Model, float], tuple[ir.Model, dict]]


def budget_search(p: EdgepipePass, model: ir.Model, prune: Prune) -> StatsResult:
    """Highest sparsity whose metric stays within ``max_drop`` of the unpruned model: bisection.

    Assumes accuracy falls monotonically with sparsity (true in expectation for
    magnitude ranking); every probe is recorded in ``curve`` so a reader can see
    where it was not.
    """
    c = p.config
    evaluate = p.context.evaluate
    if evaluate is None:
        raise BadInput(f"{p.name} with max_drop needs evaluation data: set data.eval (or data.calibration) in the recipe")
    base = float(evaluate(model))
    curve = [{"sparsity": 0.0, "metric": round(base, 6), "drop": 0.0}]
    cache: dict[float, tuple[ir.Model, dict]] = {}

    def ok(s: float) -> bool:
        cache[s] = prune(model, s)
        value = float(evaluate(cache[s][0]))
        curve.append({"sparsity": round(s, 4), "metric": round(value, 6), "drop": round(base - value, 6)})
        return np.isfinite(value) and base - value <= c.max_drop + 1e-12

    lo, hi = 0.0, c.max_sparsity
    if ok(hi):
        lo = hi
    else:
        for _ in range(c.search_steps):
            mid = (lo + hi) / 2
            if ok(mid):
                lo = mid
            else:
                hi = mid
    curve.sort(key=lambda row: row["sparsity"])
    search = {"max_drop": c.max_drop, "chosen_sparsity": round(lo, 4), "reference_metric": round(base, 6), "curve": curve}
    if lo == 0.0:
        return StatsResult(clone(model), modified=False, stats={**search, "note": "no sparsity probed stays within max_drop"})
    out, stats = cache[lo]
    set_marker(out, p.name, f"max_drop={c.max_drop:g} → sparsity={lo:.4f}")
    return StatsResult(out, modified=True, stats={**stats, **search})


def _zip_size(model: ir.Model) -> int:
    return len(zlib.compress(ir.to_proto(model).SerializeToString(), 6))


class PruneMagnitude(EdgepipePass):
    """L1 unstructured pruning: the smallest-magnitude weights become zero (per tensor or global).

    Only weights of ``op_types`` with at least ``min_elements`` values are
    pruned (biases and norms stay). The file keeps its dense layout, so the
    stats report the deflate-compressed size before and after, which is what a
    zipped download gains; ORT on CPU runs the zeros at the same speed.
    """

    name = "prune.magnitude"
    Config = MagnitudeConfig

    def call(self, model: ir.Model) -> StatsResult:
        if (done := marker(model, self.name)) is not None:
            return StatsResult(clone(model), modified=False, stats={"skipped": f"already pruned ({done})"})
        if self.config.max_drop is not None:
            result = budget_search(self, model, lambda m, s: prune_magnitude(m, s, self.config))
        else:
            out, stats = prune_magnitude(model, self.config.target, self.config)
            result = StatsResult(out, modified=stats["zeroed"] > 0, stats=stats)
        if result.modified:
            result.stats.update(zip_bytes_before=_zip_size(model), zip_bytes_after=_zip_size(result.model))
        result.stats["note"] = NO_SPEEDUP
        return result


def _candidates(model: ir.Model, config: MagnitudeConfig) -> list[ir.Value]:
    found = []
    for value in model.graph.initializers.values():
        tensor = value.const_value
        if tensor is None or tensor.dtype not in (ir.DataType.FLOAT, ir.DataType.FLOAT16) or tensor.size < config.min_elements:
            continue
        uses = value.uses()
        if uses and all(n.op_type in config.op_types and i == 1 and n.name not in config.exclude for n, i in uses):
            found.append(value)
    return found


def prune_magnitude(model: ir.Model, sparsity: float, config: MagnitudeConfig) -> tuple[ir.Model, dict]:
    """A copy with the ``sparsity`` share of smallest |w| zeroed (exactly k per tensor, or k overall)."""
    out = clone(model)
    values = _candidates(out, config)
    arrays = [v.const_value.numpy() for v in values]
    masks = [np.zeros(a.size, dtype=bool) for a in arrays]
    if config.scope == "global" and arrays:
        flat = np.concatenate([np.abs(a.ravel()).astype(np.float32) for a in arrays])
        k = int(sparsity * flat.size)
        if k:
            chosen = np.argpartition(flat, k - 1)[:k]
            offsets = np.cumsum([0] + [a.size for a in arrays])
            for i, m in enumerate(masks):
                sel = chosen[(chosen >= offsets[i]) & (chosen < offsets[i + 1])] - offsets[i]
                m[sel] = True
    else:
        for a, m in zip(arrays, masks, strict=True):
            k = int(sparsity * a.size)
            if k:
                m[np.argpartition(np.abs(a.ravel()), k - 1)[:k]] = True
    layers, zeroed, total = {}, 0, 0
    for value, a, m in zip(values, arrays, masks, strict=True):
        new = np.where(m.reshape(a.shape), np.zeros((), a.dtype), a)
        newly = int(np.count_nonzero(a) - np.count_nonzero(new))
        zeroed += newly
        total += a.size
        if newly:
            value.const_value = ir.tensor(new, name=value.name)
        layers[value.name] = round(float(1 - np.count_nonzero(new) / a.size), 4)
    achieved = round(float(sum(layers[v.name] * a.size for v, a in zip(values, arrays, strict=True)) / total), 4) if total else 0.0
    return out, {"sparsity": sparsity, "scope": config.scope, "tensors": len(values), "zeroed": zeroed, "achieved_sparsity": achieved, "layers": layers}
