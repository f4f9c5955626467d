"""--archive: reproducible tar.gz that verify accepts; unsafe archives are refused."""

from __future__ import annotations

import io
import tarfile

from edgepipe.cli import main
from edgepipe.core.archive import pack


def test_archive_is_reproducible_and_verifies(artifact, tmp_path):
    a = pack(artifact, tmp_path / "a.tar.gz")
    b = pack(artifact, tmp_path / "b.tar.gz")
    assert a.read_bytes() == b.read_bytes()
    with tarfile.open(a) as tar:
        members = tar.getmembers()
    assert [m.name for m in members] == sorted(m.name for m in members)
    assert all(m.mtime == 0 and m.uid == 0 and m.uname == "" for m in members)
    assert main(["verify", str(a)]) == 0


def test_tampered_archive_fails(artifact, tmp_path):
    (artifact / "golden.npz").write_bytes(b"changed")
    assert main(["verify", str(pack(artifact, tmp_path / "x.tar.gz"))]) == 1


def _evil(tmp_path, name: str, kind=tarfile.REGTYPE) -> str:
    path = tmp_path / "evil.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        info = tarfile.TarInfo(name)
        info.type = kind
        if kind == tarfile.SYMTYPE:
            info.linkname = "/etc/passwd"
            tar.addfile(info)
        else:
            info.size = 3
            tar.addfile(info, io.BytesIO(b"bad"))
    return str(path)


def test_path_traversal_and_links_are_refused(tmp_path, capsys):
    assert main(["verify", _evil(tmp_path, "../outside.txt")]) == 2
    assert "outside its folder" in capsys.readouterr().err
    assert not (tmp_path.parent / "outside.txt").exists()
    assert main(["verify", _evil(tmp_path, "/abs.txt")]) == 2
    assert main(["verify", _evil(tmp_path, "cpu/link", tarfile.SYMTYPE)]) == 2
    assert "link or device" in capsys.readouterr().err


def test_not_an_archive(tmp_path, capsys):
    bad = tmp_path / "junk.tar.gz"
    bad.write_bytes(b"not gzip")
    assert main(["verify", str(bad)]) == 2
    assert "not a readable .tar.gz" in capsys.readouterr().err
