"""The typed manifest: every manifest edgepipe writes goes through the types and back unchanged."""

from __future__ import annotations

import json

from edgepipe.core.artifact import canonical
from edgepipe.core.manifest import Manifest


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
