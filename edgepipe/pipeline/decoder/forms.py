"""What each target ships for a decoder: the model forms (precision, batch, file format) and their genai settings.

- cpu: ``model.onnx``, float32 activations, weight-only int4 (``accuracy_level`` 4: int8 compute).
- gpu: what onnxruntime-genai's builder writes for ``-e cuda``: ``model.onnx`` in fp16 (``-p fp16``: fp16
  weights, activations, KV cache and logits) and ``model.int4.onnx`` (``-p int4``: MatMulNBits over the fp16
  graph, so fp16 scales; ``accuracy_level`` 0 as the builder sets for CUDA). Both are checked on ORT's CPU
  provider here; :func:`precision_on_cpu` records which of their nodes ORT ran in float32 instead.
- mobile: batch fixed to 1, int4 as cpu, written as ``model.ort`` (ORT's converter, Fixed style, ARM) with
  ``required_operators.config`` for a reduced build; onnxruntime-genai loads the ``.ort`` file, with a
  2048-token context so the shared KV buffer stays small.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any

import onnx

logger = logging.getLogger(__name__)

CUDA = ["CUDAExecutionProvider", "CPUExecutionProvider"]
CPU = ["CPUExecutionProvider"]
MOBILE_CONTEXT = 2048  # tokens: genai allocates the shared KV buffer for all of them (SmolLM2 fp32: 46 KB/token)
# The decoder graph is written fused; ORT's "all" level would only add constant folding, which turns the Reshape
# that lets the embedding read the LM head's int4 weight into a second 14 MB copy in the .ort (SmolLM2: 104.3 MB
# vs 90.2 MB, same logits, decode speed within noise), and a SiLU → QuickGelu fusion. A full ORT build does not
# re-optimize an .ort at load, so what is written is what runs.
ORT_LEVEL = "disable"
FP16_SPEED_NOTE = ("timed on ORT's CPU provider, which runs this fp16 graph's float32-only ops (float32_nodes) between "
                   "Casts it inserts: not a CUDA speed")


@dataclasses.dataclass(frozen=True)
class Form:
    """One model of a target folder."""

    key: str  # float | int4 | fp16
    model_file: str
    golden_file: str
    quantized: bool  # weight-only int4/int8 (the target's quantize.int4 pass)
    fp16: bool = False  # fp16 weights, activations and I/O (the builder's CUDA form); quantized after conversion
    batch: int | None = None  # a fixed batch size (mobile)
    ort_format: bool = False  # written as .ort (mobile)


@dataclasses.dataclass(frozen=True)
class Layout:
    target: str
    description: str
    forms: tuple[Form, ...]
    providers: list[str]  # what the checks ask ORT for (the manifest records what really ran)
    genai_provider: str | None = None  # provider_options in genai_config.json
    context_length: int | None = None  # None: the model's max_position_embeddings
    quant_defaults: dict[str, Any] = dataclasses.field(default_factory=dict)  # quantize.int4 options this target changes

    @property
    def genai_model(self) -> str:
        """The model genai_config.json names: the int4 one where the folder has several (the deployable size)."""
        return next((f.model_file for f in self.forms if f.quantized), self.forms[0].model_file)


def layout(target: str, quantized: bool) -> Layout:
    """The forms ``target`` ships; ``quantized`` False (``passes: []``) keeps the float weights."""
    if target == "gpu":
        fp16 = Form("fp16", "model.onnx", "golden.npz", quantized=False, fp16=True)
        int4 = Form("int4", "model.int4.onnx", "golden.int4.npz", quantized=True, fp16=True)
        return Layout("gpu", "ONNX Runtime CUDA (onnxruntime-genai -e cuda form): fp16 model.onnx and int4 model.int4.onnx "
                      "(MatMulNBits, fp16 scales), GroupQueryAttention", (fp16, int4) if quantized else (fp16,), CUDA,
                      genai_provider="cuda", quant_defaults={"accuracy_level": 0})
    if target == "mobile":
        form = Form("int4" if quantized else "float", "model.ort", "golden.npz", quantized, batch=1, ort_format=True)
        return Layout("mobile", "ONNX Runtime Mobile / onnxruntime-genai on a phone: batch 1, model.ort (weight-only int4, "
                      "int8 compute), required_operators.config", (form,), CPU, context_length=MOBILE_CONTEXT)
    form = Form("int4" if quantized else "float", "model.onnx", "golden.npz", quantized)
    return Layout("cpu", "ONNX Runtime CPU: fused decoder (GroupQueryAttention), weight-only int4 with int8 where measured necessary",
                  (form,), CPU)


def to_fp16(model: onnx.ModelProto) -> onnx.ModelProto:
    """fp16 weights, activations and I/O (the KV cache and logits too), as the builder's ``-p fp16 -e cuda``.

    ORT's own converter (``onnxruntime.transformers.float16``); the mask → ``seqlens_k`` path stays integer.
    """
    import warnings

    from onnxruntime.transformers.float16 import convert_float_to_float16

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "the float32 number ... will be truncated": tiny weights round to fp16's subnormals
        return convert_float_to_float16(model, keep_io_types=False, disable_shape_infer=True)


def share_head(model: onnx.ModelProto) -> bool:
    """A tied LM head stored as the embedding's transpose → a Transpose of the embedding table: one copy in the file,
    as the builder writes its float forms (SmolLM2 fp16: 57 MB less). Only for a float head (MatMul on a constant)."""
    import numpy as np
    from onnx import helper, numpy_helper

    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    gather = next((n for n in graph.node if n.op_type == "Gather" and n.input[1] == "input_ids" and n.input[0] in inits), None)
    head = next((n for n in graph.node if n.op_type == "MatMul" and n.output[0] == "logits" and n.input[1] in inits), None)
    if gather is None or head is None:
        return False
    table, weight = inits[gather.input[0]], inits[head.input[1]]
    if list(weight.dims) != list(table.dims)[::-1] or not np.array_equal(numpy_helper.to_array(weight), numpy_helper.to_array(table).T):
        return False
    transpose = helper.make_node("Transpose", [table.name], ["/lm_head/tied_weight"], name="/lm_head/Transpose", perm=[1, 0])
    graph.node.insert(list(graph.node).index(head), transpose)
    head.input[1] = transpose.output[0]
    graph.initializer.remove(weight)
    return True


def fix_batch(model: onnx.ModelProto, batch: int) -> onnx.ModelProto:
    """Every graph input's and output's first dimension (``batch_size``) fixed to ``batch``, in place."""
    for value in [*model.graph.input, *model.graph.output]:
        dim = value.type.tensor_type.shape.dim[0]
        if dim.dim_param:
            dim.ClearField("dim_param")
            dim.dim_value = batch
    return model


def write_ort(model: onnx.ModelProto, folder: Path) -> dict[str, Any]:
    """``folder/model.ort`` and ``required_operators.config`` from ORT's converter (the mobile encoders' one)."""
    from edgepipe.targets.mobile import OPS_CONFIG, PLATFORM, converted

    work = Path(tempfile.mkdtemp(prefix="edgepipe-ort-"))
    try:
        src = work / "model.onnx"
        onnx.save_model(model, str(src), save_as_external_data=True, all_tensors_to_one_file=True,
                        location="model.onnx.data", size_threshold=1024)
        ort, config = converted(src, level=ORT_LEVEL)
        (folder / "model.ort").write_bytes(ort)
        (folder / OPS_CONFIG).write_text(config, encoding="utf-8")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    ops = [line for line in config.splitlines() if line and not line.startswith("#")]
    return {"ort_format": {"file": "model.ort", "optimization_style": "Fixed", "target_platform": PLATFORM,
                           "optimization_level": ORT_LEVEL, "converter": "onnxruntime.tools.convert_onnx_models_to_ort"},
            "required_operators": OPS_CONFIG, "operators": ops, "batch": 1,
            "checked_on_note": "checked on model.ort with the desktop CPU provider (x86): the same kernels as the ARM "
                               "build except MatMulNBits' int8 compute path (accuracy_level 4), which is CPU-specific"}


def precision_on_cpu(path: Path, work: Path) -> dict[str, Any]:
    """Which nodes of an fp16 graph ORT's CPU provider ran in fp16, and which in float32 through Casts it inserted.

    ORT has no fp16 CPU kernel for some ops (MatMul, Sigmoid, Mul, ...): at load it wraps them in
    fp16 → float32 → fp16 Casts (``InsertedPrecisionFreeCast_*``), so the check ran those in float32 on
    fp16-rounded values, not as a CUDA kernel would. Read from the graph ORT really runs (optimizations off).
    """
    import onnxruntime as ort

    from edgepipe.core.runtime import session

    work.mkdir(parents=True, exist_ok=True)
    optimized = work / "as_run.onnx"
    session(path, CPU, opt_level=ort.GraphOptimizationLevel.ORT_DISABLE_ALL, optimized_path=optimized,
            config={"session.optimized_model_external_initializers_file_name": "as_run.onnx.data",
                    "session.optimized_model_external_initializers_min_size_in_bytes": "1024"})
    graph = onnx.load(str(optimized), load_external_data=False).graph
    shutil.rmtree(work, ignore_errors=True)
    dtype = {v.name: v.type.tensor_type.elem_type for v in graph.input} | {i.name: i.data_type for i in graph.initializer}
    floats = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16}
    fp16: collections.Counter[str] = collections.Counter()
    fp32: collections.Counter[str] = collections.Counter()
    inserted = 0
    for node in graph.node:  # topological order: every input's type is known before its consumer
        if node.op_type == "Cast":
            out = next(a.i for a in node.attribute if a.name == "to")
            inserted += node.name.startswith("InsertedPrecisionFreeCast_")
        else:
            seen = [dtype[x] for x in node.input if dtype.get(x) in floats]
            out = seen[-1] if seen else onnx.TensorProto.INT64  # output follows the float inputs (scales for *BlockQuantized)
            if seen:
                (fp16 if out == onnx.TensorProto.FLOAT16 else fp32)[node.op_type] += 1
        for x in node.output:
            dtype[x] = out
    return {"provider": "CPUExecutionProvider", "fp16_nodes": dict(sorted(fp16.items())), "float32_nodes": dict(sorted(fp32.items())),
            "inserted_casts": inserted,
            "note": "CUDA was not run here: the fp16 graph ran on ORT's CPU provider; the float32_nodes have no fp16 CPU kernel "
                    "and ran in float32 between Casts ORT inserted (fp16-rounded inputs, float32 arithmetic)"}


def genai_settings(config: dict[str, Any], lay: Layout) -> dict[str, Any]:
    """The target's changes to genai_config.json: the provider, the context length."""
    if lay.genai_provider:
        config["model"]["decoder"]["session_options"]["provider_options"] = [{lay.genai_provider: {"enable_cuda_graph": "0"}}]
    if lay.context_length:
        context = min(lay.context_length, config["model"]["context_length"])
        config["model"]["context_length"] = config["search"]["max_length"] = context
    return config
