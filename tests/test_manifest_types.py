"""The typed manifest: every manifest edgepipe writes goes through the types and back unchanged."""

from __future__ import annotations

import json
import shutil

import pytest

from edgepipe.core.artifact import canonical
from edgepipe.core.errors import BadInput
from edgepipe.core.manifest import SCHEMA_VERSION, Manifest


def test_every_digits_manifest_round_trips_byte_for_byte(digits_build):
    for target in ("cpu", "mobile", "gpu"):
        raw = (digits_build / target / "manifest.json").read_bytes()
        typed = Manifest.from_json(json.loads(raw))
        assert canonical(typed.to_json()) == raw, target
        assert typed.target == target and typed.primary.accuracy.passed and typed.primary.golden.samples == 8
        assert typed.primary.runtime.providers and typed.primary.size.model_bytes > 0
    gpu = Manifest.from_json(json.loads((digits_build / "gpu" / "manifest.json").read_text()))
    assert [m.model_file for m in gpu.entries] == ["model.onnx", "model.int8.qdq.onnx"]  # the fp16 model and the int8 one
    assert gpu.entries[1].variant != "main" and gpu.entries[1].accuracy.metric == "top1"


def test_keys_the_types_do_not_name_are_kept():
    data = {"name": "n", "target": "cpu", "model_file": "model.onnx", "mobile": {"x": 1},
            "runtime": {"name": "onnxruntime", "requested": {"onnxruntime": "1.17"}}, "golden": {"file": "g.npz", "threads": 2}}
    typed = Manifest.from_json(data)
    assert typed.to_json() == data
    assert typed.get("mobile") == {"x": 1} and typed.primary.runtime.get("requested") == {"onnxruntime": "1.17"}
    assert typed.primary.golden.file == "g.npz" and typed.primary.golden.atol == 1e-4  # absent: verify's default
    assert "accuracy" not in typed.to_json()  # an absent part stays absent


def test_the_writer_seals_a_typed_manifest_to_the_same_bytes(digits_build, tmp_path):
    """write_manifest takes the typed manifest a build makes: sealing a read manifest again writes the file it came from."""
    from edgepipe.core.artifact import MANIFEST, write_manifest

    for target in ("cpu", "mobile", "gpu"):
        folder = tmp_path / target
        shutil.copytree(digits_build / target, folder)
        raw = (folder / MANIFEST).read_bytes()
        typed = Manifest.from_json(json.loads(raw))
        (folder / MANIFEST).unlink()
        written = write_manifest(folder, typed)
        assert (folder / MANIFEST).read_bytes() == raw == canonical(written), target


def test_a_build_writes_every_field_of_the_contract(digits_build):
    """shared/DESIGN.md's artifact fields, at the top and in each model of a folder that ships several."""
    model_fields = {"model_file", "runtime", "inputs", "outputs", "opset", "ir_version", "size", "passes", "accuracy",
                    "golden", "latency"}
    for target in ("cpu", "mobile", "gpu"):
        data = json.loads((digits_build / target / "manifest.json").read_text())
        assert model_fields | {"schema_version", "name", "target", "description", "status", "source", "versions",
                               "warnings", "files", "content_sha256", "digest"} <= data.keys(), target
        assert data["schema_version"] == SCHEMA_VERSION and data["files"] and data["status"] == "passed"
        assert {"providers", "requested_providers", "session_config", "version"} <= data["runtime"].keys()
        assert {"file", "samples", "atol", "rtol"} <= data["golden"].keys()
    gpu = json.loads((digits_build / "gpu" / "manifest.json").read_text())
    for entry in gpu["models"]:
        assert model_fields | {"variant", "warnings", "gpu"} <= entry.keys(), entry["model_file"]
    # the speed check's float timing, on every int8 model (not on the fp16 one)
    assert "float_p50_ms" in gpu["models"][1]["latency"] and "float_p50_ms" not in gpu["models"][0]["latency"]
    assert "float_p50_ms" in json.loads((digits_build / "cpu" / "manifest.json").read_text())["latency"]


def test_an_unknown_major_schema_version_is_refused_with_one_line(artifact, capsys):
    from edgepipe.cli import main

    path = artifact / "manifest.json"
    data = json.loads(path.read_text())
    for version in (SCHEMA_VERSION + 98, 0, "1"):
        path.write_text(json.dumps({**data, "schema_version": version}))
        for command in (["verify", str(artifact)], ["bench", str(artifact), "--runs", "1"]):
            assert main(command) == 2, (version, command)
            captured = capsys.readouterr()
            err = captured.err.strip().splitlines()
            assert len(err) == 1 and err[0].startswith("edgepipe: error:") and "Traceback" not in captured.err + captured.out
        with pytest.raises(BadInput):
            Manifest.from_json({**data, "schema_version": version})
    path.write_text(json.dumps(data))  # the version this edgepipe writes: verifies
    assert main(["verify", str(artifact)]) == 0
