"""Scoring a model on the eval data: ``EvalSet`` (the data and reference outputs, once per recipe) and its
``Evaluator`` (a candidate's metric, as plain data: it runs in a pass, a Ray task or a pool worker).

The emitted artifact's own outputs are computed by ``core.fanout.evaluate_batches`` (fanned out where it pays) and
checked by ``pipeline.outputs.measure_every_output``."""

from __future__ import annotations

import dataclasses
import shutil
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir

from edgepipe.recipe import AccuracySpec
from edgepipe.sources.accuracy import BUILTIN, Metric, measure


@dataclasses.dataclass(frozen=True)
class EvalSet:
    """Eval inputs, labels and reference outputs, computed once per recipe; what every candidate is scored on."""

    batches: list[tuple[dict[str, np.ndarray], np.ndarray | None]]
    labels: np.ndarray | None
    reference: dict[str, np.ndarray]
    origin: str  # eval | calibration | synthetic
    warnings: tuple[str, ...] = ()  # weak data: in every manifest and the report

    def evaluator(self, spec: AccuracySpec, metric: Metric, providers: list[str], work: Path | None = None) -> Evaluator:
        """The scorer of candidates on this data, against these reference outputs."""
        return Evaluator(spec, metric, self.batches, self.reference, self.labels, providers, work)


@dataclasses.dataclass
class Evaluator:
    """``evaluate(model, samples=N)``: the signed metric (higher is better) of a candidate on the first N samples.

    Only plain data (numpy arrays, a pydantic spec, a builtin metric), so a slice of it pickles to a worker
    that scores candidates there (``portable``); a custom metric (a user's function) stays in-process.
    """

    spec: AccuracySpec
    metric: Metric
    batches: list[tuple[dict[str, np.ndarray], np.ndarray | None]]
    reference: dict[str, np.ndarray]
    labels: np.ndarray | None
    providers: list[str]
    work: Path | None = None  # where candidates are written (the temp dir when None)
    threads: int | None = None  # ORT intra-op threads (None: ORT's default, all cores)

    @property
    def sign(self) -> float:
        return 1.0 if self.metric.higher_is_better else -1.0

    def head(self, samples: int | None) -> Evaluator:
        """The same evaluator on the first eval batches holding at least ``samples`` samples (all when None)."""
        if samples is None:
            return self
        batches, n = [], 0
        for inputs, labels in self.batches:
            if n >= samples:
                break
            batches.append((inputs, labels))
            n += len(next(iter(inputs.values())))
        reference = {k: v[:n] for k, v in self.reference.items()}
        labels = None if self.labels is None else self.labels[:n]
        return dataclasses.replace(self, batches=batches, reference=reference, labels=labels)

    def portable(self, samples: int | None) -> Evaluator | None:
        """A slice to ship to a worker (one ORT thread, its own temp dir), or None if the metric can't travel."""
        if BUILTIN.get(self.metric.name) is not self.metric:
            return None
        return dataclasses.replace(self.head(samples), work=None, threads=1)

    def __call__(self, model: ir.Model | onnx.ModelProto, samples: int | None = None) -> float:
        """``samples``: only the first N eval samples (a quick, ranking-grade estimate); a proto skips IR conversion."""
        from edgepipe.core.runtime import Runner, run_batches
        from edgepipe.passes.base import save

        ev = self.head(samples)
        if self.work is not None:
            self.work.mkdir(parents=True, exist_ok=True)
        path = Path(tempfile.mkdtemp(prefix="eval-", dir=self.work)) / "model.onnx"
        if isinstance(model, onnx.ModelProto):
            path.write_bytes(model.SerializeToString())
        else:
            save(model, path)
        try:
            outputs = run_batches(Runner(path, providers=self.providers, threads=self.threads), ev.batches)
        finally:
            shutil.rmtree(path.parent, ignore_errors=True)
        return self.sign * measure(self.spec, self.metric, outputs, ev.reference, ev.labels).value
