"""One runner shape for every artifact: an ONNX Runtime session that says what really ran."""

from __future__ import annotations

import re
import shutil
import tempfile
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort

from edgepipe.core.errors import BadInput, explain, one_line

ORT_DTYPES = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(int8)": np.int8,
    "tensor(uint8)": np.uint8,
    "tensor(bool)": np.bool_,
}


def ort_reason(exc: BaseException) -> str:
    """ORT's load error without its C++ source location, advice first when we know the failure."""
    text = one_line(str(exc))
    text = re.sub(r"\[ONNXRuntimeError\] : \d+ : \w+ : ", "", text)
    text = re.sub(r"Load model from \S+ failed:", "", text)
    text = re.sub(r"/onnxruntime_src/\S+ [^)]*\) ", "", text).strip()
    advice = explain(exc)
    return f"{advice.split(' (')[0]}: {text[:300]}" if advice else text[:400]


def pad_tokens(arr: np.ndarray, shape: list) -> np.ndarray:
    """Zero-pad integer inputs (token ids, attention masks) up to a fixed sequence length.

    A fixed-shape (mobile) transformer takes e.g. [1, 128]; text batches are padded only to their
    longest sentence. Zero ids with a zero attention mask are the tokenizer's own padding, so the
    embedding is unchanged. Float inputs are never padded.
    """
    if not np.issubdtype(arr.dtype, np.integer) or not shape or len(shape) != arr.ndim:
        return arr
    pads = [(0, 0)] + [(0, want - got) if isinstance(want, int) and got < want else (0, 0) for got, want in zip(arr.shape[1:], shape[1:], strict=True)]
    return np.pad(arr, pads) if any(p[1] for p in pads) else arr


def session(
    model: str | Path | bytes,
    providers: list[str] | None = None,
    *,
    threads: int | None = None,
    opt_level: ort.GraphOptimizationLevel | None = None,
    config: dict[str, str] | None = None,
    optimized_path: Path | None = None,
    profile_prefix: Path | None = None,
) -> ort.InferenceSession:
    """The one place edgepipe makes an ONNX Runtime session (a file path or serialized bytes).

    Quiet (errors only); ``threads``: intra-op threads (one inter-op); ``opt_level``: ORT's default when None;
    ``config``: session config entries; ``optimized_path``: where ORT writes the optimized model;
    ``profile_prefix``: ORT profiles every node's kernel time into a JSON file of that prefix (``end_profiling``).
    """
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    if opt_level is not None:
        options.graph_optimization_level = opt_level
    if optimized_path is not None:
        options.optimized_model_filepath = str(optimized_path)
    if profile_prefix is not None:
        options.enable_profiling = True
        options.profile_file_prefix = str(profile_prefix)
    for key, value in (config or {}).items():
        options.add_session_config_entry(key, value)
    source = model if isinstance(model, bytes) else str(model)
    return ort.InferenceSession(source, options, providers=providers or ["CPUExecutionProvider"])


def exposed(
    model: ir.Model | onnx.ModelProto,
    names: Iterable[str],
    batches: Iterable[dict[str, np.ndarray]],
    *,
    workdir: Path | None = None,
    max_samples: int | None = None,
    opt_level: ort.GraphOptimizationLevel | None = None,
) -> Iterator[tuple[dict[str, np.ndarray], dict[str, np.ndarray]]]:
    """Run a model with the named intermediate tensors exposed as outputs: yields (feed, {name: tensor}) per batch.

    The model is not modified (an ir.Model is cloned; large ones go through a file in ``workdir``). Stops once
    ``max_samples`` samples ran. ``opt_level``: ORT_DISABLE_ALL measures the tensors exactly as in the graph.
    """
    names = list(dict.fromkeys(names))
    if isinstance(model, onnx.ModelProto):
        probe = onnx.ModelProto()
        probe.CopyFrom(model)
        outputs = {o.name for o in probe.graph.output}
        probe.graph.output.extend(onnx.helper.make_empty_tensor_value_info(n) for n in names if n not in outputs)
        sess = session(probe.SerializeToString(), opt_level=opt_level)
    else:
        from edgepipe.core.modelio import clone, save

        probe_ir = clone(model)
        produced = {v.name: v for node in probe_ir.graph for v in node.outputs}
        outputs = {v.name for v in probe_ir.graph.outputs}
        probe_ir.graph.outputs.extend(produced[n] for n in names if n not in outputs)
        folder = Path(tempfile.mkdtemp(prefix="exposed-", dir=workdir))
        try:
            sess = session(save(probe_ir, folder / "probe.onnx"), opt_level=opt_level)
        finally:
            shutil.rmtree(folder, ignore_errors=True)
    inputs = {i.name for i in sess.get_inputs()}
    seen = 0
    for batch in batches:
        if max_samples is not None and seen >= max_samples:
            break
        feed = {k: np.asarray(v) for k, v in batch.items() if k in inputs}
        seen += len(next(iter(feed.values())))
        yield feed, dict(zip(names, sess.run(names, feed), strict=True))


