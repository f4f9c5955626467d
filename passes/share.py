"""share.dedupe / share.cluster: store shared weights once; palettize large weights to 2^k values."""

from __future__ import annotations

import hashlib
import sys
from typing import Literal

import numpy as np
import onnx_ir as ir
from onnx_ir.passes import common
from pydantic import Field

from edgepipe.passes.base import EdgepipePass, PassConfig, StatsResult, clone

FLOATS = (ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.DOUBLE, ir.DataType.BFLOAT16)


class DedupeConfig(PassConfig):
    transposed: bool = True  # also merge B where B == A.T (torch's tied embedding + output projection)
    min_elements: int = Field(16, ge=1)  # transposed copies smaller than this are left alone


def _init_bytes(graph: ir.Graph) -> int:
    return sum(v.const_value.nbytes for v in graph.initializers.values() if v.const_value is not None)


def _key(array: np.ndarray) -> tuple:
    """dtype, shape and a digest of the contents (not the bytes: big embeddings would be held twice)."""
    return (array.dtype.str, array.shape, hashlib.sha256(np.ascontiguousarray(array).data).hexdigest())


def _is_weight(value: ir.Value, graph: ir.Graph) -> bool:
    return value.const_value is not None and not value.is_graph_input() and not value.is_graph_output()


class ShareDedupe(EdgepipePass):
    """Stores identical initializers once, and transposed copies once plus a Transpose.

    Exact duplicates go through onnx-ir's ``DeduplicateInitializersPass`` (with
    no size limit: its default skips tensors above 1024 elements, i.e. every
    weight that matters). Then a 2-D initializer ``B`` equal to ``A.T`` of
    another initializer ``A`` is removed: Gemm consumers flip ``transB`` and
    read ``A``; other consumers read ``Transpose(A)``. This is the tied
    input/output embedding that torch's TorchScript exporter writes twice.
    ORT folds the Transpose at session start, so the file shrinks but resident
    memory does not; run this after ``optimize.ort``, which would fold it back.
    """

    name = "share.dedupe"
    Config = DedupeConfig

    def call(self, model: ir.Model) -> StatsResult:
        out = clone(model)
        graph = out.graph
        names, size = len(graph.initializers), _init_bytes(graph)
        common.DeduplicateInitializersPass(size_limit=sys.maxsize)(out)
        exact = names - len(graph.initializers)
        transposed = _merge_transposed(graph, self.config.min_elements) if self.config.transposed else []
        if transposed:
            common.TopologicalSortPass()(out)
        saved = size - _init_bytes(graph)
        stats = {"merged": exact, "transposed_merged": len(transposed), "tensors_merged": exact + len(transposed), "bytes_saved": saved}
        if transposed:
            stats["transposed_pairs"] = transposed
        return StatsResult(out, modified=bool(exact or transposed), stats=stats)


def _merge_transposed(graph: ir.Graph, min_elements: int) -> list[str]:
    """Replace every 2-D initializer that is the transpose of an earlier one; returns 'B=A.T' lines."""
    seen: dict[tuple, ir.Value] = {}
    merged = []
    for value in list(graph.initializers.values()):
        tensor = value.const_value
        if not _is_weight(value, graph) or tensor.dtype not in FLOATS or len(tensor.shape) != 2:
            continue
        array = tensor.numpy()
        if array.size < min_elements:
            continue
        keep = seen.get(_key(array.T))
        if keep is not None and not np.array_equal(keep.const_value.numpy(), array.T):
            keep = None  # a digest collision: never merge on a hash alone
        if keep is None or keep is value:
            seen.setdefault(_key(array), value)
            continue
        _rewire_to_transpose(graph, value, keep)
        graph.initializers.pop(value.name)
        merged.append(f"{value.name}={keep.name}.T")
    return merged


def _rewire_to_transpose(graph: ir.Graph, dup: ir.Value, keep: ir.Value) -> None:
    transposed: ir.Value | None = None
    for node, index in list(dup.uses()):
        if node.op_type == "Gemm" and node.domain == "" and index == 1:
            trans_b = node.attributes.get("transB")
            flag = trans_b.as_int() if trans_b is not None else 0
            node.attributes["transB"] = ir.AttrInt64("transB", 1 - flag)
            node.replace_input_with(index, keep)
            continue
        if transposed is None:
            t = ir.node("Transpose", [keep], attributes={"perm": [1, 0]}, name=f"{dup.name}/share_transpose")
            t.outputs[0].name = f"{dup.name}__shared_T"
            t.outputs[0].shape, t.outputs[0].type = dup.shape, dup.type
            graph.append(t)
            transposed = t.outputs[0]
        node.replace_input_with(index, transposed)


