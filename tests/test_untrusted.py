"""Nothing from an artifact, recipe or data file is unpickled."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from edgepipe.cli import main
from edgepipe.core.artifact import load_golden, read_manifest, write_manifest
from edgepipe.core.errors import BadInput
from edgepipe.sources.data import eval_batches

ROOT = Path(__file__).resolve().parents[1]
SOURCES = [p for d in ("edgepipe", "passes", "targets", "models") for p in (ROOT / d).rglob("*.py")]


def test_no_unpickling_in_the_code():
    offenders = []
    for path in SOURCES:
        text = path.read_text()
        for pattern in (r"allow_pickle\s*=\s*True", r"\bpickle\.loads?\(", r"\bcloudpickle\.loads?\(", r"weights_only\s*=\s*False"):
            if re.search(pattern, text):
                offenders.append(f"{path.relative_to(ROOT)}: {pattern}")
        for call in re.finditer(r"torch\.load\(([^)]*)\)", text):
            if "weights_only=True" not in call.group(1):
                offenders.append(f"{path.relative_to(ROOT)}: torch.load without weights_only=True")
    assert not offenders, offenders


def test_pickled_npz_is_refused(tmp_path):
    np.savez(tmp_path / "evil.npz", image=np.array([{"a": 1}], dtype=object))
    with pytest.raises(BadInput, match="never loads"):
        eval_batches("evil.npz", tmp_path)


def test_pickled_golden_is_refused(artifact, capsys):
    np.savez(artifact / "golden.npz", **{"input/image": np.array([object()], dtype=object)})
    with pytest.raises(ValueError, match="allow_pickle"):
        load_golden(artifact / "golden.npz")
    # Even re-signed so the hashes match, verify refuses it rather than unpickling.
    manifest = read_manifest(artifact)
    write_manifest(artifact, {k: v for k, v in manifest.items() if k not in ("files", "digest", "content_sha256")})
    assert main(["verify", str(artifact)]) == 1
    assert "unreadable without unpickling" in capsys.readouterr().out
