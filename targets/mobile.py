"""mobile: ONNX Runtime Mobile — fixed shapes, int8 QDQ for NNAPI / XNNPACK, model.ort and a usability report."""

from __future__ import annotations

import collections
import ctypes
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import onnx
import onnx_ir as ir

from edgepipe.core.artifact import sha256_file
from edgepipe.core.errors import BadInput, one_line
from edgepipe.core.modelio import describe_values
from edgepipe.passes.base import default_opset, save
from edgepipe.targets import compat
from edgepipe.targets.base import Emitted, Target, TargetContext, Variant, deployable
from edgepipe.targets.encoder import transformer_encoder
from edgepipe.targets.ortbytes import canonical_ort
from edgepipe.targets.ortgraph import load_ort
from edgepipe.targets.usability import usability

REPORT = "usability_report.json"
OPS_CONFIG = "required_operators.config"
# Phones are ARM: "arm" keeps x86-only layout rewrites (NCHWc) out of the .ort and allows int8 QDQ.
PLATFORM = "arm"
ADDR_NO_RANDOMIZE = 0x0040000  # personality(2) flag
# the .ort bakes ORT's fusions in: a residual Add → LayerNormalization becomes SkipLayerNormalization, slower here
UNFUSE = {"name": "unfuse.skiplayernorm"}
# onnxruntime's converter module, run with torch blocked: `onnxruntime.tools` imports torch when it is installed, for
# a helper the converter never calls; that import was ~1.8 s of a ~2.1 s conversion of the digits model. What the child
# imported used to show in the .ort's bytes (its kernel type-string table is written in hash-map order, the hash seed
# following the child's memory layout); `converted` re-writes that table in sorted order (targets/ortbytes.py), so the
# bytes no longer depend on the converting process or the install path (docs/decisions.md).
CONVERTER = ("import sys; sys.modules['torch'] = None; import runpy; "
             "runpy.run_module('onnxruntime.tools.convert_onnx_models_to_ort', run_name='__main__', alter_sys=True)")


def _no_aslr() -> None:  # pragma: no cover - runs in the child between fork and exec
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.personality(ADDR_NO_RANDOMIZE)
    except (OSError, AttributeError):
        pass


def convert_to_ort(src: Path, out: Path, level: str = "all") -> None:
    """onnxruntime's own converter (Fixed style), in a child process with address randomization off.

    ``level``: the optimizations baked in (ORT's ``all`` by default; a decoder, already fused, takes ``disable``).

    ORT's flatbuffer writer orders its kernel type-string table by hash, seeded from the process's
    memory layout, so the same model converts to different bytes in every process (seen: 3 runs,
    3 hashes); with ASLR off the raw bytes repeat for one Python install, and ``converted`` makes
    them canonical for any install (``canonical_ort``). Where personality(2) is refused the
    conversion still runs.
    """
    # Relative paths from the model's folder: the child's argv (and so its memory layout) is the same every build.
    cmd = [sys.executable, "-c", CONVERTER, src.name, "--output_dir",
           os.path.relpath(out, src.parent), "--optimization_style", "Fixed", "--target_platform", PLATFORM]
    # A fixed environment too: the writer's output changed with the size of the caller's environment.
    env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "PYTHONHASHSEED": "0"}
    if level != "all":
        env["ORT_CONVERT_ONNX_MODELS_TO_ORT_OPTIMIZATION_LEVEL"] = level
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=src.parent, env=env,
                          preexec_fn=_no_aslr if os.name == "posix" else None)
    suffix = "" if level == "all" else f".{level}"  # the converter names other levels' files model.<level>.ort
    if proc.returncode == 0 and suffix and (out / f"model{suffix}.ort").is_file():
        (out / f"model{suffix}.ort").rename(out / "model.ort")
        (out / f"model.{OPS_CONFIG.replace('.config', suffix + '.config')}").rename(out / f"model.{OPS_CONFIG}")
    if proc.returncode != 0 or not (out / "model.ort").is_file():
        lines = [ln for ln in (proc.stderr or proc.stdout).strip().splitlines() if ln.strip()]
        raise BadInput(one_line(f"mobile: onnxruntime could not convert the model to ORT format: {lines[-1] if lines else proc.returncode}"))


def converted(src: Path, level: str = "all") -> tuple[bytes, str]:
    """(model.ort bytes, required operators config) of ``src``, converted into ``src``'s folder (``convert_to_ort``).

    The bytes are canonical (``canonical_ort``): the same model gives the same bytes from any process and install path.
    """
    out = src.parent / "ort"
    convert_to_ort(src, out, level)
    # The converter names the file it wrote (a temp path; model.<level>.ort before the rename) in a comment: keep the
    # file the same build to build.
    lines = (out / f"model.{OPS_CONFIG}").read_text(encoding="utf-8").splitlines(keepends=True)
    config = "".join("# - model.ort\n" if ln.startswith("# - ") and ln.rstrip().endswith(".ort") else ln for ln in lines)
    return canonical_ort((out / "model.ort").read_bytes()), config


