"""Signed artifacts: OpenSSF model signing with a local EC key or a certificate chain, offline."""

from __future__ import annotations

import datetime
import json
import shutil
import tarfile
from pathlib import Path

import pytest
from conftest import DIGITS, ec_keypair
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.oid import NameOID

from edgepipe.cli import main
from edgepipe.core.artifact import hash_tree, manifest_digest, read_manifest, sha256_file


@pytest.fixture
def keys(tmp_path) -> dict[str, Path]:
    key, pub, _ = ec_keypair(tmp_path, "key")
    _, other_pub, _ = ec_keypair(tmp_path, "other")
    return {"key": key, "pub": pub, "other_pub": other_pub}


def _reseal_flip(folder: Path, rel: str) -> None:
    """Flip a byte in ``rel`` and recompute the manifest's hashes and digest (what an attacker can do)."""
    path = folder / rel
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    manifest = read_manifest(folder)
    manifest["files"] = hash_tree(folder)
    manifest["digest"] = manifest_digest(manifest)
    (folder / "manifest.json").write_text(json.dumps(manifest))


def _verify(folder: Path, *extra: str) -> int:
    return main(["verify", str(folder), *extra])


def test_signed_artifact_verifies_and_a_resealed_tamper_fails_naming_the_file(artifact, keys, capsys):
    assert main(["sign", str(artifact), "--key", str(keys["key"])]) == 0
    assert (artifact / "model.sig").is_file()
    assert _verify(artifact, "--public-key", str(keys["pub"])) == 0
    assert _verify(artifact) == 0  # unsigned-style verify still works on a signed folder
    # A better accuracy written into the manifest, digest recomputed: only the signature can catch it.
    manifest = read_manifest(artifact)
    manifest["accuracy"]["value"] = 1.0
    manifest["digest"] = manifest_digest(manifest)
    (artifact / "manifest.json").write_text(json.dumps(manifest))
    assert _verify(artifact) == 0
    capsys.readouterr()
    assert _verify(artifact, "--public-key", str(keys["pub"])) == 1
    assert _signature_line(capsys) == "manifest.json"
    _reseal_flip(artifact, "golden.npz")
    assert _verify(artifact) == 1  # a corrupt golden.npz is a failed check, not an internal error
    capsys.readouterr()
    assert _verify(artifact, "--public-key", str(keys["pub"])) == 1
    assert _signature_line(capsys) == "golden.npz, manifest.json"


def _signature_line(capsys) -> str:
    """The files the FAIL signature line names as changed."""
    (line,) = [line for line in capsys.readouterr().out.splitlines() if line.startswith("FAIL signature")]
    return line.split("changed: ", 1)[1].split(";")[0]


def test_wrong_key_missing_signature_and_bad_key(artifact, keys, tmp_path, capsys):
    assert _verify(artifact, "--public-key", str(keys["pub"])) == 1  # not signed
    assert "FAIL signature" in capsys.readouterr().out
    assert main(["sign", str(artifact), "--key", str(keys["key"])]) == 0
    assert _verify(artifact, "--public-key", str(keys["other_pub"])) == 1
    # Re-signed by someone else's key: the files are untouched, the signer is not the one trusted.
    thief, _, _ = ec_keypair(tmp_path, "thief")
    assert main(["sign", str(artifact), "--key", str(thief)]) == 0
    assert _verify(artifact, "--public-key", str(keys["pub"])) == 1
    junk = tmp_path / "junk.pem"
    junk.write_text("not a key\n")
    capsys.readouterr()
    assert _verify(artifact, "--public-key", str(junk)) == 2
    assert main(["sign", str(artifact), "--key", str(keys["pub"])]) == 2  # a public key is not a signing key
    assert main(["sign", str(artifact), "--key", str(tmp_path / "nope.pem")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and all(line.startswith("edgepipe: error:") for line in err)


def test_damaged_signature_fails(artifact, keys):
    assert main(["sign", str(artifact), "--key", str(keys["key"])]) == 0
    sig = artifact / "model.sig"
    bundle = json.loads(sig.read_text())
    bundle["dsseEnvelope"]["signatures"][0]["sig"] = bundle["dsseEnvelope"]["signatures"][0]["sig"][::-1]
    sig.write_text(json.dumps(bundle))
    assert _verify(artifact, "--public-key", str(keys["pub"])) == 1
    sig.write_text("{")
    assert _verify(artifact, "--public-key", str(keys["pub"])) == 1


def test_sign_refuses_a_folder_that_no_longer_matches_its_manifest(artifact, keys):
    data = bytearray((artifact / "model.onnx").read_bytes())
    data[-1] ^= 0x01
    (artifact / "model.onnx").write_bytes(bytes(data))
    assert main(["sign", str(artifact), "--key", str(keys["key"])]) == 1
    assert not (artifact / "model.sig").exists()


def _certificate(subject: str, key, issuer_name: str, issuer_key, ca: bool) -> x509.Certificate:
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
        .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer_name)]))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=not ca, content_commitment=False, key_encipherment=False, data_encipherment=False,
                                     key_agreement=False, key_cert_sign=ca, crl_sign=ca, encipher_only=False, decipher_only=False), critical=True)
    )
    return builder.sign(issuer_key, hashes.SHA256())