class ClusterConfig(PassConfig):
    bits: int = Field(4, ge=1, le=8)  # 2^bits shared values per tensor
    min_elements: int = Field(4096, ge=2)  # smaller weights stay as they are
    iterations: int = Field(20, ge=1, le=200)
    op_types: list[str] = ["MatMul", "Gemm", "Conv", "Gather"]
    init: Literal["quantile", "linear"] = "quantile"


CLUSTER_TAG = "__palette_idx"


class ShareCluster(EdgepipePass):
    """k-means palettization: each large weight becomes 2^bits float values plus uint8 indices.

    A weight ``W`` is replaced by ``Gather(codebook, Cast(indices, int32))``:
    plain ONNX ops every runtime has, so ORT runs it (and expands it in
    memory at session start: this saves file/download size, not RAM or
    time). Indices are stored one per byte; ``bits < 8`` still costs 8 bits
    in the file but zip-compresses further. Stats list each tensor's relative
    reconstruction error. Run it last: constant folding would undo it.
    """

    name = "share.cluster"
    Config = ClusterConfig

    def call(self, model: ir.Model) -> StatsResult:
        c = self.config
        out = clone(model)
        graph = out.graph
        before = _init_bytes(graph)
        layers = {}
        for value in list(graph.initializers.values()):
            tensor = value.const_value
            if not _is_weight(value, graph) or tensor.dtype != ir.DataType.FLOAT or value.name.endswith(CLUSTER_TAG):
                continue
            array = tensor.numpy()
            if array.size < max(c.min_elements, 2**c.bits + 1):
                continue
            if not any(n.op_type in c.op_types for n, _ in value.uses()):
                continue
            codebook, idx = kmeans_1d(array.ravel(), 2**c.bits, c.iterations, c.init)
            recon = codebook[idx].reshape(array.shape)
            err = float(np.linalg.norm(recon - array) / max(np.linalg.norm(array), 1e-30))
            _replace_with_palette(graph, value, codebook, idx.reshape(array.shape).astype(np.uint8))
            layers[value.name] = {"elements": int(array.size), "rel_error": round(err, 5)}
        if layers:
            common.TopologicalSortPass()(out)
        after = _init_bytes(graph)
        stats = {"tensors": len(layers), "bits": c.bits, "bytes_before": before, "bytes_after": after, "layers": layers}
        if layers:
            stats["max_rel_error"] = max(v["rel_error"] for v in layers.values())
        return StatsResult(out, modified=bool(layers), stats=stats)


def kmeans_1d(x: np.ndarray, k: int, iterations: int, init: str = "quantile") -> tuple[np.ndarray, np.ndarray]:
    """Lloyd's k-means on scalars: (sorted codebook float32[k], index of each x)."""
    x = x.astype(np.float64)
    if init == "quantile":
        centers = np.quantile(x, (np.arange(k) + 0.5) / k)
    else:
        centers = np.linspace(x.min(), x.max(), k)
    for _ in range(iterations):
        centers = np.unique(centers)
        idx = _assign(x, centers)
        sums = np.bincount(idx, weights=x, minlength=len(centers))
        counts = np.bincount(idx, minlength=len(centers))
        new = np.where(counts > 0, sums / np.maximum(counts, 1), centers)
        if np.allclose(new, centers, rtol=0, atol=1e-12):
            break
        centers = new
    centers = np.sort(centers)
    return centers.astype(np.float32), _assign(x, centers)


def _assign(x: np.ndarray, centers: np.ndarray) -> np.ndarray:
    """Nearest center for sorted centers: a binary search on the midpoints."""
    return np.searchsorted((centers[1:] + centers[:-1]) / 2, x).astype(np.int64)


def _initializer(name: str, array: np.ndarray) -> ir.Value:
    tensor = ir.tensor(array, name=name)
    return ir.Value(name=name, shape=ir.Shape(array.shape), type=ir.TensorType(tensor.dtype), const_value=tensor)


def _replace_with_palette(graph: ir.Graph, value: ir.Value, codebook: np.ndarray, idx: np.ndarray) -> None:
    book, index = _initializer(f"{value.name}__palette", codebook), _initializer(value.name + CLUSTER_TAG, idx)
    graph.register_initializer(book)
    graph.register_initializer(index)
    cast = ir.node("Cast", [index], attributes={"to": ir.DataType.INT32}, name=f"{value.name}/palette_cast")
    gather = ir.node("Gather", [book, cast.outputs[0]], attributes={"axis": 0}, name=f"{value.name}/palette_gather")
    gather.outputs[0].name = f"{value.name}__clustered"
    gather.outputs[0].shape, gather.outputs[0].type = value.shape, value.type
    graph.append(cast)
    graph.append(gather)
    value.replace_all_uses_with(gather.outputs[0])
    graph.initializers.pop(value.name)