# The last conversions of this process by the ONNX file's sha256: the speed check converts the float and the int8
# model, and the build then ships one of them; the converter (a child process, ~0.3 s) gives the same bytes for the
# same file, so the shipped one is not converted again.
_CONVERTED: collections.OrderedDict[str, tuple[bytes, str]] = collections.OrderedDict()
_KEEP = 2


def ort_format(src: Path) -> tuple[bytes, str]:
    """(model.ort bytes, required operators config) of an ONNX file, converted in a child (see ``convert_to_ort``)."""
    key = sha256_file(src)
    if key in _CONVERTED:
        _CONVERTED.move_to_end(key)
        return _CONVERTED[key]
    _CONVERTED[key] = converted(src)
    while len(_CONVERTED) > _KEEP:
        _CONVERTED.popitem(last=False)
    return _CONVERTED[key]


class MobileTarget(Target):
    """Static shapes, QDQ uint8 activations / int8 per-channel weights, ORT format (Fixed style)."""

    name = "mobile"
    description = "ONNX Runtime Mobile (.ort), int8 QDQ for NNAPI / XNNPACK / CoreML"
    speed_checked = True  # int8 ships only where it is not slower than float (targets/speed.py)
    reads_source = True  # a transformer encoder's default int8 is dynamic (targets/encoder.py)

    def default_passes(self, ctx: TargetContext) -> list[dict[str, Any]]:
        chain: list[dict[str, Any]] = [{"name": "cleanup"}, {"name": "optimize.ort", "level": "basic"}]
        if transformer_encoder(ctx.source):
            # NNAPI / CoreML take only parts of a BERT graph (their own checker says: use the CPU provider), so a
            # transformer encoder (text, or ViT / Swin) gets dynamic int8 for the CPU provider, and no
            # SkipLayerNormalization (docs/decisions.md).
            dynamic = {"name": "quantize.dynamic", "reduce_range": False}  # phones are ARM: no u8s8 saturation to avoid
            return [*chain, dynamic, self._fix(ctx), UNFUSE]
        if ctx.has_calibration:
            # Dynamic int8 (DynamicQuantizeLinear) is CPU-only: NNAPI/CoreML need static QDQ, so
            # without calibration data the mobile model stays float32.
            chain.append({"name": "quantize.static", "activation_type": "uint8", "weight_type": "int8", "per_channel": True})
        # Shapes are fixed last, so calibration still runs on whole batches of the dynamic model.
        return [*chain, self._fix(ctx)]

    def passes(self, ctx: TargetContext) -> list[dict[str, Any]]:
        chain = super().passes(ctx)
        if not any(p.get("name") == "shapes.fix" for p in chain):
            chain.append(self._fix(ctx))  # NNAPI and CoreML take no dynamic shapes
        return chain

    def variants(self, ctx: TargetContext) -> list[Variant]:
        compat.check_ort_format(compat.requested(ctx.spec.runtime))
        return super().variants(ctx)

    @staticmethod
    def _fix(ctx: TargetContext) -> dict[str, Any]:
        return {"name": "shapes.fix", "shapes": {**ctx.data_shapes, **(ctx.spec.shapes or {})}}  # the recipe's win

    def emit(self, model: ir.Model, folder: Path, ctx: TargetContext, variant: str = "main") -> Emitted:
        work = Path(tempfile.mkdtemp(prefix="edgepipe-ort-"))
        try:
            src = save(deployable(model), work / "model.onnx")
            ort, config = ort_format(src)
            (folder / "model.ort").write_bytes(ort)
            (folder / OPS_CONFIG).write_text(config, encoding="utf-8")
            proto = onnx.load(str(src))
        finally:
            shutil.rmtree(work, ignore_errors=True)
        report = usability(load_ort(folder / "model.ort"), infer=False)  # what NNAPI / CoreML are given: the .ort's graph
        (folder / REPORT).write_text(json.dumps(report, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        opset = default_opset(proto) or 0
        summary = {ep: {k: v for k, v in r.items() if k not in ("unsupported_nodes", "caveats")} for ep, r in report.items()}
        extras = {
            "opset": opset,
            "ir_version": proto.ir_version,
            "inputs": describe_values(i for i in proto.graph.input if i.name not in {t.name for t in proto.graph.initializer}),
            "outputs": describe_values(proto.graph.output),
            "mobile": {
                "ort_format": {"file": "model.ort", "optimization_style": "Fixed", "target_platform": PLATFORM,
                               "converter": "onnxruntime.tools.convert_onnx_models_to_ort"},
                "required_operators": OPS_CONFIG,
                "usability_report": REPORT,
                "usability": summary,
                "checked_on_note": "NNAPI/CoreML/XNNPACK are not in the desktop onnxruntime build: accuracy and golden I/O "
                "were run on model.ort with the CPU provider",
            },
        }
        return Emitted("model.ort", list(self.providers), extras=extras)
