"""edgepipe verify: passes on a fresh artifact, catches every kind of tampering."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET

import numpy as np

from edgepipe.cli import main
from edgepipe.core.artifact import load_golden, save_golden


def test_verify_passes_and_writes_junit(artifact, tmp_path, capsys):
    junit = tmp_path / "verify.xml"
    assert main(["verify", str(artifact), "--junit", str(junit)]) == 0
    suite = ET.parse(junit).getroot()
    assert suite.get("failures") == "0" and int(suite.get("tests")) >= 3
    assert "verify: passed" in capsys.readouterr().out


def test_flipped_byte_fails(artifact, tmp_path, capsys):
    model = artifact / "model.onnx"
    data = bytearray(model.read_bytes())
    data[len(data) // 2] ^= 0x01
    model.write_bytes(bytes(data))
    junit = tmp_path / "verify.xml"
    assert main(["verify", str(artifact), "--junit", str(junit)]) == 1
    out = capsys.readouterr().out
    assert "changed: model.onnx" in out and "golden: not run" in out
    assert ET.parse(junit).getroot().get("failures") != "0"


def test_missing_and_extra_files_fail(artifact, capsys):
    (artifact / "golden.npz").unlink()
    (artifact / "notes.txt").write_text("added after the build")
    assert main(["verify", str(artifact)]) == 1
    out = capsys.readouterr().out
    assert "missing: golden.npz" in out and "extra: notes.txt" in out


def test_edited_manifest_fails(artifact, capsys):
    path = artifact / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["accuracy"]["value"] = 1.0
    path.write_text(json.dumps(manifest))
    assert main(["verify", str(artifact)]) == 1
    assert "edited after the build" in capsys.readouterr().out


def test_output_drift_fails_golden(artifact, capsys):
    # Re-sign a golden file whose expected outputs no longer match the model.
    inputs, expected, reference = load_golden(artifact / "golden.npz")
    save_golden(artifact / "golden.npz", inputs, {k: v + 5.0 for k, v in expected.items()}, reference)
    from edgepipe.core.artifact import read_manifest, write_manifest

    manifest = read_manifest(artifact)
    write_manifest(artifact, {k: v for k, v in manifest.items() if k not in ("files", "digest")})
    assert main(["verify", str(artifact)]) == 1
    assert "FAIL golden:logits" in capsys.readouterr().out


def test_verify_bad_input_is_exit_2(tmp_path, capsys):
    assert main(["verify", str(tmp_path / "nope")]) == 2
    assert main(["verify", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(line.startswith("edgepipe: error:") for line in err)


def test_golden_npz_is_byte_reproducible(tmp_path):
    arrays = {"x": np.arange(6, dtype=np.float32).reshape(2, 3)}
    save_golden(tmp_path / "a.npz", arrays, arrays, arrays)
    save_golden(tmp_path / "b.npz", arrays, arrays, arrays)
    assert (tmp_path / "a.npz").read_bytes() == (tmp_path / "b.npz").read_bytes()
