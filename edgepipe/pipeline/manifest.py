"""The manifest of a target's model: what a reader, verify and CI need (fields documented in shared/DESIGN.md)."""

from __future__ import annotations

import platform
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort

from edgepipe.core.modelio import default_opset, describe_values
from edgepipe.core.runtime import Runner
from edgepipe.core.version import VERSION
from edgepipe.sources.accuracy import AccuracyResult
from edgepipe.sources.export import Source
from edgepipe.targets import Emitted


def model_entry(key: str, entry: dict) -> dict:
    """What verify and a reader need of each model in a folder that ships several."""
    fields = ("model_file", "runtime", "inputs", "outputs", "opset", "ir_version", "size", "passes", "accuracy", "golden", "latency")
    extras = {k: v for k, v in entry.items() if k not in fields and k not in COMMON}
    return {"variant": key, **{k: entry[k] for k in fields}, **extras}


COMMON = {"name", "target", "description", "status", "source", "versions"}


def model_io(path: Path) -> tuple[list[dict], list[dict], int, int]:
    if path.suffix == ".ort":
        return [], [], 0, 0
    m = onnx.load(str(path), load_external_data=False)
    desc = describe_values
    inits = {i.name for i in m.graph.initializer}
    opset = default_opset(m) or 0
    return desc(v for v in m.graph.input if v.name not in inits), desc(m.graph.output), opset, m.ir_version


def target_manifest(
    *, name: str, target: str, description: str, source: Source, emitted: Emitted, runner: Runner, pass_log: list[dict],
    acc: AccuracyResult, data_origin: str, golden: dict, lat: dict, folder: Path,
) -> dict:
    """One model's manifest entry (the folder's primary model's fields sit at the top level)."""
    inputs, outputs, opset, ir_version = model_io(folder / emitted.model_file)
    return {
        "name": name,
        "target": target,
        "description": description,
        "status": "passed" if acc.passed else "failed",
        "model_file": emitted.model_file,
        "runtime": {
            "name": "onnxruntime",
            "version": ort.__version__,
            "providers": runner.providers,
            "requested_providers": emitted.providers,
            "session_config": emitted.session_config,
        },
        "inputs": inputs or [{"name": k, "dtype": v.type, "shape": v.shape} for k, v in runner.inputs.items()],
        "outputs": outputs,
        "opset": opset,
        "ir_version": ir_version,
        "source": {"kind": source.kind, "sha256": source.sha256, "export_check": export_summary(source)},
        "size": sizes(folder / emitted.model_file, source.onnx_path),
        "passes": pass_log,
        "accuracy": {**acc.as_dict(), "data": data_origin},
        "golden": golden,
        **({"distill": source.distill} if source.distill else {}),
        "latency": lat,
        "versions": versions(),
        **emitted.extras,
    }


def sizes(model: Path, fp32: Path) -> dict[str, float]:
    """Bytes of the deployable model (with external data) vs the float32 reference file."""
    size = sum(p.stat().st_size for p in model.parent.glob(model.name + "*"))
    ref = sum(p.stat().st_size for p in fp32.parent.glob(fp32.name + "*"))
    return {"model_bytes": size, "fp32_bytes": ref, "ratio": round(size / ref, 4) if ref else 0.0}


def export_summary(source: Source) -> dict:
    if not source.export_check:
        return {}
    return {
        "cases": len(source.export_check),
        "passed": all(c["passed"] for c in source.export_check),
        "max_abs": max(c["max_abs"] for c in source.export_check),
        "max_rel": max(c["max_rel"] for c in source.export_check),
        "sizes": sorted({tuple(sorted(c["sizes"].items())) for c in source.export_check}),
    }


def versions() -> dict[str, str]:
    versions = {"edgepipe": VERSION, "onnx": onnx.__version__, "onnxruntime": ort.__version__, "onnx_ir": ir.__version__, "python": platform.python_version(), "numpy": np.__version__}
    try:
        import torch

        versions["torch"] = str(torch.__version__)  # a str subclass of torch's: unpickling it (a build child's result) imported torch
    except ImportError:
        pass
    return versions
