"""The artifact folder: manifest with hashes, golden I/O, atomic publication, verify."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
import tempfile
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from edgepipe.errors import BadInput

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
GOLDEN = "golden.npz"
_EPOCH = (1980, 1, 1, 0, 0, 0)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def hash_tree(folder: Path) -> dict[str, str]:
    """sha256 of every file under ``folder`` except the manifest, keyed by posix path."""
    return {
        p.relative_to(folder).as_posix(): sha256_file(p)
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.relative_to(folder).as_posix() != MANIFEST
    }


def canonical(data: Any) -> bytes:
    return json.dumps(data, sort_keys=True, indent=2, ensure_ascii=False).encode() + b"\n"


def manifest_digest(manifest: dict[str, Any]) -> str:
    """sha256 of the manifest without its own ``digest`` field (catches edits)."""
    return hashlib.sha256(canonical({k: v for k, v in manifest.items() if k != "digest"})).hexdigest()


def write_manifest(folder: Path, manifest: dict[str, Any]) -> dict[str, Any]:
    manifest = {**manifest, "schema_version": SCHEMA_VERSION, "files": hash_tree(folder)}
    manifest["digest"] = manifest_digest(manifest)
    (folder / MANIFEST).write_bytes(canonical(manifest))
    return manifest


def read_manifest(folder: Path) -> dict[str, Any]:
    path = folder / MANIFEST
    if not path.is_file():
        raise BadInput(f"{folder} is not an edgepipe artifact (no {MANIFEST}); pass an OUT/<name>/<target> folder")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadInput(f"{path}: not valid JSON ({exc}); the manifest is damaged, rebuild the artifact") from None
    if not isinstance(data, dict) or not isinstance(data.get("files"), dict):
        raise BadInput(f"{path}: not an edgepipe manifest (no files table); rebuild the artifact")
    if data.get("schema_version") != SCHEMA_VERSION:
        raise BadInput(f"{path}: manifest schema {data.get('schema_version')!r}, this edgepipe reads {SCHEMA_VERSION}")
    return data


def save_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """np.savez without timestamps: the same arrays give the same bytes."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name in sorted(arrays):
            buf = io.BytesIO()
            np.save(buf, np.ascontiguousarray(arrays[name]), allow_pickle=False)
            info = zipfile.ZipInfo(name + ".npy", date_time=_EPOCH)
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            zf.writestr(info, buf.getvalue())


def load_golden(path: Path) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], dict[str, np.ndarray]]:
    """(inputs, expected artifact outputs, reference outputs) from golden.npz."""
    with np.load(path, allow_pickle=False) as npz:
        groups: dict[str, dict[str, np.ndarray]] = {"input": {}, "expected": {}, "reference": {}}
        for key in npz.files:
            group, _, name = key.partition("/")
            if group in groups:
                groups[group][name] = npz[key]
    return groups["input"], groups["expected"], groups["reference"]


def save_golden(path: Path, inputs: dict, expected: dict, reference: dict) -> None:
    arrays = {f"input/{k}": v for k, v in inputs.items()}
    arrays |= {f"expected/{k}": v for k, v in expected.items()}
    arrays |= {f"reference/{k}": v for k, v in reference.items()}
    save_npz(path, arrays)


@contextlib.contextmanager
def staging(final: Path, force: bool) -> Iterator[Path]:
    """Yield a temp folder beside ``final``; on success it replaces ``final`` atomically.

    On any error the temp folder is removed and ``final`` is untouched.
    """
    if final.exists() and not force:
        raise BadInput(f"{final} already exists; pass --force to replace it or choose another -o folder")
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        yield tmp
        publish(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def publish(tmp: Path, final: Path) -> None:
    """Swap ``tmp`` into ``final``: the old artifact stays whole until the new one is in place."""
    old = None
    if final.exists():
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        os.replace(final, old)
    try:
        os.replace(tmp, final)
    except OSError:
        if old is not None:
            os.replace(old, final)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
