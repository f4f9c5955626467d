"""gpu target: fp16 model + TensorRT-style int8 QDQ model, native calibration cache, verify on both."""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
from onnx import numpy_helper

from edgepipe.cli import main
from edgepipe.core.artifact import load_golden, save_golden
from edgepipe.targets.trtcache import HEADER, encode, read_cache, scale_of, write_cache


def _manifest(folder):
    return json.loads((folder / "manifest.json").read_text())


def test_folder_holds_both_models_each_checked(digits_build):
    folder = digits_build / "gpu"
    manifest = _manifest(folder)
    assert set(manifest["files"]) == {
        "model.onnx", "model.int8.qdq.onnx", "golden.npz", "golden.int8.npz",
        "calibration.cache", "calibration.json", "provider_options.json",
    }
    models = {m["model_file"]: m for m in manifest["models"]}
    assert set(models) == {"model.onnx", "model.int8.qdq.onnx"}
    for entry in models.values():
        acc = entry["accuracy"]
        assert acc["samples"] == 360 and acc["drop"] <= 0.01 and acc["passed"]
        assert entry["runtime"]["providers"]  # what really ran (CPU here; CUDA where present)
    assert models["model.onnx"]["runtime"]["requested_providers"][0] == "CUDAExecutionProvider"
    assert models["model.int8.qdq.onnx"]["runtime"]["requested_providers"][0] == "TensorrtExecutionProvider"
    assert [p["name"] for p in models["model.int8.qdq.onnx"]["passes"]][-1] == "quantize.tensorrt"
    assert "checked_on" in manifest["gpu"] and "stronglyTyped" in manifest["gpu"]["trtexec"]
    int8 = models["model.int8.qdq.onnx"]["gpu"]
    assert "primary" in int8["primary_int8_artifact"] or "TensorRT 10.1+" in int8["primary_int8_artifact"]
    assert "TensorRT <= 10" in int8["calibration_cache"]["for"]


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


def test_calibration_cache_parses_back_to_one_scale_per_quantized_tensor(digits_build):
    folder = digits_build / "gpu"
    assert (folder / "calibration.cache").read_text().splitlines()[0] == HEADER
    scales = read_cache(folder / "calibration.cache")
    model = onnx.load(str(folder / "model.int8.qdq.onnx"))
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    activations = [n for n in model.graph.node if n.op_type == "QuantizeLinear" and n.input[0] not in inits]
    assert activations
    for q in activations:
        # The same calibration run: the cache's scale is the QDQ model's scale (amax / 127).
        assert np.isclose(scales[q.input[0]], float(inits[q.input[1]]), rtol=1e-6), q.input[0]
    info = json.loads((folder / "calibration.json").read_text())
    assert len(info["fp32_model_sha256"]) == 64 and info["calibration_samples"] == 256
    assert info["calibration_method"] == "minmax" and info["edgepipe_version"]
    assert set(info["tensors"]) == set(scales)
    assert sum(t["quantized_in_qdq_model"] for t in info["tensors"].values()) == len({q.input[0] for q in activations})


def test_cache_uses_abs_max_not_signed_max(tmp_path):
    # ORT's write_calibration_table would write max(hi, lo) = 1.2279 here and clip the negative side.
    scales = write_cache(tmp_path / "c.cache", {"neg": [-1.6688, 1.2279], "pos": [0.0, 2.54]})
    assert np.isclose(scales["neg"], 1.6688 / 127) and np.isclose(scales["pos"], 2.54 / 127)
    back = read_cache(tmp_path / "c.cache")
    assert back == {k: np.float32(v).item() for k, v in scales.items()}
    assert encode(1.0) == "3f800000" and scale_of(0.0, 0.0) == 1.0


def test_provider_options_name_both_models(digits_build):
    options = json.loads((digits_build / "gpu" / "provider_options.json").read_text())
    assert options["model.onnx"][0][0] == "CUDAExecutionProvider"
    trt = dict(options["model.int8.qdq.onnx"])["TensorrtExecutionProvider"]
    assert trt["trt_int8_enable"] and "trt_profile_min_shapes" in trt
    legacy = next(v for k, v in options.items() if "calibration.cache" in k)[0][1]
    assert legacy["trt_int8_use_native_calibration_table"] and legacy["trt_int8_calibration_table_name"] == "calibration.cache"


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


def test_gpu_without_calibration_ships_fp16_only(tmp_path):
    from conftest import DIGITS, write_recipe

    text = (DIGITS / "recipe.yaml").read_text().replace("  calibration: data.py:calibration\n", "")
    text = text.replace("targets: [cpu, mobile, gpu]", "targets: [gpu]")
    assert main(["build", str(write_recipe(tmp_path, text)), "-o", str(tmp_path / "out"), "-q"]) == 0
    folder = tmp_path / "out" / "digits-cnn" / "gpu"
    manifest = _manifest(folder)
    assert "models" not in manifest and "calibration data" in manifest["gpu"]["int8"]
    assert set(manifest["files"]) == {"model.onnx", "golden.npz", "provider_options.json"}
    fp16 = manifest["passes"][-1]["stats"]
    assert fp16["finite_check"].startswith("not run") and fp16["float16_weights"] > 0
    assert manifest["accuracy"]["passed"] and main(["verify", str(folder)]) == 0
