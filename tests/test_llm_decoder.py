"""Decoder LLMs (task text-generation) on tiny random-weight Llama/Qwen2 models: export, quantize, build, verify, genai."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from llm_util import recipe, tiny_lm

from edgepipe.cli import main
from edgepipe.passes.int4 import Int4Config
from edgepipe.pipeline.decoder.export import check_export
from edgepipe.pipeline.decoder.graph import build_graph
from edgepipe.pipeline.decoder.quantize import Quantized, summary
from edgepipe.pipeline.decoder.runtime import OrtDecoder, TorchDecoder


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> Path:
    return tiny_lm(tmp_path_factory.mktemp("tiny-llama"), "llama")


@pytest.fixture(scope="module")
def built(llama, tmp_path_factory) -> Path:
    """One int4 build of the tiny Llama (cpu), budget wide enough for random weights."""
    work = tmp_path_factory.mktemp("tiny-build")
    path = recipe(work, str(llama), "accuracy: {metric: perplexity, percent_max_drop: 50}\n")
    assert main(["build", str(path), "-o", str(work / "out"), "--quiet"]) == 0
    return work / "out" / "tiny-lm" / "cpu"


def _model(folder: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(folder)).eval()


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_fused_graph_matches_torch_at_every_cache_length(family, tmp_path):
    folder = tiny_lm(tmp_path / family, family, tokenizer_files=False)
    model = _model(folder)
    build_graph(model, tmp_path / "model.onnx")
    ids = np.random.default_rng(0).integers(3, 300, 23)
    checks = check_export(tmp_path / "model.onnx", TorchDecoder(model), ids)
    assert [c["case"] for c in checks][:3] == ["past 0 (prefill)", "past 1", "past 22"]
    assert all(c["passed"] for c in checks), checks
    assert max(c["max_abs"] for c in checks) < 1e-3


def test_cache_check_catches_a_wrong_graph(llama, tmp_path):
    """The export check is not vacuous: a graph with the rotary embedding switched off fails it."""
    model = _model(llama)
    build_graph(model, tmp_path / "model.onnx")
    proto = onnx.load(str(tmp_path / "model.onnx"))
    for node in proto.graph.node:
        for attr in node.attribute:
            if attr.name == "do_rotary":
                attr.i = 0
    onnx.save_model(proto, str(tmp_path / "broken.onnx"), save_as_external_data=True, location="broken.onnx.data")
    checks = check_export(tmp_path / "broken.onnx", TorchDecoder(model), np.arange(3, 20))
    assert not all(c["passed"] for c in checks)


def test_mixed_precision_and_tied_embedding(llama, tmp_path):
    model = _model(llama)
    build_graph(model, tmp_path / "model.onnx")
    q = Quantized.prepare(onnx.load(str(tmp_path / "model.onnx")), Int4Config())
    assert q.groups() == ["layer.0", "layer.1", "lm_head"]
    all4 = q.build({})
    mixed = q.build({"layer.1": 8})
    assert summary(all4) == {"int4": 11, "int8": 0, "float": 0, "tied_embedding": 1}
    assert summary(mixed)["int8"] == 5 and summary(mixed)["int4"] == 6
    assert not any(i.name == "model.embed_tokens.weight" for i in all4.graph.initializer)  # the float table is gone
    ids = np.arange(3, 40)
    ref = TorchDecoder(model).logits(ids)
    err4 = np.abs(OrtDecoder(all4.SerializeToString()).logits(ids) - ref).mean()
    err8 = np.abs(OrtDecoder(q.build({g: 8 for g in q.groups()}).SerializeToString()).logits(ids) - ref).mean()
    assert err8 < err4 / 4  # int8 everywhere is much closer to float than int4


def test_searched_int4_scales_cut_the_error_where_activations_are_large(tmp_path):
    """One MatMul whose input has a few loud channels (as LLM activations do): the searched scales' output error
    is well below round-to-nearest's, in ORT's own MatMulNBits layout."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    k, n = 128, 96
    w = rng.normal(0, 0.05, (k, n)).astype(np.float32)
    x = rng.normal(0, 1, (256, k)).astype(np.float32) * np.where(rng.random(k) < 0.1, 20.0, 1.0).astype(np.float32)
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"], name="/layers.0/mlp/down_proj/MatMul")], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["t", k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["t", n])], [numpy_helper.from_array(w, "w")])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    importance = {"x": np.square(x).mean(0)}
    errors = []
    for imp in (None, importance):
        q = Quantized.prepare(onnx.ModelProto.FromString(proto.SerializeToString()), Int4Config(), bits=(4,), importance=imp)
        assert q.searched == (1 if imp else 0) and summary(q.by_bits[4])["int4"] == 1
        y = ort.InferenceSession(q.by_bits[4].SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
        errors.append(float(np.square(y - x @ w).mean()))
    assert errors[1] < 0.7 * errors[0], errors


def test_searched_scales_in_the_decoder_keep_its_layout(llama, tmp_path):
    from edgepipe.pipeline.decoder.scales import input_importance

    model = _model(llama)
    build_graph(model, tmp_path / "model.onnx")
    rng = np.random.default_rng(1)
    importance = input_importance(tmp_path / "model.onnx", [rng.integers(3, 300, 40) for _ in range(4)])
    assert len(importance) == 9 and all(v.shape in ((64,), (128,)) and (v > 0).all() for v in importance.values())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx", "model.onnx.data"]  # the probe graph is gone
    searched = Quantized.prepare(onnx.load(str(tmp_path / "model.onnx")), Int4Config(), importance=importance)
    assert searched.searched == 11
    all4 = searched.build({"layer.1": 8})
    assert summary(all4) == {"int4": 6, "int8": 5, "float": 0, "tied_embedding": 1}  # the searched head still ties
    ids = rng.integers(3, 300, 40)
    ref = TorchDecoder(model).logits(ids)
    got = OrtDecoder(all4.SerializeToString()).logits(ids)
    cosine = (got * ref).sum(-1) / np.linalg.norm(got, axis=-1) / np.linalg.norm(ref, axis=-1)
    assert cosine.mean() > 0.8  # int4 of random weights at hidden 64 is rough (~0.87); garbled weights are ~0


def test_build_writes_a_checked_genai_ready_artifact(built):
    manifest = json.loads((built / "manifest.json").read_text())
    for name in ("model.onnx", "model.onnx.data", "genai_config.json", "tokenizer.json", "golden.npz"):
        assert name in manifest["files"], name
    gen = manifest["generation"]
    assert 0.0 <= gen["next_token"]["top1"] <= 1.0 and gen["next_token"]["positions"] > 20
    assert gen["greedy"]["prompts"] == 3 and len(gen["greedy"]["matched"]) == 3
    assert manifest["accuracy"]["metric"] == "perplexity" and manifest["accuracy"]["passed"]
    assert manifest["source"]["export_check"]["passed"] and manifest["source"]["export"] == "fused"
    assert manifest["passes"][0]["stats"]["int4"] > 0 and manifest["passes"][0]["stats"]["searched_scales"] == 11
    assert manifest["latency"]["decode_tokens_per_s"] > 0 and manifest["latency"]["prefill_ms"] > 0
    report = (built.parent / "report.html").read_text()
    assert f"{gen['perplexity']['artifact']:.3f}" in report and f"{gen['next_token']['top1']:.4f}" in report
    config = json.loads((built / "genai_config.json").read_text())
    assert config["model"]["decoder"]["num_hidden_layers"] == 2 and config["model"]["decoder"]["num_key_value_heads"] == 2


def test_onnxruntime_genai_runs_the_artifact_as_is(built):
    from edgepipe.pipeline.decoder.genai import genai_greedy
    from edgepipe.pipeline.decoder.replay import load_prompts

    prompts, tokens = load_prompts(built / "golden.npz")
    for prompt, want in zip(prompts, tokens, strict=True):
        assert genai_greedy(built, [int(t) for t in prompt], len(want)) == [int(t) for t in want]


def test_verify_replays_greedy_tokens_and_catches_a_changed_golden(built, tmp_path, capsys):
    assert main(["verify", str(built)]) == 0
    copy = tmp_path / "cpu"
    shutil.copytree(built, copy)
    with np.load(copy / "golden.npz") as npz:
        arrays = dict(npz)
    arrays["tokens/0"] = arrays["tokens/0"].copy()
    arrays["tokens/0"][0] = (arrays["tokens/0"][0] + 1) % 300
    np.savez(copy / "golden.npz", **arrays)
    assert main(["verify", str(copy)]) == 1  # hashes catch it
    manifest = json.loads((copy / "manifest.json").read_text())
    from edgepipe.core.manifest import Manifest
    from edgepipe.pipeline.decoder.replay import replay

    results = replay(copy, Manifest.from_json(manifest))
    assert not results[0][1] and all(ok for _, ok, _ in results[1:])  # and so does the replay itself


def test_bench_reports_prefill_and_decode(built, capsys):
    assert main(["bench", str(built), "--json", "--prefill", "16", "--decode", "8", "--runs", "1"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["prefill_tokens"] == 16 and result["decode_tokens"] == 8
    assert result["prefill_ms"] > 0 and result["decode_tokens_per_s"] > 0 and result["peak_rss_mb"] > 0


def test_other_architectures_export_through_optimum(tmp_path):
    """GPT-2 is not Llama-family: optimum-onnx's text-generation-with-past export, checked the same way."""
    from llm_util import tokenizer
    from transformers import GPT2Config, GPT2LMHeadModel

    from edgepipe.pipeline.decoder.export import export_decoder
    from edgepipe.pipeline.decoder.scales import input_importance
    from edgepipe.pipeline.decoder.source import CausalLM

    tok = tokenizer(tmp_path / "tok")
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_embd=64, n_layer=2, n_head=4, n_positions=128)).eval()
    exported = export_decoder(CausalLM(model, tok, "tiny gpt2"), tmp_path, np.arange(3, 30))
    assert exported.backend == "optimum" and all(c["passed"] for c in exported.checks)
    assert "position_ids" in OrtDecoder(exported.path).inputs
    # its Conv1D layers are Gemm nodes: no MatMul weight for int4's scale search to weigh (was: every output returned)
    assert input_importance(exported.path, [np.arange(3, 20)]) == {}


def test_dry_run_checks_without_loading(llama, tmp_path):
    path = recipe(tmp_path, str(llama))
    assert main(["build", str(path), "--dry-run", "-o", str(tmp_path / "out")]) == 0
    (tmp_path / "prompts.txt").unlink()
    assert main(["build", str(path), "--dry-run", "-o", str(tmp_path / "out")]) == 2
    assert not (tmp_path / "out").exists()


def test_mixed_precision_keeps_the_fewest_int8_blocks_that_meet_the_budget(llama, tmp_path):
    from edgepipe.pipeline.decoder.precision import choose, perplexity_of

    build_graph(_model(llama), tmp_path / "model.onnx")
    q = Quantized.prepare(onnx.load(str(tmp_path / "model.onnx")), Int4Config())
    seqs = [np.random.default_rng(i).integers(3, 300, 30) for i in range(3)]
    all4 = perplexity_of(q.build({}), seqs).perplexity
    both8 = perplexity_of(q.build({"layer.0": 8, "layer.1": 8}), seqs).perplexity
    assert both8 != all4
    limit = both8 + 1e-6 if both8 < all4 else all4 - 1e-6
    choice = choose(q, seqs, seqs, lambda tf: tf.perplexity <= limit, max_groups=2)
    assert not choice.steps[0]["passed"] and choice.steps[-1]["passed"]
    assert 1 <= len(choice.plan) <= 2 and summary(choice.model)["int8"] == 5 * len(choice.plan)
    assert [r["node"] for r in choice.sensitivity] and "lm_head" not in choice.plan  # the tied head stays int4


def test_larger_int4_blocks_ship_only_when_they_meet_the_budget(llama, tmp_path):
    from edgepipe.pipeline.decoder.precision import choose_blocks

    build_graph(_model(llama), tmp_path / "model.onnx")

    def prepare(size: int, bits: tuple[int, ...]) -> Quantized:
        return Quantized.prepare(onnx.load(str(tmp_path / "model.onnx")), Int4Config(block_size=size), bits=bits)

    def blocks(model: onnx.ModelProto) -> set[int]:
        return {a.i for n in model.graph.node if n.op_type == "MatMulNBits" for a in n.attribute if a.name == "block_size"}

    seqs = [np.random.default_rng(i).integers(3, 300, 30) for i in range(2)]
    first = choose_blocks(prepare, [64, 16], seqs, seqs, lambda tf: True, max_groups=0)
    assert first.block_size == 64 and blocks(first.model) == {64} and len(first.steps) == 1
    assert summary(first.model)["tied_embedding"] == 1
    limit = first.steps[0]["metric"] - 1e-6  # block 64 now breaks the budget: block 16 ships, the attempt recorded
    second = choose_blocks(prepare, [64, 16], seqs, seqs, lambda tf: tf.perplexity <= limit, max_groups=0)
    assert second.block_size == 16 and blocks(second.model) == {16}
    assert [(s["block_size"], s["passed"]) for s in second.steps][0] == (64, False) and second.steps[-1]["block_size"] == 16
