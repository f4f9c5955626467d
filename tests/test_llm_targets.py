"""Decoder gpu and mobile targets on a tiny random-weight Llama: the forms they ship, checked and replayed on ORT CPU."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from llm_util import recipe, tiny_lm

from edgepipe.cli import main
from edgepipe.core.manifest import Manifest
from edgepipe.pipeline.decoder.replay import load_prompts, replay
from edgepipe.pipeline.decoder.runtime import OrtDecoder
from edgepipe.targets.ortgraph import load_ort

F16, F32 = onnx.TensorProto.FLOAT16, onnx.TensorProto.FLOAT


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    """One build of the gpu and mobile targets (budget wide enough for random weights)."""
    work = tmp_path_factory.mktemp("tiny-targets")
    lm = tiny_lm(work / "lm", "llama")
    path = recipe(work, str(lm), "accuracy: {metric: perplexity, percent_max_drop: 50}\ntargets: [gpu, mobile]\n")
    assert main(["build", str(path), "-o", str(work / "out"), "--quiet", "--executor", "inprocess"]) == 0
    return work / "out" / "tiny-lm"


def _graph(path: Path) -> onnx.GraphProto:
    return onnx.load(str(path), load_external_data=False).graph


def _io_type(graph: onnx.GraphProto, name: str) -> int:
    return next(v.type.tensor_type.elem_type for v in [*graph.input, *graph.output] if v.name == name)


def test_gpu_ships_the_cuda_form_fp16_and_int4(built):
    gpu = built / "gpu"
    fp16 = _graph(gpu / "model.onnx")
    assert _io_type(fp16, "logits") == F16 and _io_type(fp16, "past_key_values.0.key") == F16 and _io_type(fp16, "input_ids") != F16
    assert not [i.name for i in fp16.initializer if i.data_type == F32]  # every float weight is fp16
    assert sum(n.op_type == "GroupQueryAttention" for n in fp16.node) == 2
    embed = next(n for n in fp16.node if n.op_type == "Gather" and n.input[1] == "input_ids")
    table = next(i for i in fp16.initializer if i.name == embed.input[0])
    assert [sorted(i.dims) for i in fp16.initializer].count(sorted(table.dims)) == 1  # the tied LM head: one copy
    int4 = _graph(gpu / "model.int4.onnx")
    inits = {i.name: i for i in int4.initializer}
    nbits = [n for n in int4.node if n.op_type == "MatMulNBits"]
    assert nbits and all(inits[n.input[2]].data_type == F16 for n in nbits)  # fp16 scales, as the builder writes for cuda
    assert {a.i for n in nbits for a in n.attribute if a.name == "accuracy_level"} <= {0}  # 0 (the default): CUDA's, not the CPU int8 path
    assert _io_type(int4, "logits") == F16 and _io_type(int4, "present.1.value") == F16
    config = json.loads((gpu / "genai_config.json").read_text())["model"]["decoder"]
    assert config["filename"] == "model.int4.onnx" and "cuda" in config["session_options"]["provider_options"][0]


def test_gpu_manifest_checks_both_models_and_says_what_ran_in_fp16(built):
    manifest = json.loads((built / "gpu" / "manifest.json").read_text())
    models = {m["model_file"]: m for m in manifest["models"]}
    assert set(models) == {"model.onnx", "model.int4.onnx"} and manifest["model_file"] == "model.onnx"
    for m in models.values():
        assert m["accuracy"]["passed"] and m["generation"]["greedy"]["prompts"] == 3 and m["golden"]["file"] in manifest["files"]
        assert m["runtime"]["providers"] == ["CPUExecutionProvider"] and "CUDAExecutionProvider" in m["runtime"]["requested_providers"]
        ran = m["checked_on"]
        assert ran["fp16_nodes"]["GroupQueryAttention"] == 2 and ran["float32_nodes"]["Sigmoid"] == 2 and ran["inserted_casts"] > 0
    assert models["model.onnx"]["checked_on"]["float32_nodes"]["MatMul"] == 11  # no fp16 MatMul kernel on CPU
    assert models["model.int4.onnx"]["checked_on"]["fp16_nodes"]["MatMulNBits"] == 11
    int4 = next(p for p in models["model.int4.onnx"]["passes"] if p["name"] == "quantize.int4")
    assert int4["stats"]["searched_scales"] == 11  # the fp16 weights get searched scales too (stored as fp16)
    assert models["model.onnx"]["generation"]["next_token"]["top1"] >= 0.95  # fp16 keeps the float model's argmax
    assert models["model.onnx"]["size"]["ratio"] < 0.6 and models["model.int4.onnx"]["size"]["ratio"] < 0.25


def test_mobile_ships_a_batch_1_ort_file_with_its_operator_list(built):
    mobile = built / "mobile"
    assert (mobile / "model.ort").is_file() and not list(mobile.glob("*.onnx*"))
    ops = (mobile / "required_operators.config").read_text()
    assert "GroupQueryAttention" in ops and "MatMulNBits" in ops
    dec = OrtDecoder(mobile / "model.ort")
    assert all(i.shape[0] == 1 for i in dec.session.get_inputs()) and all(o.shape[0] == 1 for o in dec.session.get_outputs())
    with pytest.raises(Exception, match="(?i)dimension|shape"):
        dec.run(np.ones((2, 4), np.int64), dec.empty_past(2))
    assert dec.run(np.arange(3, 9).reshape(1, -1), dec.empty_past())[0].shape[:2] == (1, 6)
    config = json.loads((mobile / "genai_config.json").read_text())
    assert config["model"]["decoder"]["filename"] == "model.ort" and config["search"]["max_length"] <= 2048
    manifest = json.loads((mobile / "manifest.json").read_text())
    assert manifest["model_file"] == "model.ort" and manifest["passes"][-1]["name"] == "shapes.fix"
    graph = load_ort(mobile / "model.ort").graph  # the tied embedding reads the LM head's int4 weight, not a copy of it
    lookup = next(n for n in graph.node if n.op_type == "GatherBlockQuantized")
    assert lookup.input[0] not in {i.name for i in graph.initializer}


@pytest.mark.parametrize("target, golden", [("gpu", "golden.int4.npz"), ("mobile", "golden.npz")])
def test_onnxruntime_genai_runs_the_folder_as_is(built, target, golden):
    from edgepipe.pipeline.decoder.genai import genai_greedy

    prompts, tokens = load_prompts(built / target / golden)
    for prompt, want in zip(prompts, tokens, strict=True):  # gpu: genai's CPU build (no CUDA here), the config's model
        assert genai_greedy(built / target, [int(t) for t in prompt], len(want), cpu=True) == [int(t) for t in want]


def test_verify_replays_every_model_and_catches_a_changed_golden(built, tmp_path):
    for target in ("gpu", "mobile"):
        assert main(["verify", str(built / target)]) == 0
    copy = tmp_path / "gpu"
    shutil.copytree(built / "gpu", copy)
    with np.load(copy / "golden.int4.npz") as npz:
        arrays = dict(npz)
    arrays["tokens/1"] = arrays["tokens/1"].copy()
    arrays["tokens/1"][-1] = (arrays["tokens/1"][-1] + 1) % 300
    np.savez(copy / "golden.int4.npz", **arrays)
    assert main(["verify", str(copy)]) == 1
    failed = [name for name, ok, _ in replay(copy, Manifest.from_json(json.loads((copy / "manifest.json").read_text()))) if not ok]
    assert failed == ["golden:model.int4.onnx:prompt 1"]  # the fp16 model's golden still replays

