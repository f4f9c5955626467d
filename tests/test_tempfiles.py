"""Nothing edgepipe makes stays in the system temp folder."""

from __future__ import annotations

import gc
import tempfile

from edgepipe.passes import PASSES
from edgepipe.passes.base import load
from edgepipe.scale.executor import Unit, run_unit


def test_a_pass_without_a_context_removes_its_scratch_folder(digits_onnx, tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    p = PASSES["cleanup"]()
    assert list(tmp_path.iterdir()) == []  # made on first use only: most passes never need one
    used = p.context.scratch("probe")
    assert used.is_dir() and used.parent.parent == tmp_path and used.parent.name.startswith("edgepipe-")
    model = p(load(digits_onnx)).model
    del p
    gc.collect()
    assert list(tmp_path.iterdir()) == []
    assert len(model.graph) > 0  # the model it returned does not live in the removed folder


def test_a_unit_run_leaves_no_scratch_folder(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.delenv("EDGEPIPE_SCRATCH", raising=False)
    result = run_unit(Unit(str(tmp_path / "missing.yaml"), "x", "cpu"))  # what a Ray worker runs
    assert result.status == "error" and "missing.yaml" in result.error
    assert list(tmp_path.iterdir()) == []
