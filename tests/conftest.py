"""Shared fixtures: the real digits model built once per session."""

from __future__ import annotations

import multiprocessing.util
import os
import shutil
import tempfile
from pathlib import Path

import pytest

from edgepipe.cli import main

ROOT = Path(__file__).resolve().parents[1]
DIGITS = ROOT / "models" / "digits"


# Not ours: torch's compile cache (the exporter), onnxruntime's telemetry session file (its 1DS SDK), Ray's session logs.
THIRD_PARTY_TEMP = {"torchinductor_root", ".ses", "ray"}
# Python's multiprocessing folder (the forkserver's socket) of a build process a test kills with SIGKILL:
# nothing can clean up after SIGKILL; a process that exits removes its own.
THIRD_PARTY_PREFIXES = ("pymp-",)


@pytest.fixture(scope="session", autouse=True)
def system_temp(tmp_path_factory):
    """The system temp folder of this session: fresh, and at the end holding nothing edgepipe made.

    tempfile's default and TMPDIR (spawned workers) point into it; pytest's own tmp_path stays where it
    was. Ray keeps its session files in /tmp/ray (RAY_TMPDIR), not here. The folder is removed at the end.
    """
    tmp_path_factory.getbasetemp()  # before the switch: pytest's folders are not ours to judge
    # multiprocessing's own folder (the forkserver's socket) outside it: removed by multiprocessing at exit,
    # after this fixture has removed the session's folder.
    multiprocessing.util.get_temp_dir()
    root = Path(tempfile.mkdtemp(prefix="ep-systemp-"))
    saved = tempfile.tempdir, os.environ.get("TMPDIR")
    tempfile.tempdir, os.environ["TMPDIR"] = str(root), str(root)
    try:
        yield root
    finally:
        tempfile.tempdir = saved[0]
        if saved[1] is None:
            os.environ.pop("TMPDIR", None)
        else:
            os.environ["TMPDIR"] = saved[1]
        left = sorted(p.name for p in root.iterdir() if p.name not in THIRD_PARTY_TEMP and not p.name.startswith(THIRD_PARTY_PREFIXES))
        shutil.rmtree(root, ignore_errors=True)
        assert not left, f"the tests left {left} in the system temp folder"


# ---------------------------------------------------------------- suite speed (shared fixtures; see docs/testing.md)


@pytest.fixture(scope="session", autouse=True)
def warm_build_children():
    """Build children (the default executor) fork from one server per session: it imports, once, what the tests'
    models import on every build (scikit-learn for the digits data, transformers for the hf models)."""
    from edgepipe.scale import executor

    saved = executor.PRELOAD
    executor.PRELOAD = [*saved, "sklearn.datasets", "sklearn.model_selection", "transformers"]
    yield
    executor.PRELOAD = saved


@pytest.fixture(scope="session")
def digits_build(tmp_path_factory) -> Path:
    """OUT folder of one real `edgepipe build` of the digits recipe (cpu, mobile and gpu targets)."""
    out = tmp_path_factory.mktemp("digits-out")
    assert main(["build", str(DIGITS / "recipe.yaml"), "-o", str(out), "--quiet"]) == 0
    return out / "digits-cnn"


@pytest.fixture
def artifact(digits_build, tmp_path) -> Path:
    """A private copy of the digits cpu artifact, safe to tamper with."""
    dst = tmp_path / "cpu"
    shutil.copytree(digits_build / "cpu", dst)
    return dst


def write_recipe(folder: Path, text: str) -> Path:
    """A recipe file in ``folder`` that can name the digits model's files."""
    for name in ("model.py", "data.py", "weights.pt"):
        target = folder / name
        if not target.exists():
            target.symlink_to(DIGITS / name)
    path = folder / "recipe.yaml"
    path.write_text(text)
    return path


@pytest.fixture(scope="session")
def digits_onnx(tmp_path_factory) -> Path:
    """The digits CNN exported by edgepipe (dynamo, checked) and cleaned: the real model pass tests use."""
    from edgepipe.passes import PASSES
    from edgepipe.passes.base import load, save
    from edgepipe.recipe import load_recipe
    from edgepipe.sources.export import export_torch

    work = tmp_path_factory.mktemp("digits-onnx")
    source = export_torch(load_recipe(DIGITS / "recipe.yaml"), work, None)
    return save(PASSES["cleanup"]()(load(source.onnx_path)).model, work / "digits.onnx")


def ec_keypair(folder: Path, name: str = "key"):
    """A fresh EC P-256 signing key: (private PEM path, public PEM path, key object); never committed."""
    from cryptography.hazmat.primitives import serialization as ser
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1())
    private, public = folder / f"{name}.pem", folder / f"{name}.pub.pem"
    private.write_bytes(key.private_bytes(ser.Encoding.PEM, ser.PrivateFormat.PKCS8, ser.NoEncryption()))
    public.write_bytes(key.public_key().public_bytes(ser.Encoding.PEM, ser.PublicFormat.SubjectPublicKeyInfo))
    return private, public, key
