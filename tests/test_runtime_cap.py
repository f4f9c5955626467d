"""Runtime version capping: opset/IR converted down to what the requested onnxruntime loads."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from conftest import DIGITS, write_onnx_recipe

from edgepipe.cli import main
from edgepipe.core.errors import BadInput
from edgepipe.sources.accuracy import compare
from edgepipe.targets.compat import ORT_LIMITS, cap, requested

RELU21 = """<ir_version: 10, opset_import: ["" : 21]>
agraph (float[N, 4] x) => (float[N, 4] y) { y = Relu(x) }"""
GELU20 = """<ir_version: 10, opset_import: ["" : 20]>
agraph (float[N, 4] x) => (float[N, 4] y) { y = Gelu(x) }"""


def test_table_never_pairs_an_opset_with_a_newer_ir_version():
    """onnx's own release history: the IR version that came with each opset bounds what a runtime reading
    that opset can read. (Loading capped models in the old releases themselves: benchmarks/runtime_caps.py.)"""
    ir_of_opset: dict[int, int] = {}
    for _release, ir_version, opset, *_ in onnx.helper.VERSION_TABLE:
        ir_of_opset[opset] = max(ir_of_opset.get(opset, 0), ir_version)
    for version, (max_opset, max_ir) in ORT_LIMITS.items():
        assert max_ir <= ir_of_opset[max_opset], (version, max_opset, max_ir)
    order = sorted(ORT_LIMITS, key=lambda v: tuple(map(int, v.split("."))))
    assert [ORT_LIMITS[v] for v in order] == sorted(ORT_LIMITS[v] for v in order)  # newer runtimes never read less


def test_cap_converts_down_and_still_runs(tmp_path):
    model, info = cap(ir.from_onnx_text(RELU21), requested({"onnxruntime": "1.14.1"}))
    proto = ir.to_proto(model)
    assert info["opset"] == 18 and proto.ir_version == 8 and info["opset_before"] == 21
    assert next(o.version for o in proto.opset_import if o.domain == "") == 18
    path = tmp_path / "m.onnx"
    onnx.save(proto, str(path))
    x = np.array([[-1, 2, -3, 4]], np.float32)
    y = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    assert np.array_equal(y, np.maximum(x, 0))


def test_op_newer_than_the_runtime_names_node_and_version():
    with pytest.raises(BadInput, match=r"node 'Gelu' \(Gelu, opset 20\+\) cannot run on onnxruntime 1.16"):
        cap(ir.from_onnx_text(GELU20), "1.16")


@pytest.mark.parametrize("runtime, message", [
    ({"onnxruntime": "1.5"}, "not in edgepipe's compatibility table"),
    ({"onnxruntime": "latest"}, "not MAJOR.MINOR"),
    ({"tensorrt": "10"}, "unknown runtime"),
])
def test_bad_runtime_requests(runtime, message):
    with pytest.raises(BadInput, match=message):
        requested(runtime)


def test_cli_exit_2_and_nothing_written_for_an_op_the_runtime_lacks(tmp_path, capsys):
    onnx.save(ir.to_proto(ir.from_onnx_text(GELU20)), str(tmp_path / "gelu.onnx"))
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        "name: gelu\nmodel: {onnx: gelu.onnx}\ninputs: [{name: x, shape: [batch, 4]}]\n"
        "accuracy: {metric: cosine, max_drop: 0.01}\n"
        'targets: {cpu: {runtime: {onnxruntime: "1.16"}, passes: [{name: cleanup}]}}\n'
    )
    assert main(["build", str(recipe), "-o", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "Gelu" in err and "onnxruntime 1.16" in err and "Traceback" not in err
    assert not (tmp_path / "out" / "gelu" / "cpu").exists()


def test_digits_cpu_built_for_onnxruntime_1_17(digits_onnx, tmp_path):
    text = (DIGITS / "recipe.yaml").read_text().replace("targets: [cpu, mobile, gpu]", 'targets: {cpu: {runtime: {onnxruntime: "1.17"}}}')
    assert main(["build", str(write_onnx_recipe(tmp_path, digits_onnx, text)), "-o", str(tmp_path / "out"), "-q"]) == 0
    folder = tmp_path / "out" / "digits-cnn" / "cpu"
    manifest = json.loads((folder / "manifest.json").read_text())
    req = manifest["runtime"]["requested"]
    assert req["onnxruntime"] == "1.17" and req["max_opset"] == 20 and req["max_ir_version"] == 9
    model = onnx.load(str(folder / "model.onnx"))
    assert model.ir_version <= 9 and all(o.version <= 20 for o in model.opset_import if o.domain == "")
    assert manifest["accuracy"]["passed"] and main(["verify", str(folder)]) == 0


def _with(text: str, *initializers: onnx.TensorProto) -> onnx.ModelProto:
    model = onnx.parser.parse_model(text)
    model.graph.initializer.extend(initializers)
    return model


INT4 = onnx.helper.make_tensor("w4", onnx.TensorProto.INT4, [4], [1, -2, 3, -4])
F8CAST = """<ir_version: 9, opset_import: ["" : 19]>
g (float[N, 4] x) => (float[N, 4] y) { c = Cast <to = 17> (x)\n y = Cast <to = 1> (c) }"""
DQ4 = """<ir_version: 10, opset_import: ["" : 21]>
g (float[4] x) => (float[4] y) { s = Constant <value = float {0.5}> ()\n d = DequantizeLinear (w4, s)\n y = Add (x, d) }"""


def _function_with_default() -> onnx.ModelProto:
    """Opset 18, IR 9: a local function whose attribute has a default (IR 9); IR 8 readers would lose the default."""
    model = onnx.parser.parse_model("""<ir_version: 9, opset_import: ["" : 18, "local" : 1]>
    g (float[4] x) => (float[4] y) { y = local.scaled (x) }
    <domain: "local", opset_import: ["" : 18]>
    scaled <alpha: float = 2.0> (a) => (b) { b = LeakyRelu <alpha: float = @alpha> (a) }""")
    assert model.functions[0].attribute_proto
    return model


@pytest.mark.parametrize("model, version, feature", [
    (lambda: _with(DQ4, INT4), "1.17", "INT4"),
    (lambda: onnx.parser.parse_model(F8CAST), "1.14", "FLOAT8E4M3FN"),
    (lambda: _function_with_default(), "1.14", "function attribute defaults"),  # opset already 18: only the IR drops
])
def test_cap_refuses_types_the_target_ir_version_lacks(model, version, feature):
    with pytest.raises(BadInput, match=rf"{feature}.*needs ONNX IR version"):
        cap(ir.from_proto(model()), version)


def _sparse(model: onnx.ModelProto) -> onnx.ModelProto:
    values = onnx.helper.make_tensor("sp", onnx.TensorProto.FLOAT, [1], [2.0])
    indices = onnx.helper.make_tensor("sp_idx", onnx.TensorProto.INT64, [1], [0])
    model.graph.sparse_initializer.append(onnx.helper.make_sparse_tensor(values, indices, [4]))
    return model


def _function(model: onnx.ModelProto) -> onnx.ModelProto:
    model.functions.append(onnx.helper.make_function("local", "f", ["a"], ["b"], [onnx.helper.make_node("Relu", ["a"], ["b"])],
                                                     [onnx.helper.make_opsetid("", 17)]))
    return model


def _optional(model: onnx.ModelProto) -> onnx.ModelProto:
    elem = onnx.helper.make_tensor_type_proto(onnx.TensorProto.FLOAT, [4])
    model.graph.value_info.append(onnx.helper.make_value_info("o", onnx.helper.make_optional_type_proto(elem)))
    return model


def _training(model: onnx.ModelProto) -> onnx.ModelProto:
    model.training_info.add()
    return model


RELU8 = """<ir_version: 8, opset_import: ["" : 17]>
g (float[4] x) => (float[4] y) { y = Relu(x) }"""


@pytest.mark.parametrize("edit, max_ir, feature", [
    (lambda m: _with(RELU8.replace("{ y = Relu(x) }", "{ y = Add(x, k) }"),
                     onnx.helper.make_tensor("k", onnx.TensorProto.FLOAT, [4], [1, 2, 3, 4])), 3, "initializers that are not graph inputs"),
    (_sparse, 5, "sparse initializers"),
    (_training, 6, "training info"),
    (_function, 7, "model-local functions"),
    (_optional, 7, "optional type"),
])
def test_ir_lowering_refuses_features_older_ir_versions_lack(edit, max_ir, feature):
    from edgepipe.targets import irlevel

    model = edit(onnx.parser.parse_model(RELU8))
    with pytest.raises(BadInput, match=feature):
        irlevel.lower(model, max_ir, "onnxruntime test")
    assert model.ir_version == 8  # nothing changed
    irlevel.lower(model, 8, "onnxruntime test")  # the model's own IR version takes it


def _run(proto: onnx.ModelProto, feed: dict) -> list[np.ndarray]:
    return ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feed)


@pytest.mark.parametrize("version", ["1.17", "1.14"])
def test_digits_float_and_int8_capped_run_as_before(digits_onnx, digits_build, version):
    from passes_util import digits_split

    x = digits_split()[0][:32]
    for path in (digits_onnx, digits_build / "cpu" / "model.onnx"):
        original = onnx.load(str(path))
        capped, info = cap(ir.from_proto(original), version)
        proto = ir.to_proto(capped)
        max_opset, max_ir = ORT_LIMITS[version]
        assert proto.ir_version <= max_ir and all(o.version <= max_opset for o in proto.opset_import if o.domain in ("", "ai.onnx"))
        onnx.checker.check_model(proto, full_check=True)
        assert not any(n.metadata_props for n in proto.graph.node) if max_ir < 10 else True
        # no import of a domain no node uses: ORT's optimizer stamps ai.onnx.ml 5, which 1.17 refuses to load
        assert {o.domain for o in proto.opset_import} - {"", "ai.onnx"} <= {n.domain for n in proto.graph.node}
        (got,), (want,) = _run(proto, {"image": x}), _run(original, {"image": x})
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_a_used_ml_domain_newer_than_the_runtime_is_refused():
    model = onnx.parser.parse_model("""<ir_version: 10, opset_import: ["" : 21, "ai.onnx.ml" : 5]>
    g (float[N, 2] x) => (float[N, 2] y) { y = ai.onnx.ml.Normalizer <norm = "L2"> (x) }""")
    with pytest.raises(BadInput, match="ai.onnx.ml opset 5"):
        cap(ir.from_proto(model), "1.17")


def _encoder(layers: int = 2, d: int = 128, ff: int = 512, smooth: float = 8.0) -> onnx.ModelProto:
    """A small transformer-like encoder (pre-LN residual MLP blocks, final LayerNorm and projection) whose final
    LayerNorm's scale was moved into the projection's weights the way smoothquant moves it (the same float function):
    a few large weights read small activations, as in the MiniLM cpu artifact."""
    rng = np.random.default_rng(0)
    h, inits, nodes, x = onnx.helper, [], [], "x"

    def init(name: str, value: np.ndarray) -> str:
        inits.append(onnx.numpy_helper.from_array(value.astype(np.float32), name))
        return name

    for i in range(layers):
        ln = [x, init(f"g{i}", 1 + 0.1 * rng.standard_normal(d)), init(f"b{i}", 0.1 * rng.standard_normal(d))]
        nodes += [h.make_node("LayerNormalization", ln, [f"ln{i}"], axis=-1),
                  h.make_node("MatMul", [f"ln{i}", init(f"w{i}", rng.standard_normal((d, ff)) / np.sqrt(d))], [f"h{i}"]),
                  h.make_node("Relu", [f"h{i}"], [f"r{i}"]),
                  h.make_node("MatMul", [f"r{i}", init(f"v{i}", rng.standard_normal((ff, d)) / np.sqrt(ff))], [f"o{i}"]),
                  h.make_node("Add", [x, f"o{i}"], [f"x{i + 1}"])]
        x = f"x{i + 1}"
    gamma, proj = np.ones(d), rng.standard_normal((d, d)) / np.sqrt(d)
    gamma[::2], proj[::2] = 1 / smooth, proj[::2] * smooth
    nodes += [h.make_node("LayerNormalization", [x, init("gf", gamma), init("bf", np.zeros(d))], ["lnf"], axis=-1),
              h.make_node("MatMul", ["lnf", init("proj", proj)], ["y"])]
    graph = h.make_graph(nodes, "encoder", [h.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["batch", 64, d])],
                         [h.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["batch", 64, d])], inits)
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def _layernorm_in_double(model: onnx.ModelProto) -> onnx.ModelProto:
    """The same model with every LayerNormalization computed in float64 and rounded once: a float kernel that rounds
    differently, as onnxruntime 1.17.3's LayerNormalization does from 1.32's (benchmarks/runtime_caps.py)."""
    h, out, nodes = onnx.helper, onnx.ModelProto(), []
    out.CopyFrom(model)
    for n in out.graph.node:
        if n.op_type != "LayerNormalization":
            nodes.append(n)
            continue
        casts = [h.make_node("Cast", [i], [f"{i}__f64"], to=onnx.TensorProto.DOUBLE) for i in n.input]
        ln = h.make_node("LayerNormalization", [c.output[0] for c in casts], [f"{n.output[0]}__f64"], axis=-1)
        nodes += [*casts, ln, h.make_node("Cast", ln.output, [n.output[0]], to=onnx.TensorProto.FLOAT)]
    del out.graph.node[:]
    out.graph.node.extend(nodes)
    return out


def test_capped_int8_golden_covers_a_release_whose_float_kernels_round_differently(tmp_path):
    """The MiniLM cpu artifact capped for 1.17 failed its golden check on 1.17.3 (max |Δ| 0.0051, atol 0.0019):
    1.17.3's LayerNormalization rounds differently and dynamic int8 turns one rounding into quantization steps.
    A capped int8 build's golden atol now covers that, measured on the model; an uncapped build's is unchanged."""
    onnx.save(_encoder(), str(tmp_path / "encoder.onnx"))
    np.savez(tmp_path / "eval.npz", x=np.random.default_rng(5).standard_normal((8, 64, 128)).astype(np.float32))
    base = ("name: enc\nmodel: {onnx: encoder.onnx}\ninputs: [{name: x, shape: [batch, 64, 128]}]\ndata: {eval: eval.npz}\n"
            "accuracy: {metric: cosine, min_value: 0.9}\n")
    passes = "passes: [{name: quantize.dynamic, per_channel: true, reduce_range: false}], speed_check: false"
    goldens = {}
    for name, runtime in (("capped", ', runtime: {onnxruntime: "1.17"}'), ("uncapped", "")):
        (tmp_path / f"{name}.yaml").write_text(base + f"targets: {{cpu: {{{passes}{runtime}}}}}\n")
        assert main(["build", str(tmp_path / f"{name}.yaml"), "-o", str(tmp_path / name), "-q"]) == 0
        folder = tmp_path / name / "enc" / "cpu"
        manifest = json.loads((folder / "manifest.json").read_text())
        with np.load(folder / "golden.npz") as npz:
            feed, want = {"x": npz["input/x"]}, npz["expected/y"]
        other = ort.InferenceSession(_layernorm_in_double(onnx.load(str(folder / "model.onnx"))).SerializeToString(),
                                     providers=["CPUExecutionProvider"]).run(None, feed)[0]
        goldens[name] = manifest["golden"], compare(other, want, manifest["golden"]["atol"], manifest["golden"]["rtol"])
    uncapped, uncapped_cmp = goldens["uncapped"]
    capped, capped_cmp = goldens["capped"]
    assert "tolerance" not in uncapped and uncapped["atol"] == pytest.approx(0.01 * np.abs(want).max(), rel=1e-6)
    assert not uncapped_cmp["passed"]  # the finding: the target's own tolerance fails on the other kernel
    assert capped_cmp["passed"], (capped_cmp, capped)  # the capped artifact's golden check passes on it
    rounding = capped["tolerance"]["float_rounding"]
    assert capped["atol"] == pytest.approx(rounding["atol"]) and rounding["quantizers"] == 5
    assert capped["tolerance"]["target_atol"] == pytest.approx(uncapped["atol"], rel=1e-3)