def test_certificate_chain(artifact, tmp_path):
    pem = serialization.Encoding.PEM
    _, _, root_key = ec_keypair(tmp_path, "root")
    leaf_path, _, leaf_key = ec_keypair(tmp_path, "leaf")
    _, _, stranger_key = ec_keypair(tmp_path, "stranger")
    (tmp_path / "root.crt").write_bytes(_certificate("edge root", root_key, "edge root", root_key, ca=True).public_bytes(pem))
    (tmp_path / "stranger.crt").write_bytes(_certificate("other root", stranger_key, "other root", stranger_key, ca=True).public_bytes(pem))
    (tmp_path / "leaf.crt").write_bytes(_certificate("edge ci", leaf_key, "edge root", root_key, ca=False).public_bytes(pem))
    assert main(["sign", str(artifact), "--key", str(leaf_path), "--certificate", str(tmp_path / "leaf.crt")]) == 0
    assert _verify(artifact, "--cert-chain", str(tmp_path / "root.crt")) == 0
    assert _verify(artifact, "--cert-chain", str(tmp_path / "stranger.crt")) == 1
    _reseal_flip(artifact, "model.onnx")
    assert _verify(artifact, "--cert-chain", str(tmp_path / "root.crt")) == 1


def test_build_with_sign_key_signs_before_archiving(digits_build, keys, tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["build", str(DIGITS / "recipe.yaml"), "-o", str(out), "--target", "cpu", "--quiet", "--archive", "--sign-key", str(keys["key"])]
    assert main(argv) == 0
    folder = out / "digits-cnn" / "cpu"
    assert (folder / "model.sig").is_file()
    # Every other file is byte-identical to an unsigned build: the signature sits beside the hashed files.
    assert hash_tree(folder) == hash_tree(digits_build / "cpu")
    assert read_manifest(folder)["content_sha256"] == read_manifest(digits_build / "cpu")["content_sha256"]
    archive = out / "digits-cnn" / "digits-cnn-cpu.tar.gz"
    with tarfile.open(archive) as tar:
        member = tar.extractfile("cpu/model.sig")
        assert member is not None and member.read() == (folder / "model.sig").read_bytes()
    assert _verify(archive, "--public-key", str(keys["pub"])) == 0
    tampered = tmp_path / "tampered"
    shutil.copytree(folder, tampered)
    _reseal_flip(tampered, "model.onnx")
    capsys.readouterr()
    assert _verify(tampered, "--public-key", str(keys["pub"])) == 1
    assert _signature_line(capsys) == "manifest.json, model.onnx"
    assert sha256_file(tampered / "model.onnx") == read_manifest(tampered)["files"]["model.onnx"]  # the reseal itself held


def test_bad_sign_key_is_exit_2_before_any_work(tmp_path, capsys):
    out = tmp_path / "out"
    junk = tmp_path / "junk.pem"
    junk.write_text("-----BEGIN EC PRIVATE KEY-----\nAAAA\n-----END EC PRIVATE KEY-----\n")
    assert main(["build", str(DIGITS / "recipe.yaml"), "-o", str(out), "--target", "cpu", "--sign-key", str(junk)]) == 2
    assert main(["build", str(DIGITS / "recipe.yaml"), "-o", str(out), "--sign-key", str(junk), "--dry-run"]) == 2
    assert main(["build", str(DIGITS / "recipe.yaml"), str(DIGITS / "recipe.yaml"), "-o", str(out), "--sign-key", str(junk)]) == 2
    assert not out.exists()
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 3 and all(line.startswith("edgepipe: error:") for line in err)
