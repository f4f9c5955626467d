"""The artifact folder: manifest with hashes, golden I/O, atomic publication, verify."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import io
import json
import os
import shutil
import tempfile
import zipfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from edgepipe.core.errors import BadInput
from edgepipe.core.manifest import SCHEMA_VERSION, Manifest, check_schema

SIGNATURE = "model.sig"  # written after the manifest, over every other file (edgepipe.core.sign)
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
    """sha256 of every file under ``folder`` except the manifest and the signature, keyed by posix path."""
    return {
        p.relative_to(folder).as_posix(): sha256_file(p)
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.relative_to(folder).as_posix() not in (MANIFEST, SIGNATURE)
    }


def canonical(data: Any) -> bytes:
    return json.dumps(data, sort_keys=True, indent=2, ensure_ascii=False).encode() + b"\n"


def manifest_digest(manifest: dict[str, Any]) -> str:
    """sha256 of the manifest without its own ``digest`` field (catches edits)."""
    return hashlib.sha256(canonical({k: v for k, v in manifest.items() if k != "digest"})).hexdigest()


def write_manifest(folder: Path, manifest: Manifest | Mapping[str, Any]) -> dict[str, Any]:
    """Seal ``manifest`` (schema version, file hashes, content digest, its own digest) and write it: the JSON written."""
    typed = manifest if isinstance(manifest, Manifest) else Manifest.from_json(manifest)
    typed = typed.with_(schema_version=SCHEMA_VERSION, files=hash_tree(folder))
    typed = typed.with_(content_sha256=content_digest(typed.to_json()))
    data = typed.with_(digest=manifest_digest(typed.to_json())).to_json()
    (folder / MANIFEST).write_bytes(canonical(data))
    return data


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
    check_schema(data.get("schema_version"), str(path))
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


def ensure_replaceable(final: Path, force: bool) -> None:
    """An existing artifact is replaced only with ``--force`` (the one place this is checked)."""
    if final.exists() and not force:
        raise BadInput(f"{final} already exists; pass --force to replace it or choose another -o folder")


@contextlib.contextmanager
def staging(final: Path, force: bool) -> Iterator[Path]:
    """Yield a temp folder beside ``final``; on success it replaces ``final`` atomically.

    On any error the temp folder is removed and ``final`` is untouched.
    """
    ensure_replaceable(final, force)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-{os.getpid()}-", dir=final.parent))
    os.chmod(tmp, 0o755)  # mkdtemp's 0700 would leave the published artifact private
    try:
        yield tmp
        publish(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def folder_lock(folder: Path) -> Iterator[None]:
    """An exclusive flock on the folder itself: concurrent builds publish one at a time."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def publish(tmp: Path, final: Path) -> None:
    """Swap ``tmp`` into ``final``: the old artifact stays whole until the new one is in place."""
    with folder_lock(final.parent):
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


def remove_stale(folder: Path) -> list[str]:
    """Delete temp folders left by builds that were killed (their pid is gone)."""
    removed = []
    if not folder.is_dir():
        return removed
    for path in folder.iterdir():
        name = path.name
        if not name.startswith(".") or not any(tag in name for tag in (".tmp-", ".old-", ".work-")):
            continue
        pid = _pid_in(name)
        if pid is not None and _alive(pid):
            continue
        if ".old-" in name:
            # Killed between the two renames of publish(): the old artifact is the only one; put it back.
            final = folder / name[1:].split(".old-", 1)[0]
            if not final.exists():
                os.replace(path, final)
                removed.append(f"{name} (restored)")
                continue
        shutil.rmtree(path, ignore_errors=True)
        removed.append(name)
    return removed


def _pid_in(name: str) -> int | None:
    for tag in (".tmp-", ".old-", ".work-"):
        if tag in name:
            head = name.split(tag, 1)[1].split("-", 1)[0]
            return int(head) if head.isdigit() else None
    return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except OSError as exc:
        return exc.errno == errno.EPERM
    return not _zombie(pid)


def _zombie(pid: int) -> bool:
    """Exited, not yet reaped by its parent (Linux: state Z). A Ray worker that died is one for a moment after the
    driver hears of it: its scratch folder is stale already."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[-1].split()[:1] == ["Z"]


CONTENT_KEYS = ("name", "target", "model_file", "files", "inputs", "outputs", "opset", "ir_version", "source", "passes", "accuracy", "golden")


def content_digest(manifest: dict[str, Any]) -> str:
    """sha256 of what a rebuild must reproduce exactly: equal for byte-identical builds.

    Pass stats hold timings (a search's seconds, fusion measured faster or not), so of the passes
    only names and params count; what they produced is in ``files``.
    """
    content = {k: manifest.get(k) for k in CONTENT_KEYS}
    content["passes"] = [{"name": p.get("name"), "params": p.get("params")} for p in manifest.get("passes") or []]
    return hashlib.sha256(canonical(content)).hexdigest()