class Runner:
    """ONNX Runtime session for a model file; checks feeds and records providers."""

    def __init__(
        self,
        path: str | Path,
        providers: list[str] | None = None,
        threads: int | None = None,
        session_config: dict[str, str] | None = None,
    ) -> None:
        wanted = providers or ["CPUExecutionProvider"]
        available = ort.get_available_providers()
        usable = [p for p in wanted if p in available] or ["CPUExecutionProvider"]
        start = time.perf_counter()
        try:
            self.session = session(path, usable, threads=threads, config=session_config)
        except Exception as exc:
            raise BadInput(f"onnxruntime {ort.__version__} cannot load {path}: {ort_reason(exc)}") from None
        self.load_seconds = time.perf_counter() - start
        # ORT silently falls back to CPU for providers it lacks: record what really runs.
        self.providers = self.session.get_providers()
        self.inputs = {i.name: i for i in self.session.get_inputs()}
        self.output_names = [o.name for o in self.session.get_outputs()]

    def run(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        missing = set(self.inputs) - set(feed)
        if missing:
            raise BadInput(f"inputs {sorted(missing)} missing from the data (model inputs: {sorted(self.inputs)})")
        cast = {}
        for name, meta in self.inputs.items():
            want = ORT_DTYPES.get(meta.type)
            arr = pad_tokens(np.asarray(feed[name]), meta.shape)
            cast[name] = arr.astype(want) if want is not None and arr.dtype != want else arr
        try:
            outputs = self.session.run(self.output_names, cast)
        except ort.capi.onnxruntime_pybind11_state.InvalidArgument as exc:  # data that does not fit the model
            got = {k: list(v.shape) for k, v in cast.items()}
            want = {k: m.shape for k, m in self.inputs.items()}
            raise BadInput(f"the data does not fit the model: inputs {got}, model takes {want} ({ort_reason(exc)[:200]}); "
                           "fix the data shapes or the target's shapes") from None
        return dict(zip(self.output_names, outputs, strict=True))

    def fixed_batch(self) -> int | None:
        """The batch size the model takes when its first axis is fixed (mobile), else None."""
        dims = [m.shape[0] for m in self.inputs.values() if m.shape]
        return dims[0] if dims and all(isinstance(d, int) for d in dims) else None

    def run_samples(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run any number of samples: in chunks of the fixed batch size (the last one padded) if there is one."""
        size = self.fixed_batch()
        n = len(next(iter(feed.values())))
        if size is None or n == size:
            return self.run(feed)
        parts = []
        for start in range(0, n, size):
            chunk = {k: v[start : start + size] for k, v in feed.items()}
            got = len(next(iter(chunk.values())))
            if got < size:  # repeat the last sample to fill the fixed batch, then drop the padding
                chunk = {k: np.concatenate([v, np.repeat(v[-1:], size - got, axis=0)]) for k, v in chunk.items()}
            parts.append({k: v[:got] for k, v in self.run(chunk).items()})
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def concat(parts: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Per-output concatenation of several runs' outputs (in order)."""
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]} if parts else {}


def run_batches(runner: Runner, batches: list) -> dict[str, np.ndarray]:
    """A model's outputs over ``[(inputs, labels), ...]`` batches, concatenated (fixed-batch models run in chunks)."""
    return concat([runner.run_samples(batch) for batch, _ in batches])
