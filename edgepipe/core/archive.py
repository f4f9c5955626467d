"""Reproducible .tar.gz packaging of an artifact, and safe extraction for verify."""

from __future__ import annotations

import contextlib
import gzip
import io
import shutil
import tarfile
import tempfile
from collections.abc import Iterator
from pathlib import Path, PurePosixPath

from edgepipe.core.errors import BadInput


def pack(folder: Path, dest: Path) -> Path:
    """Write ``folder`` as ``dest`` (.tar.gz): sorted entries, mtime 0, root owner, no gzip name/time."""
    root = PurePosixPath(folder.name)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        tar.addfile(_info(str(root), tarfile.DIRTYPE, 0o755))
        for path in sorted(folder.rglob("*")):
            rel = str(root / path.relative_to(folder).as_posix())
            if path.is_dir():
                tar.addfile(_info(rel, tarfile.DIRTYPE, 0o755))
            elif path.is_file():
                data = path.read_bytes()
                info = _info(rel, tarfile.REGTYPE, 0o644)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    tmp = dest.with_name(f".{dest.name}.tmp")
    with open(tmp, "wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0, compresslevel=9) as gz:
        gz.write(buf.getvalue())
    tmp.replace(dest)
    return dest


def _info(name: str, kind: bytes, mode: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.mode = mode
    info.mtime = 0
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def is_archive(path: Path) -> bool:
    return path.is_file() and path.name.endswith((".tar.gz", ".tgz"))


@contextlib.contextmanager
def extracted(archive: Path) -> Iterator[Path]:
    """Extract into a temp folder, refusing links, devices and any path that would land outside it."""
    tmp = Path(tempfile.mkdtemp(prefix="edgepipe-verify-"))
    try:
        try:
            tar = tarfile.open(archive, "r:gz")
        except (tarfile.TarError, OSError, EOFError) as exc:
            raise BadInput(f"{archive}: not a readable .tar.gz ({exc})") from None
        with tar:
            tops = set()
            for member in tar.getmembers():
                parts = PurePosixPath(member.name).parts
                if member.name.startswith(("/", "\\")) or ".." in parts or not parts:
                    raise BadInput(f"{archive}: entry '{member.name}' would land outside its folder; refusing the archive")
                if not (member.isfile() or member.isdir()):
                    raise BadInput(f"{archive}: entry '{member.name}' is a link or device; refusing the archive")
                tops.add(parts[0])
            if len(tops) != 1:
                raise BadInput(f"{archive}: expected one top folder, found {sorted(tops)}")
            tar.extractall(tmp, filter="data")
        yield tmp / tops.pop()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
