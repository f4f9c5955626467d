"""The manifest of a target's model: what a reader, verify and CI need (fields documented in shared/DESIGN.md)."""

from __future__ import annotations

import contextlib
import importlib.metadata
import platform
import sys
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort

from edgepipe.core.manifest import Accuracy, ExportCheck, Golden, Latency, ModelEntry, ModelSource, Runtime, Size
from edgepipe.core.modelio import default_opset, describe_values
from edgepipe.core.runtime import Runner
from edgepipe.core.version import VERSION
from edgepipe.sources.accuracy import AccuracyResult
from edgepipe.sources.export import Source
from edgepipe.targets import Emitted


def model_io(path: Path) -> tuple[list[dict], list[dict], int, int]:
    if path.suffix == ".ort":
        return [], [], 0, 0
    m = onnx.load(str(path), load_external_data=False)
    desc = describe_values
    inits = {i.name for i in m.graph.initializer}
    opset = default_opset(m) or 0
    return desc(v for v in m.graph.input if v.name not in inits), desc(m.graph.output), opset, m.ir_version


def target_manifest(
    *, source: Source, emitted: Emitted, runner: Runner, pass_log: list[dict], acc: AccuracyResult, data_origin: str,
    golden: Golden, lat: Latency, warnings: list[str], folder: Path, runtime_cap: dict | None,
) -> ModelEntry:
    """One model's manifest entry (the folder's primary model's fields sit at the top level, ``Manifest.primary``)."""
    inputs, outputs, opset, ir_version = model_io(folder / emitted.model_file)
    runtime = Runtime.of(name="onnxruntime", version=ort.__version__, providers=runner.providers,
                         requested_providers=emitted.providers, session_config=emitted.session_config)
    entry = ModelEntry.of(
        model_file=emitted.model_file,
        runtime=runtime if runtime_cap is None else runtime.with_(requested=runtime_cap),
        inputs=inputs or [{"name": k, "dtype": v.type, "shape": v.shape} for k, v in runner.inputs.items()],
        outputs=outputs,
        opset=opset,
        ir_version=ir_version,
        size=sizes(folder / emitted.model_file, source.onnx_path),
        passes=pass_log,
        accuracy=Accuracy.from_json(acc.as_dict()).with_(data=data_origin),
        golden=golden,
        latency=lat,
        warnings=warnings,
        extra=emitted.extras,  # the target's own fields (gpu, mobile)
    )
    return entry.with_(distill=source.distill) if source.distill else entry


def model_source(source: Source) -> ModelSource:
    return ModelSource.of(kind=source.kind, sha256=source.sha256, export_check=export_summary(source))


def sizes(model: Path, fp32: Path) -> Size:
    """Bytes of the deployable model (with external data) vs the float32 reference file."""
    size = sum(p.stat().st_size for p in model.parent.glob(model.name + "*"))
    ref = sum(p.stat().st_size for p in fp32.parent.glob(fp32.name + "*"))
    return Size.of(model_bytes=size, fp32_bytes=ref, ratio=round(size / ref, 4) if ref else 0.0)


def export_summary(source: Source) -> ExportCheck:
    if not source.export_check:
        return ExportCheck.of()
    return ExportCheck.of(
        cases=len(source.export_check),
        passed=all(c["passed"] for c in source.export_check),
        max_abs=max(c["max_abs"] for c in source.export_check),
        max_rel=max(c["max_rel"] for c in source.export_check),
        sizes=sorted({tuple(sorted(c["sizes"].items())) for c in source.export_check}),
    )


def versions() -> dict[str, str]:
    versions = {"edgepipe": VERSION, "onnx": onnx.__version__, "onnxruntime": ort.__version__, "onnx_ir": ir.__version__, "python": platform.python_version(), "numpy": np.__version__}
    torch = sys.modules.get("torch")
    if torch is not None:  # a str subclass of torch's: unpickling it (a build child's result) imported torch
        versions["torch"] = str(torch.__version__)
    else:  # an ONNX source: the installed torch's version, without importing it (~2 CPU-s a process)
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            versions["torch"] = importlib.metadata.version("torch")
    return versions
