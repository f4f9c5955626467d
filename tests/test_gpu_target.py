"""gpu target: fp16 model + TensorRT-style int8 QDQ model, native calibration cache, verify on both."""

from __future__ import annotations

import json
import shlex
import shutil
import struct
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper

from edgepipe.cli import main
from edgepipe.core.artifact import load_golden, save_golden
from edgepipe.targets.trtcache import write_cache


def _manifest(folder):
    return json.loads((folder / "manifest.json").read_text())


def read_trt_cache(path: Path) -> dict[str, float]:
    """A native TensorRT calibration cache read the way ORT's TensorRT provider reads it (ReadDynamicRange):
    a first line holding ``TRT-``, then ``name:hex`` lines, the name up to the first ':', the value the
    big-endian IEEE-754 bits of the float32 scale in hex (strtoul base 16). Written from the format, not
    from edgepipe's own reader."""
    lines = path.read_bytes().split(b"\n")
    assert b"TRT-" in lines[0].split(b":")[0], lines[0]
    scales = {}
    for line in lines[1:]:
        if not line:
            continue
        name, _, rest = line.partition(b":")
        bits = int(rest.split(b":")[0].strip(), 16)
        scales[name.decode()] = struct.unpack(">f", struct.pack(">I", bits))[0]
    return scales


def _tensor_names(model: onnx.ModelProto) -> set[str]:
    graph = model.graph
    return {n for node in graph.node for n in (*node.input, *node.output)} | {i.name for i in graph.input}


def test_folder_holds_both_models_each_checked(digits_build):
    folder = digits_build / "gpu"
    manifest = _manifest(folder)
    assert set(manifest["files"]) == {
        "model.onnx", "model.int8.qdq.onnx", "model.fp32.onnx", "golden.npz", "golden.int8.npz",
        "trt_cache/calibration.cache", "calibration.json", "provider_options.json",
    }
    models = {m["model_file"]: m for m in manifest["models"]}
    assert set(models) == {"model.onnx", "model.int8.qdq.onnx"}
    for entry in models.values():
        acc = entry["accuracy"]
        assert acc["samples"] == 360 and acc["drop"] <= 0.01 and acc["passed"]
        assert set(entry["runtime"]["providers"]) <= set(ort.get_available_providers())  # what really ran
        # the trtexec line builds from a file that ships, with the shapes the model takes
        args = shlex.split(entry["gpu"]["trtexec"])
        onnx_file = next(a.split("=", 1)[1] for a in args if a.startswith("--onnx="))
        assert onnx_file == entry["model_file"] and (folder / onnx_file).is_file()
    assert models["model.onnx"]["runtime"]["requested_providers"][0] == "CUDAExecutionProvider"
    assert models["model.int8.qdq.onnx"]["runtime"]["requested_providers"][0] == "TensorrtExecutionProvider"
    assert [p["name"] for p in models["model.int8.qdq.onnx"]["passes"]][-1] == "quantize.tensorrt"


def test_int8_model_is_tensorrt_explicit_quantization(digits_build):
    model = onnx.load(str(digits_build / "gpu" / "model.int8.qdq.onnx"))
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    nodes = model.graph.node
    qs = [n for n in nodes if n.op_type == "QuantizeLinear"]
    dqs = [n for n in nodes if n.op_type == "DequantizeLinear"]
    assert qs and dqs
    for n in qs + dqs:  # symmetric: every zero point is int8 0
        zp = inits[n.input[2]]
        assert zp.dtype == np.int8 and not zp.any()
    conv_w = [n for n in dqs if n.input[0] in inits and inits[n.input[0]].ndim == 4]
    assert conv_w and all(inits[n.input[1]].size > 1 for n in conv_w)  # per-channel weight scales
    # Inputs of weighted ops are quantized, their outputs are not (TensorRT's placement rule).
    weighted = [n for n in nodes if n.op_type in ("Conv", "Gemm")]
    q_inputs = {n.input[0] for n in qs}
    assert not any(o in q_inputs for n in weighted for o in n.output)
    assert [i.type.tensor_type.elem_type for i in model.graph.input] == [onnx.TensorProto.FLOAT]


def _legacy_entry(folder: Path) -> tuple[str, dict]:
    """(model file, TensorRT options) of the provider-options entry that uses a calibration table."""
    options = json.loads((folder / "provider_options.json").read_text())
    [(model_file, trt)] = [(k, dict(v)["TensorrtExecutionProvider"]) for k, v in options.items()
                           if "trt_int8_calibration_table_name" in dict(v).get("TensorrtExecutionProvider", {})]
    return model_file, trt


