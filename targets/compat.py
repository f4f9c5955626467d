"""Runtime version capping: opset and IR version a requested onnxruntime loads, every op checked."""

from __future__ import annotations

import contextlib
import io

import onnx
import onnx_ir as ir
from onnx import version_converter

from edgepipe.core.errors import BadInput, one_line
from edgepipe.passes.base import default_opset
from edgepipe.targets import irlevel

# onnxruntime release → (max ai.onnx opset, max IR version), from
# https://onnxruntime.ai/docs/reference/compatibility.html (ONNX opset support table), except where
# benchmarks/runtime_caps.py measured otherwise: 1.15.1 has no opset-19 CPU kernels for QuantizeLinear,
# DequantizeLinear or Reshape (NOT_IMPLEMENTED on load), so 1.15 is capped at 18.
ORT_LIMITS: dict[str, tuple[int, int]] = {
    "1.10": (15, 8), "1.11": (16, 8), "1.12": (17, 8), "1.13": (17, 8), "1.14": (18, 8),
    "1.15": (18, 8), "1.16": (19, 9), "1.17": (20, 9), "1.18": (21, 10), "1.19": (21, 10),
    "1.20": (21, 10),
}
# ORT-format (.ort) files: version 6 came with onnxruntime 1.16 and older runtimes cannot read it
# (no forward compatibility; microsoft/onnxruntime#20670). The converter here writes v6.
ORT_FORMAT_MIN = "1.16"


def _key(version: str) -> tuple[int, ...]:
    return tuple(int(p) for p in version.split("."))


def requested(runtime: dict[str, str] | None) -> str | None:
    """The onnxruntime version a target spec asks for (``runtime: {onnxruntime: "1.17"}``), validated."""
    if not runtime:
        return None
    unknown = sorted(set(runtime) - {"onnxruntime"})
    if unknown:
        raise BadInput(f"runtime: unknown runtime {unknown}; only 'onnxruntime' versions can be requested")
    version = str(runtime["onnxruntime"]).strip()
    parts = version.split(".")
    if len(parts) < 2 or not all(p.isdigit() for p in parts):
        raise BadInput(f"runtime: onnxruntime version '{version}' is not MAJOR.MINOR (e.g. \"1.17\")")
    minor = ".".join(parts[:2])
    if minor not in ORT_LIMITS:
        raise BadInput(
            f"runtime: onnxruntime {version} is not in edgepipe's compatibility table "
            f"({', '.join(ORT_LIMITS)}); request one of those or leave runtime unset"
        )
    return minor


def cap(model: ir.Model, version: str) -> tuple[ir.Model, dict]:
    """Convert ``model`` down to what onnxruntime ``version`` loads, or raise BadInput naming the node."""
    max_opset, max_ir = ORT_LIMITS[version]
    proto = ir.to_proto(model)
    opset = default_opset(proto)
    info = {"onnxruntime": version, "max_opset": max_opset, "max_ir_version": max_ir, "opset_before": opset,
            "ir_version_before": proto.ir_version}
    if proto.ir_version > max_ir:  # before the opset converter, which knows types only by opset
        irlevel.check(proto, max_ir, f"onnxruntime {version}")
    if opset is not None and opset > max_opset:
        _check_ops(proto, max_opset, version)
        try:
            with contextlib.redirect_stderr(io.StringIO()):
                proto = version_converter.convert_version(proto, max_opset)
        except Exception as exc:  # noqa: BLE001 - the converter raises bare RuntimeErrors
            raise BadInput(one_line(
                f"runtime onnxruntime {version}: cannot convert opset {opset} down to {max_opset}: {exc}"
            )) from None
    info |= irlevel.lower(proto, max_ir, f"onnxruntime {version}")  # refuses what that IR version lacks
    _check_domains(proto, max_opset, version)
    _check_ops(proto, max_opset, version)
    try:
        onnx.checker.check_model(proto)
    except onnx.checker.ValidationError as exc:
        raise BadInput(one_line(f"runtime onnxruntime {version}: the capped model does not check: {exc}")) from None
    after = default_opset(proto)
    info |= {"opset": after, "ir_version": proto.ir_version}
    return ir.from_proto(proto), info


def ml_opset_for(max_opset: int) -> int:
    """The ai.onnx.ml opset released with ai.onnx opset ``max_opset`` (onnx's own release table)."""
    return min((ml for _, _, opset, ml, *_ in onnx.helper.VERSION_TABLE if opset == max_opset), default=1)


def _check_domains(proto: onnx.ModelProto, max_opset: int, version: str) -> None:
    """Drop opset imports no node uses (ORT's optimizer stamps every domain it knows, ai.onnx.ml 5 among
    them, which an older runtime refuses as 'under development'); refuse a used ai.onnx.ml that is too new."""
    used = {n.domain or "" for n in irlevel.nodes(proto)} | {f.domain for f in proto.functions}
    kept = [o for o in proto.opset_import if o.domain in ("", "ai.onnx") or o.domain in used]
    if len(kept) < len(proto.opset_import):
        del proto.opset_import[:]
        proto.opset_import.extend(kept)
    max_ml = ml_opset_for(max_opset)
    for o in proto.opset_import:
        if o.domain == "ai.onnx.ml" and o.version > max_ml:
            raise BadInput(
                f"runtime onnxruntime {version}: the model uses ai.onnx.ml opset {o.version}; that runtime reads "
                f"ai.onnx.ml opset {max_ml} at most: request a newer runtime or change the model"
            )


def _check_ops(proto: onnx.ModelProto, max_opset: int, version: str) -> None:
    """Every ai.onnx node (subgraphs and functions included) must exist in the capped opset (first version ≤ max_opset)."""
    for node in irlevel.nodes(proto):
        if node.domain not in ("", "ai.onnx"):
            continue
        try:
            onnx.defs.get_schema(node.op_type, max_opset, "")
        except onnx.defs.SchemaError:
            since = _since(node.op_type)
            raise BadInput(
                f"node '{node.name or node.op_type}' ({node.op_type}{f', opset {since}+' if since else ''}) "
                f"cannot run on onnxruntime {version} (max opset {max_opset}); request a newer runtime "
                "or change the model"
            ) from None


def _since(op_type: str) -> int | None:
    """The opset that introduced ``op_type`` (None for ops onnx does not know)."""
    versions = [s.since_version for s in onnx.defs.get_all_schemas_with_history() if s.name == op_type and s.domain == ""]
    return min(versions, default=None)


def check_ort_format(version: str | None) -> None:
    """A .ort artifact for a runtime older than the ORT format it is written in is refused."""
    if version is not None and _key(version) < _key(ORT_FORMAT_MIN):
        raise BadInput(
            f"runtime: onnxruntime {version} cannot read the ORT format (v6) this converter writes; "
            f"mobile (.ort) needs onnxruntime >= {ORT_FORMAT_MIN}"
        )
