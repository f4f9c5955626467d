"""Shared fixtures: the real digits model built once per session."""

from __future__ import annotations

import contextlib
import fcntl
import multiprocessing.util
import os
import shutil
import signal
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


# ---------------------------------------------------------------- parallel runs (`make test`: pytest-xdist, 2 workers)

# Test files that must not run at the same time as each other: each starts its own local Ray (/tmp/ray, 2 CPUs).
SAME_WORKER = {"tests/test_executor.py": "ray", "tests/test_sensitivity_fanout.py": "ray"}
# The longest work units (benchmarks/RESULTS.md, "Test-suite wall time"), handed out first so that the many short
# files fill the end of the run on both workers. Only an order: a file missing here still runs, later.
LONGEST_FIRST = ["ray", "tests/test_hf_minilm.py", "tests/test_reliability.py", "tests/test_text_targets.py",
                 "tests/test_budget_checks.py", "tests/test_mobile_target.py", "tests/test_text_chain.py"]


def pytest_configure(config):
    # Started by a non-interactive shell's `cmd &`, this process ignores SIGINT, and so would every `python -m
    # edgepipe` a test starts (an ignored signal stays ignored across exec): the tests that interrupt a build need
    # it delivered. A handler (not an ignore) is reset to the default in the child, where Python installs its own.
    if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """One work unit per file (its module fixtures are set up once), the SAME_WORKER files in one unit, the
    LONGEST_FIRST units first. pytest-xdist calls this in the controller, and only with -n; it applies to
    `--dist loadscope` and to `load` (what a bare `-n 2` means: one test per unit would set a file's module
    fixtures up on both workers and could start two Rays at once)."""
    if config.getvalue("dist") not in ("load", "loadscope"):
        return None
    from xdist.scheduler import LoadScopeScheduling

    class ByFile(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            path = nodeid.split("::", 1)[0]
            return SAME_WORKER.get(path, path)

        def _assign_work_unit(self, node) -> None:
            if not getattr(self, "ordered", False):  # the first call: the queue is complete
                rank = {scope: i for i, scope in enumerate(LONGEST_FIRST)}
                units = sorted(self.workqueue.items(), key=lambda item: rank.get(item[0], len(rank)))
                self.workqueue.clear()
                self.workqueue.update(units)
                self.ordered = True
            super()._assign_work_unit(node)

    return ByFile(config, log)


# ---------------------------------------------------------------- suite speed (shared fixtures; see docs/testing.md)


@pytest.fixture(scope="session", autouse=True)
def warm_build_children():
    """Build children (the default executor) fork from one server per session: it imports, once, what the tests'
    models import on every build (torch's exporter, even when the session's first build has an ONNX source;
    scikit-learn for the digits data, transformers for the hf models)."""
    from edgepipe.scale import executor

    saved = executor.PRELOAD
    executor.PRELOAD = [*saved, *executor.EXPORTER, "sklearn.datasets", "sklearn.model_selection", "transformers"]
    yield
    executor.PRELOAD = saved


@contextlib.contextmanager
def once_per_run(tmp_path_factory, name: str):
    """Yields the path of a shared file ``name`` for this run, holding a lock on it.

    Under pytest-xdist (`make test`), every worker is its own session: a session fixture would be built once per
    worker. The first worker to get here builds and writes the path; the others wait for the lock and read it.
    Without xdist the folder is this session's own.
    """
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # shared by the run's workers (each has its own basetemp below it)
    with open(root / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield root / name
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


@pytest.fixture(scope="session")
def digits_build(tmp_path_factory) -> Path:
    """OUT folder of one real `edgepipe build` of the digits recipe (cpu, mobile and gpu targets): read-only.

    Built once per run, shared by the xdist workers."""
    with once_per_run(tmp_path_factory, "digits-build.path") as done:
        if done.exists():
            return Path(done.read_text())
        out = Path(tempfile.mkdtemp(prefix="digits-out-", dir=done.parent))
        assert main(["build", str(DIGITS / "recipe.yaml"), "-o", str(out), "--quiet"]) == 0
        done.write_text(str(out / "digits-cnn"))
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


def write_onnx_recipe(folder: Path, digits_onnx: Path, text: str | None = None) -> Path:
    """``write_recipe`` of the digits recipe (or ``text``, a variant of it) whose model is the already exported
    ``digits_onnx`` file instead of the torch factory: for tests about what happens around a build (publishing,
    crashes, interrupts, budgets, pass chains), not about the export. Its builds import no torch (~2.4 CPU-s less
    a build, more in a cold `python -m edgepipe`)."""
    text = text if text is not None else (DIGITS / "recipe.yaml").read_text()
    assert "torch: model.py:build" in text, "not a variant of the digits recipe"
    target = folder / "digits.onnx"
    if not target.exists():
        target.symlink_to(digits_onnx)
    return write_recipe(folder, text.replace("torch: model.py:build", "onnx: digits.onnx"))


@pytest.fixture(scope="session")
def digits_onnx(tmp_path_factory) -> Path:
    """The digits CNN exported by edgepipe (dynamo, checked) and cleaned: the real model pass tests use; read-only.

    Exported once per run, shared by the xdist workers."""
    from edgepipe.passes import PASSES
    from edgepipe.passes.base import load, save
    from edgepipe.recipe import load_recipe
    from edgepipe.sources.export import export_torch

    with once_per_run(tmp_path_factory, "digits-onnx.path") as done:
        if done.exists():
            return Path(done.read_text())
        work = Path(tempfile.mkdtemp(prefix="digits-onnx-", dir=done.parent))
        source = export_torch(load_recipe(DIGITS / "recipe.yaml"), work, None)
        path = save(PASSES["cleanup"]()(load(source.onnx_path)).model, work / "digits.onnx")
        done.write_text(str(path))
        return path


def ec_keypair(folder: Path, name: str = "key"):
    """A fresh EC P-256 signing key: (private PEM path, public PEM path, key object); never committed."""
    from cryptography.hazmat.primitives import serialization as ser
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1())
    private, public = folder / f"{name}.pem", folder / f"{name}.pub.pem"
    private.write_bytes(key.private_bytes(ser.Encoding.PEM, ser.PrivateFormat.PKCS8, ser.NoEncryption()))
    public.write_bytes(key.public_key().public_bytes(ser.Encoding.PEM, ser.PublicFormat.SubjectPublicKeyInfo))
    return private, public, key
