"""Builds CI can trust: reproducible, atomic under kills and concurrency, large-model path."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import DIGITS, write_onnx_recipe

from edgepipe.cli import main

RECIPE = str(DIGITS / "recipe.yaml")


def _manifest(folder: Path) -> dict:
    return json.loads((folder / "manifest.json").read_text())


@pytest.fixture
def onnx_recipe(digits_onnx, tmp_path) -> str:
    """The tests about publishing, killing and interrupting a build take the exported model: no torch in their
    cold `python -m edgepipe` processes. The export is covered by the rebuild and large-model tests."""
    return str(write_onnx_recipe(tmp_path, digits_onnx))


def _spawn(recipe: str, out: Path, *extra: str, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "edgepipe", "build", recipe, "-o", str(out), "--force", "--target", "cpu", *extra],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, **(env or {})},
    )


def _wait_until_held(out: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    """Until HOLDING_METRIC says the build is inside its staging step (where it then sleeps)."""
    deadline = time.time() + timeout
    while not (out / "holding").exists():
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.02)


def test_rebuild_is_byte_identical(digits_build, tmp_path):
    # Every target: the cpu model, the mobile .ort (converted with ASLR off), the gpu fp16 + int8 models.
    assert main(["build", RECIPE, "-o", str(tmp_path), "-q"]) == 0
    for target in ("cpu", "mobile", "gpu"):
        first, second = _manifest(digits_build / target), _manifest(tmp_path / "digits-cnn" / target)
        assert first["files"] == second["files"], target
        assert first["content_sha256"] == second["content_sha256"], target
        for name in first["files"]:
            assert (digits_build / target / name).read_bytes() == (tmp_path / "digits-cnn" / target / name).read_bytes()


def test_killed_build_leaves_existing_artifact_whole(digits_build, digits_onnx, onnx_recipe, tmp_path):
    import shutil

    out = tmp_path / "out"
    shutil.copytree(digits_build, out / "digits-cnn")
    before = (out / "digits-cnn" / "cpu" / "manifest.json").read_bytes()
    # The build is held inside its staging step by its metric, so the kill lands there however fast the build is
    # (polling for the short-lived staging folder raced a fast build to its end).
    held = tmp_path / "held"
    held.mkdir()
    (held / "hold.py").write_text(HOLDING_METRIC)
    text = (DIGITS / "recipe.yaml").read_text().replace("metric: top1", "metric: hold.py:top1_then_hold")
    proc = _spawn(str(write_onnx_recipe(held, digits_onnx, text)), out, env={"EDGEPIPE_TEST_OUT": str(out)})
    _wait_until_held(out, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    cpu = out / "digits-cnn" / "cpu"
    assert (cpu / "manifest.json").read_bytes() == before
    assert main(["verify", str(cpu)]) == 0
    # The next build sweeps what the killed one left behind.
    assert main(["build", onnx_recipe, "-o", str(out), "--force", "-q", "--target", "cpu"]) == 0
    assert not [p for p in (out / "digits-cnn").iterdir() if p.name.startswith(".")]


HOLDING_METRIC = """
import os, pathlib, time
import numpy as np

def top1_then_hold(cand, ref, labels):
    # Inside the staging step (a .cpu.tmp- folder exists, in OUT or in the child's scratch folder under it):
    # say so, then hold the build until it is interrupted.
    root = pathlib.Path(os.environ["EDGEPIPE_TEST_OUT"]) / "digits-cnn"
    if root.is_dir() and any(root.rglob(".cpu.tmp-*")):
        (root.parent / "holding").write_text("staging")
        time.sleep(300)
    return float(np.mean(cand.argmax(1) == labels))
"""


def test_interrupted_build_cleans_up_and_exits_130(digits_onnx, tmp_path):
    out = tmp_path / "out"
    (tmp_path / "hold.py").write_text(HOLDING_METRIC)
    text = (DIGITS / "recipe.yaml").read_text().replace("metric: top1", "metric: hold.py:top1_then_hold")
    recipe = write_onnx_recipe(tmp_path, digits_onnx, text)
    proc = subprocess.Popen(
        [sys.executable, "-m", "edgepipe", "build", str(recipe), "-o", str(out), "--target", "cpu"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "EDGEPIPE_TEST_OUT": str(out)},
    )
    _wait_until_held(out, proc)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "interrupted" in err and "Traceback" not in err
    assert not (out / "digits-cnn" / "cpu").exists()  # nothing published
    assert not [p for p in (out / "digits-cnn").iterdir() if p.name.startswith(".")]  # staging removed


def test_concurrent_builds_into_one_folder(onnx_recipe, tmp_path):
    out = tmp_path / "out"
    # One driver with its build child (the default executor), one building in-process: both publish paths race.
    procs = [_spawn(onnx_recipe, out), _spawn(onnx_recipe, out, "--executor", "inprocess")]
    logs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], logs
    assert main(["verify", str(out / "digits-cnn" / "cpu")]) == 0
    assert not [p for p in (out / "digits-cnn").iterdir() if p.name.startswith(".")]
    # Not a terminal: plain lines, no progress-bar escape codes in a CI log.
    assert all("\x1b[" not in stdout for stdout, _ in logs)
    assert "top1 0.9861 → 0.9861" in logs[0][0]


def test_large_model_path_uses_external_data(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGEPIPE_EXTERNAL_DATA_THRESHOLD", "1000")
    assert main(["build", RECIPE, "-o", str(tmp_path), "-q", "--target", "cpu"]) == 0
    cpu = tmp_path / "digits-cnn" / "cpu"
    assert set(_manifest(cpu)["files"]) == {"model.onnx", "model.onnx.data", "golden.npz"}
    assert (cpu / "model.onnx.data").stat().st_size > (cpu / "model.onnx").stat().st_size
    assert _manifest(cpu)["accuracy"]["passed"]
    assert main(["verify", str(cpu)]) == 0
    (cpu / "model.onnx.data").write_bytes(b"\0" * 16)
    assert main(["verify", str(cpu)]) == 1


def test_kill_between_publish_renames_is_recovered(artifact):
    # publish() moved the old artifact aside, then died before moving the new one in.
    from edgepipe.core.artifact import remove_stale

    root = artifact.parent
    aside = root / ".cpu.old-999999999"
    artifact.rename(aside)
    (root / ".cpu.tmp-999999999-abc").mkdir()
    assert sorted(remove_stale(root)) == [".cpu.old-999999999 (restored)", ".cpu.tmp-999999999-abc"]
    assert main(["verify", str(artifact)]) == 0


def test_the_folder_of_a_process_that_exited_but_was_not_reaped_is_stale(tmp_path):
    # A Ray worker that died is a zombie until the raylet reaps it; the driver sweeps the scratch right away.
    from edgepipe.core.artifact import remove_stale

    proc = subprocess.Popen([sys.executable, "-c", "pass"])  # not waited for: a zombie once it exits
    try:
        stat = Path(f"/proc/{proc.pid}/stat")
        deadline = time.time() + 60
        while stat.read_text().rsplit(")", 1)[-1].split()[0] != "Z":
            assert time.time() < deadline
            time.sleep(0.02)
        live = tmp_path / f".work-{os.getpid()}-live"
        dead = tmp_path / f".work-{proc.pid}-dead"
        live.mkdir()
        dead.mkdir()
        assert remove_stale(tmp_path) == [dead.name] and live.is_dir()
    finally:
        proc.wait()
