"""edgepipe inspect on a real artifact and on junk."""

from __future__ import annotations

import json

from edgepipe.cli import main


def test_inspect_reports_io_ops_and_params(digits_build, capsys):
    assert main(["inspect", str(digits_build / "cpu" / "model.onnx"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["inputs"][0]["name"] == "image" and info["inputs"][0]["shape"] == ["batch", 1, 8, 8]
    assert info["ops"]["QuantizeLinear"] >= 5 and info["ops"]["Conv"] == 3
    assert info["params"] > 50_000 and info["opsets"]["ai.onnx"] >= 13


def test_inspect_junk_is_exit_2(tmp_path, capsys):
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"\x00\xffnot a model at all" * 10)
    empty = tmp_path / "empty.onnx"
    empty.write_bytes(b"")
    assert main(["inspect", str(junk)]) == 2
    assert main(["inspect", str(empty)]) == 2
    assert main(["inspect", str(tmp_path / "missing.onnx")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and "empty" in err[1] and "not found" in err[2]