def test_calibration_cache_is_where_the_provider_reads_it_and_names_a_shipped_models_tensors(digits_build):
    folder = digits_build / "gpu"
    model_file, trt = _legacy_entry(folder)
    assert trt["trt_int8_enable"] and trt["trt_int8_use_native_calibration_table"]
    # ORT's TensorRT provider: GetCachePath(trt_engine_cache_path, trt_int8_calibration_table_name)
    root = trt.get("trt_engine_cache_path", "")
    table = folder / root / trt["trt_int8_calibration_table_name"] if root else folder / trt["trt_int8_calibration_table_name"]
    assert table.is_file()
    scales = read_trt_cache(table)
    model = onnx.load(str(folder / model_file))
    assert scales and set(scales) <= _tensor_names(model)  # every range names a tensor of the model it is for
    assert not any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in model.graph.node)  # implicit INT8: float
    # the float model is the one calibrated: its outputs are the reference outputs
    inputs, _, reference = load_golden(folder / "golden.npz")
    got = ort.InferenceSession(str(folder / model_file), providers=["CPUExecutionProvider"]).run(None, inputs)
    np.testing.assert_allclose(got[0], reference["logits"], rtol=1e-4, atol=1e-4)
    # the same calibration run as the QDQ model: the cache's scale is its scale (amax / 127) per activation
    qdq = onnx.load(str(folder / "model.int8.qdq.onnx"))
    inits = {i.name: numpy_helper.to_array(i) for i in qdq.graph.initializer}
    activations = [n for n in qdq.graph.node if n.op_type == "QuantizeLinear" and n.input[0] not in inits]
    assert activations
    for q in activations:
        assert np.isclose(scales[q.input[0]], float(inits[q.input[1]]), rtol=1e-6), q.input[0]


def test_cache_uses_abs_max_not_signed_max(tmp_path):
    # ORT's write_calibration_table would write max(hi, lo) = 1.2279 here and clip the negative side.
    write_cache(tmp_path / "c.cache", {"neg": [-1.6688, 1.2279], "pos": [0.0, 2.54], "zero": [0.0, 0.0]})
    back = read_trt_cache(tmp_path / "c.cache")
    assert np.isclose(back["neg"], 1.6688 / 127) and np.isclose(back["pos"], 2.54 / 127)
    assert back["zero"] == 1.0  # an all-zero tensor gets scale 1, as ORT's quantizer gives it


def test_provider_options_name_shipped_models(digits_build):
    folder = digits_build / "gpu"
    options = json.loads((folder / "provider_options.json").read_text())
    for key, providers in options.items():
        assert (folder / key.split(" ")[0]).is_file(), key  # every entry is for a model in the folder
        assert providers[-1][0] == "CPUExecutionProvider"
    trt = dict(options["model.int8.qdq.onnx"])["TensorrtExecutionProvider"]
    assert trt["trt_int8_enable"] and "trt_profile_min_shapes" in trt
    assert "trt_int8_calibration_table_name" not in trt  # explicit quantization: no table


def test_verify_checks_every_model(digits_build, tmp_path, capsys):
    folder = tmp_path / "gpu"
    shutil.copytree(digits_build / "gpu", folder)
    assert main(["verify", str(folder)]) == 0
    out = capsys.readouterr().out
    assert "golden:model.onnx:logits" in out and "golden:model.int8.qdq.onnx:logits" in out
    # Tamper with the int8 model's golden outputs and re-seal the hashes: verify must catch it there.
    inputs, expected, reference = load_golden(folder / "golden.int8.npz")
    save_golden(folder / "golden.int8.npz", inputs, {k: v + 5.0 for k, v in expected.items()}, reference)
    from edgepipe.core.artifact import hash_tree, write_manifest

    manifest = _manifest(folder)
    manifest["files"] = hash_tree(folder)
    del manifest["digest"]
    write_manifest(folder, manifest)
    assert main(["verify", str(folder)]) == 1
    out = capsys.readouterr().out
    assert "FAIL" in out.upper() and "model.int8.qdq.onnx:logits" in out


def test_report_lists_both_gpu_models(digits_build):
    page = (digits_build / "report.html").read_text()
    # One summary row per model, each with its own accuracy, and a dot per model in the size/latency plot.
    assert "<td>model.int8.qdq.onnx</td>" in page and "<td>model.onnx</td>" in page
    assert "gpu int8.qdq (top1 0.986)" in page and "gpu (top1 0.986)" in page


def test_gpu_without_calibration_ships_fp16_only(digits_onnx, tmp_path):
    from conftest import DIGITS, write_onnx_recipe

    text = (DIGITS / "recipe.yaml").read_text().replace("  calibration: data.py:calibration\n", "")
    text = text.replace("targets: [cpu, mobile, gpu]", "targets: [gpu]")
    assert main(["build", str(write_onnx_recipe(tmp_path, digits_onnx, text)), "-o", str(tmp_path / "out"), "-q"]) == 0
    folder = tmp_path / "out" / "digits-cnn" / "gpu"
    manifest = _manifest(folder)
    assert "models" not in manifest and "calibration data" in manifest["gpu"]["int8"]
    assert set(manifest["files"]) == {"model.onnx", "golden.npz", "provider_options.json"}
    fp16 = manifest["passes"][-1]["stats"]
    assert fp16["finite_check"].startswith("not run") and fp16["float16_weights"] > 0
    assert manifest["accuracy"]["passed"] and main(["verify", str(folder)]) == 0


def test_cache_leaves_out_names_its_readers_would_cut(tmp_path):
    scales = write_cache(tmp_path / "c.cache", {"ok": [0.0, 1.0], "scope:tensor": [0.0, 2.0]})
    assert set(scales) == {"ok"} and set(read_trt_cache(tmp_path / "c.cache")) == {"ok"}
