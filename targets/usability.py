"""Which nodes NNAPI and CoreML (ML Program) can take: ORT's own partition checker, every node listed.

ORT's ``usability_checker`` gives counts and partitions; the per-node reasons (op not supported, an input
over the provider's rank limit, an input of dynamic or unknown shape) are recomputed here with the same
rules, for the nodes of subgraphs too, so the listed nodes are exactly the ones ORT counts as unsupported.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import TYPE_CHECKING

import onnx

from edgepipe.core.errors import one_line

if TYPE_CHECKING:
    from onnxruntime.tools.mobile_helpers.usability_checker import PartitioningInfo

logger = logging.getLogger(__name__)

COREML_CONFIG = "coreml_supported_mlprogram_ops.md"
# check_coreml_partitions passes max_rank=5 (CoreML takes tensors of rank 5 at most); NNAPI has no limit there
MAX_RANK = {"nnapi": 999, "coreml_mlprogram": 5}


def usability(proto: onnx.ModelProto, infer: bool = True) -> dict[str, dict]:
    """Per provider: ORT's partition summary and every unsupported node with its reasons.

    ``infer``: run onnx shape inference first (not for a graph read from a .ort, which holds ORT's own shapes).
    A model whose shapes cannot be inferred gets an entry saying so (verdict UNKNOWN) instead of a crash.
    """
    # Here, not at the top: `onnxruntime.tools` imports torch when it is installed (1.2 s), and every driver
    # process imports the targets (the build's preflight) without needing torch.
    from onnxruntime.tools.mobile_helpers import usability_checker as uc

    try:
        inferred = onnx.shape_inference.infer_shapes(proto) if infer else proto
        nnapi = uc.check_nnapi_partitions(inferred, require_fixed_input_sizes=True)
        coreml = uc.check_coreml_partitions(inferred, require_fixed_input_sizes=True, config_filename=COREML_CONFIG)
    except (onnx.shape_inference.InferenceError, ValueError) as exc:
        # e.g. shape inference that failed (so no shapes) or a graph onnx cannot infer: ORT's checker refuses it
        why = one_line(f"the model's shapes could not be established ({type(exc).__name__}: {exc})")
        logger.warning("usability report: %s", why)
        unknown = {"verdict": "UNKNOWN", "error": f"{why}; NNAPI and CoreML need known shapes, so usability was not assessed"}
        return {"nnapi": dict(unknown), "coreml_mlprogram": dict(unknown)}
    return {"nnapi": _info(nnapi, inferred, "nnapi"), "coreml_mlprogram": _info(coreml, inferred, "coreml_mlprogram")}


def _graphs(graph: onnx.GraphProto, outer: dict[str, onnx.ValueInfoProto], outer_inits: set[str], path: str
            ) -> Iterator[tuple[onnx.GraphProto, dict[str, onnx.ValueInfoProto], set[str], str]]:
    """Each graph with the value info and initializers its nodes see (outer scope included), as ORT walks them."""
    value_info = {**outer, **{v.name: v for v in (*graph.input, *graph.output, *graph.value_info)}}
    yield graph, value_info, outer_inits | {i.name for i in graph.initializer}, path
    inits = outer_inits | {i.name for i in graph.initializer}
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("g"):
                yield from _graphs(attr.g, value_info, inits, f"{path}/{node.name or node.op_type}/{attr.name}")


def _reasons(node: onnx.NodeProto, checker, value_info: dict, inits: set[str], ep: str) -> list[str]:
    """Why ``ep`` cannot take ``node`` (empty: it can), by usability_checker's rules."""
    reasons = []
    domain = node.domain or "ai.onnx"
    if not checker.is_op_supported(node):
        reasons.append(f"op {domain}:{node.op_type} is not in ORT's {ep} supported-op list")
    max_rank = MAX_RANK[ep]
    ranks = {i: len(value_info[i].type.tensor_type.shape.dim) for i in node.input
             if i and i in value_info and value_info[i].type.HasField("tensor_type")}
    over = {i: r for i, r in ranks.items() if r > max_rank}
    if node.op_type == "Transpose" and node.attribute and len(node.attribute[0].ints) > max_rank:
        over.setdefault(node.input[0], len(node.attribute[0].ints))
    if over:
        name, rank = next(iter(over.items()))
        reasons.append(f"input '{name}' has rank {rank}; {ep} takes rank {max_rank} at most")
    from onnxruntime.tools.mobile_helpers.usability_checker import is_fixed_size_tensor

    unknown = [i for i in node.input if not (is_fixed_size_tensor(value_info[i]) if i in value_info else i in inits)]
    if unknown:
        reasons.append(f"input '{unknown[0]}' has a dynamic or unknown shape")
    return reasons


def _info(info: PartitioningInfo, proto: onnx.ModelProto, ep: str) -> dict:
    checker = info.supported_ops_checker
    unsupported = []
    for graph, value_info, inits, path in _graphs(proto.graph, {}, set(), ""):
        for node in graph.node:
            reasons = _reasons(node, checker, value_info, inits, ep)
            if reasons:
                entry = {"node": node.name, "op": f"{node.domain or 'ai.onnx'}:{node.op_type}", "reason": "; ".join(reasons)}
                unsupported.append({**entry, "graph": path.lstrip("/")} if path else entry)
    share = info.num_supported_nodes / info.num_nodes if info.num_nodes else 0.0
    return {
        "nodes": info.num_nodes,  # subgraph nodes included
        "supported_nodes": info.num_supported_nodes,
        "share": round(share, 4),
        "partitions": info.num_partitions,
        "verdict": info.suitability().name,  # YES / MAYBE / NO, ORT's own rule
        "unsupported_ops": sorted(info.unsupported_ops),
        "unsupported_nodes": unsupported,
        "caveats": checker.get_caveats(),
    }
