"""The bad-input table (docs/bad_inputs.md): each case is one line on stderr, exit 2, nothing written."""

from __future__ import annotations

import errno
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import DIGITS, write_onnx_recipe, write_recipe
from onnx import TensorProto, helper
from test_cli_errors import CASES as RECIPE_CASES

from edgepipe.cli import main

GOOD = (DIGITS / "recipe.yaml").read_text()
ONNX_RECIPE = "name: bad\nmodel: {onnx: model.onnx}\n"
DATA_PY = "import numpy as np\n"
NO_DATA = GOOD.replace("  calibration: data.py:calibration\n", "").replace("  eval: data.py:evaluation\n", "").replace("data:\n", "")


def _tiny(opset: int = 17, ir_version: int = 8, op: str = "Relu", domain: str = "") -> onnx.ModelProto:
    node = helper.make_node(op, ["x"], ["y"], domain=domain)
    graph = helper.make_graph(
        [node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
    )
    imports = [helper.make_opsetid("", opset)] + ([helper.make_opsetid(domain, 1)] if domain else [])
    return helper.make_model(graph, opset_imports=imports, ir_version=ir_version)


def _onnx_case(content: bytes | onnx.ModelProto):
    def setup(tmp: Path) -> list[str]:
        data = content.SerializeToString() if isinstance(content, onnx.ModelProto) else content
        (tmp / "model.onnx").write_bytes(data)
        return ["build", str(write_recipe(tmp, ONNX_RECIPE))]
    return setup


def _recipe_case(text: str, data_py: str | None = None):
    def setup(tmp: Path) -> list[str]:
        if data_py is not None:
            (tmp / "bad_data.py").write_text(DATA_PY + data_py)
        return ["build", str(write_recipe(tmp, text))]
    return setup


def _eval(fn_body: str):
    return _recipe_case(GOOD.replace("eval: data.py:evaluation", "eval: bad_data.py:evaluation"), fn_body)


def _unwritable_output(tmp: Path) -> list[str]:
    (tmp / "afile").write_text("a file, not a folder")
    return ["build", str(write_recipe(tmp, GOOD)), "-o", str(tmp / "afile" / "out")]


def _npz(tmp: Path) -> list[str]:
    (tmp / "eval.npz").write_bytes(b"PK not really a zip")
    return ["build", str(write_recipe(tmp, GOOD.replace("data.py:evaluation", "eval.npz")))]


def _npz_counts(tmp: Path) -> list[str]:
    np.savez(tmp / "cal.npz", image=np.zeros((4, 1, 8, 8), np.float32), other=np.zeros((3, 2), np.float32))
    return ["build", str(write_recipe(tmp, GOOD.replace("data.py:calibration", "cal.npz")))]


def _verify_plain_folder(tmp: Path) -> list[str]:
    return ["verify", str(tmp)]


def _inspect_text(tmp: Path) -> list[str]:
    (tmp / "notes.onnx").write_text("hello, I am text")
    return ["inspect", str(tmp / "notes.onnx")]


def _dry_run_bad_metric(tmp: Path) -> list[str]:
    return ["build", str(write_recipe(tmp, GOOD.replace("metric: top1", "metric: nope.py:metric"))), "--dry-run"]


TABLE: dict[str, tuple] = {
    "onnx: empty file": (_onnx_case(b""), "is empty (0 bytes)"),
    "onnx: truncated file": (_onnx_case(_tiny().SerializeToString()[:-9]), "not a valid ONNX model"),
    "onnx: not ONNX at all": (_onnx_case(b"\x89PNG\r\n\x1a\n" + b"\x00" * 64), "not a valid ONNX model"),
    "onnx: op the runtime lacks": (_onnx_case(_tiny(op="Frobnicate", domain="com.acme")), "cannot load"),
    "onnx: opset too new": (_onnx_case(_tiny(opset=99)), "opset is newer than this onnxruntime supports"),
    "onnx: IR version too new": (_onnx_case(_tiny(ir_version=99)), "not a valid ONNX model"),
    "onnx: unknown standard op": (_onnx_case(_tiny(op="NotAnOp")), "not a valid ONNX model"),
    "data: wrong dtype": (_eval("def evaluation():\n    yield {'image': np.zeros((2, 1, 8, 8), np.int64)}, None\n"), "is int64 but the model wants float32"),
    "data: wrong rank": (_eval("def evaluation():\n    yield {'image': np.zeros((2, 8, 8), np.float32)}, None\n"), "has shape [2, 8, 8]"),
    "data: wrong fixed dim": (_eval("def evaluation():\n    yield {'image': np.zeros((2, 1, 8, 7), np.float32)}, None\n"), "axis 3 must be 8"),
    "data: wrong input name": (_eval("def evaluation():\n    yield {'pixels': np.zeros((2, 1, 8, 8), np.float32)}, None\n"), "make the names match"),
    "data: empty eval set": (_eval("def evaluation():\n    return iter(())\n"), "yielded no batches"),
    "data: loader raises": (_eval("def evaluation():\n    raise FileNotFoundError('images.bin')\n"), "failed: FileNotFoundError"),
    "data: loader yields junk": (_eval("def evaluation():\n    yield [1, 2, 3]\n"), "must yield"),
    "data: empty calibration set": (_recipe_case(GOOD.replace("data.py:calibration", "bad_data.py:calibration"), "def calibration():\n    return []\n"), "yielded no batches"),
    "data: broken .npz": (_npz, "not a readable .npz"),
    "data: .npz arrays of different lengths": (_npz_counts, "differ in sample count"),
    "model: factory raises": (_recipe_case(GOOD.replace("model.py:build", "bad_data.py:build"), "def build():\n    raise RuntimeError('no weights')\n"), "factory 'bad_data.py:build' failed"),
    "model: factory returns no module": (_recipe_case(GOOD.replace("model.py:build", "bad_data.py:build"), "def build():\n    return 42\n"), "not a torch.nn.Module"),
    "model: factory missing": (_recipe_case(GOOD.replace("model.py:build", "model.py:builder")), "has no function 'builder'"),
    "model: declared shape the model can't run": (_recipe_case(NO_DATA.replace("[batch, 1, 8, 8]", "[batch, 3, 8, 8]")), "the model fails on inputs shaped like"),
    "output: folder is a file": (_unwritable_output, "not writable"),
    "verify: not an artifact": (_verify_plain_folder, "not an edgepipe artifact"),
    "inspect: text file": (_inspect_text, "not an ONNX model"),
    "dry-run: missing metric file": (_dry_run_bad_metric, "nope.py"),
}


@pytest.mark.parametrize("case", sorted(TABLE))
def test_bad_input(case, tmp_path, capsys):
    setup, expected = TABLE[case]
    (tmp_path / "case").mkdir()
    argv = setup(tmp_path / "case")
    if argv[0] == "build" and "-o" not in argv:
        argv += ["-o", str(tmp_path / "out")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("edgepipe: error: "), err
    assert expected in lines[0], lines[0]
    assert "Traceback" not in err
    assert not list((tmp_path / "out").rglob("manifest.json")) if (tmp_path / "out").exists() else True


def test_full_disk_keeps_the_old_artifact(digits_build, digits_onnx, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    shutil.copytree(digits_build, out / "digits-cnn")
    before = (out / "digits-cnn" / "cpu" / "model.onnx").read_bytes()

    def no_space(*_a, **_k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("edgepipe.pipeline.build.save_golden", no_space)  # in this process: the in-process executor
    assert main(["build", str(write_onnx_recipe(tmp_path, digits_onnx)), "-o", str(out), "--force", "--executor", "inprocess"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "disk is full" in err[0]
    assert (out / "digits-cnn" / "cpu" / "model.onnx").read_bytes() == before
    assert not [p for p in (out / "digits-cnn").iterdir() if p.name.startswith(".")]


def test_table_is_documented():
    doc = (Path(__file__).resolve().parents[1] / "docs" / "bad_inputs.md").read_text()
    cases = [*TABLE, *(f"recipe: {c}" for c in RECIPE_CASES)]
    assert len(cases) >= 30
    missing = [c for c in cases if f"| {c} |" not in doc]
    assert not missing, f"docs/bad_inputs.md lacks rows for {missing}"
