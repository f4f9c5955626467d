"""One build path: the same --json schema and failure rule on every executor; exit 3 names a broken pass."""

from __future__ import annotations

import json
from pathlib import Path

import onnx_ir as ir
from conftest import DIGITS, write_onnx_recipe

from edgepipe.cli import main
from edgepipe.passes import PASSES
from edgepipe.passes.base import EdgepipePass, StatsResult

HEAD = (DIGITS / "recipe.yaml").read_text().split("targets:")[0]
# A metric whose first call kills its process with SIGSEGV: a native crash in the mobile target only.
SEGV = """
import os
import signal


def top1(cand, ref, labels):
    os.kill(os.getpid(), signal.SIGSEGV)
"""


def _segv_recipe(folder: Path, digits_onnx: Path) -> Path:
    folder.mkdir()
    (folder / "segv.py").write_text(SEGV)
    targets = "targets:\n  cpu: {passes: [{name: cleanup}]}\n  mobile: {accuracy: {metric: segv.py:top1}}\n"
    return write_onnx_recipe(folder, digits_onnx, HEAD + targets)


def _keys(doc: dict) -> dict:
    return {"top": sorted(doc), "unit": sorted({k for u in doc["units"] for k in u})}


def test_a_native_crash_costs_only_its_target_with_the_same_json_on_every_executor(digits_onnx, tmp_path, capsys):
    recipe = str(_segv_recipe(tmp_path / "r", digits_onnx))
    docs = []
    for extra in ([], ["--jobs", "2"]):
        out = tmp_path / f"out{len(docs)}"
        assert main(["build", recipe, "-o", str(out), "--json", "--retries", "0", *extra]) == 1
        doc = json.loads(capsys.readouterr().out)
        units = {u["target"]: u for u in doc["units"]}
        assert doc["schema_version"] == 1 and doc["passed"] is False
        assert units["cpu"]["status"] == "passed" and main(["verify", units["cpu"]["folder"]]) == 0
        assert units["mobile"]["status"] == "crashed" and "SIGSEGV" in units["mobile"]["error"]
        assert not (out / "digits-cnn" / "mobile").exists()
        capsys.readouterr()
        docs.append(doc)
    assert _keys(docs[0]) == _keys(docs[1])


class Broken(EdgepipePass):
    """A pass with a bug in it."""

    name = "test.broken"

    def call(self, model: ir.Model) -> StatsResult:
        return [][1]


def test_a_bug_in_a_pass_is_exit_3_naming_the_pass_and_those_before(digits_onnx, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(PASSES, Broken.name, Broken)  # in this process: the in-process executor
    text = HEAD + "targets:\n  cpu: {passes: [{name: cleanup}, {name: test.broken}]}\n  gpu: {passes: [{name: cleanup}]}\n"
    recipe = write_onnx_recipe(tmp_path, digits_onnx, text)
    out = tmp_path / "out"
    assert main(["build", str(recipe), "-o", str(out), "--executor", "inprocess", "--json", "-q"]) == 3
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("edgepipe: internal error: ") and "Traceback" not in captured.err
    assert "pass test.broken raised IndexError" in err[0] and "after the following passes: cleanup" in err[0]
    units = {u["target"]: u for u in json.loads(captured.out)["units"]}
    assert units["cpu"]["status"] == "error" and units["gpu"]["status"] == "passed"  # the other target still built
    assert not (out / "digits-cnn" / "cpu").exists() and (out / "digits-cnn" / "gpu" / "manifest.json").is_file()


def test_python_api_builds_and_verifies(digits_onnx, tmp_path):
    import subprocess
    import sys

    import edgepipe

    cheap = subprocess.run([sys.executable, "-c", "import sys, edgepipe; print('torch' in sys.modules, 'onnxruntime' in sys.modules)"],
                           capture_output=True, text=True, check=True)
    assert cheap.stdout.split() == ["False", "False"]  # import edgepipe stays cheap: the API is imported on first use
    recipe = write_onnx_recipe(tmp_path, digits_onnx, HEAD + "targets:\n  cpu: {passes: [{name: cleanup}]}\n  gpu: {}\n")
    result = edgepipe.build(recipe, out=tmp_path / "out", targets=["cpu"])
    assert result.passed and result.exit_code == 0 and [r.target for r in result.targets] == ["cpu"]
    assert result["cpu"].folder == tmp_path / "out" / "digits-cnn" / "cpu"
    assert result["cpu"].manifest["accuracy"]["passed"] and result.reports["digits-cnn"].is_file()
    checked = edgepipe.verify(result["cpu"].folder)
    assert checked.passed and {c.name for c in checked.checks} >= {"files"}
    again = edgepipe.build(recipe, out=tmp_path / "out", targets="cpu", force=True)  # edgepipe.build is still the API
    assert again.passed and again["cpu"].manifest["content_sha256"] == result["cpu"].manifest["content_sha256"]
