"""Signed artifacts: OpenSSF model signing (sigstore/model-transparency) with a local key, offline."""

from __future__ import annotations

import base64
import dataclasses
import json
import logging
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from edgepipe.core.artifact import SIGNATURE
from edgepipe.core.errors import BadInput, CheckFailed, one_line

logger = logging.getLogger(__name__)
PASSWORD_ENV = "EDGEPIPE_SIGN_KEY_PASSWORD"  # for an encrypted private key; never a command-line argument


def _model_signing() -> Any:
    try:
        import model_signing
    except ImportError as exc:
        raise BadInput(f"signing needs the model-signing package ({exc}); pip install model-signing pyopenssl") from None
    return model_signing


def _hashing() -> Any:
    """Every file of the folder but the signature itself (git-looking files included: nothing escapes it)."""
    return _model_signing().hashing.Config().set_ignored_paths(paths=[SIGNATURE], ignore_git_paths=False)


def _pem(path: Path, what: str) -> Path:
    path = Path(path)
    if not path.is_file():
        raise BadInput(f"{path}: no such file; pass the {what} PEM file")
    return path


def signer(key: Path, certificate: Path | None = None, chain: Sequence[Path] = ()) -> Any:
    """A signing config for an EC private key (P-256/384/521 PEM), optionally with its certificate and chain.

    Loaded at once, so a bad key is exit 2 before any build work.
    """
    ms = _model_signing()
    from cryptography.exceptions import UnsupportedAlgorithm

    key = _pem(key, "private key")
    password = os.environ.get(PASSWORD_ENV)
    config = ms.signing.Config().set_hashing_config(_hashing())
    try:
        if certificate is None:
            return config.use_elliptic_key_signer(private_key=key, password=password)
        certificate = _pem(certificate, "signing certificate")
        return config.use_certificate_signer(
            private_key=key,
            signing_certificate=certificate,
            # model-signing 1.1 cannot parse an empty chain; the leaf itself is a harmless stand-in (not a trust anchor)
            certificate_chain=[_pem(c, "certificate") for c in chain] or [certificate],
        )
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        what = f"{key}" + (f" with {certificate}" if certificate is not None else "")
        raise BadInput(f"{what}: not a usable signing key/certificate ({one_line(str(exc))[:200]}); give an EC P-256/P-384/P-521 private key "
                       f"in PEM (openssl ecparam -name prime256v1 -genkey -noout -out key.pem), its password in ${PASSWORD_ENV} if encrypted") from None


def verifier(public_key: Path | None = None, chain: Sequence[Path] = ()) -> Any:
    """A verifying config for a public key, or for certificate signatures that chain to ``chain``."""
    ms = _model_signing()
    from cryptography.exceptions import UnsupportedAlgorithm

    config = ms.verifying.Config().set_ignore_unsigned_files(False)
    try:
        if public_key is not None:
            return config.use_elliptic_key_verifier(public_key=_pem(public_key, "public key"))
        return config.use_certificate_verifier(certificate_chain=[_pem(c, "certificate") for c in chain])
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        what = public_key if public_key is not None else ", ".join(map(str, chain))
        raise BadInput(f"{what}: not a usable public key or certificate ({one_line(str(exc))[:200]}); give the PEM "
                       "(openssl ec -in key.pem -pubout -out key.pub.pem)") from None


def sign_folder(folder: Path, config: Any) -> Path:
    """Write ``folder/model.sig`` over every file of the artifact (manifest included); atomic.

    The files must still match the manifest: signing never blesses a tampered artifact.
    """
    from edgepipe.core.artifact import hash_tree, read_manifest
    from edgepipe.core.manifest import Manifest

    folder = Path(folder)
    files = Manifest.from_json(read_manifest(folder)).files or {}
    actual = hash_tree(folder)
    if actual != files:
        changed = sorted(p for p in set(actual) | set(files) if actual.get(p) != files.get(p))
        raise CheckFailed(f"{folder}: files do not match its manifest ({', '.join(changed)}); not signed, rebuild it")
    fd, tmp = tempfile.mkstemp(prefix=f".{folder.name}.sig-", dir=folder.parent)
    os.close(fd)
    try:
        config.sign(folder, Path(tmp))
        os.chmod(tmp, 0o644)
        os.replace(tmp, folder / SIGNATURE)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    logger.info("signed %s", folder)
    return folder / SIGNATURE


@dataclasses.dataclass
class SignatureCheck:
    passed: bool
    detail: str


def check_signature(folder: Path, config: Any) -> SignatureCheck:
    """Does ``model.sig`` verify with the given key/chain and cover exactly the folder's files?"""
    folder = Path(folder)
    sig = folder / SIGNATURE
    if not sig.is_file():
        return SignatureCheck(False, f"no {SIGNATURE}: the artifact is not signed (build with --sign-key or run edgepipe sign)")
    try:
        config.verify(folder, sig)
    except ValueError as exc:
        text = one_line(str(exc))
        if text.startswith("Signature mismatch"):
            return SignatureCheck(False, f"signed files differ: {_diff(folder, sig)}")
        return SignatureCheck(False, f"{SIGNATURE} does not verify with the key given: {text[:200]}")
    except Exception as exc:  # a damaged bundle: protobuf/JSON/base64/OpenSSL errors all mean "not trustworthy"
        return SignatureCheck(False, f"{SIGNATURE} is damaged or not a model signature: {type(exc).__name__}: {one_line(str(exc))[:160]}")
    return SignatureCheck(True, f"{SIGNATURE} verifies: every file is the one that was signed")


def _diff(folder: Path, sig: Path) -> str:
    """Changed/missing/extra files against the signed list (read after the signature itself verified)."""
    from edgepipe.core.artifact import MANIFEST, hash_tree, sha256_file

    bundle = json.loads(sig.read_text(encoding="utf-8"))
    statement = json.loads(base64.b64decode(bundle["dsseEnvelope"]["payload"]))
    signed = {r["name"]: r["digest"] for r in statement["predicate"]["resources"]}
    actual = {**hash_tree(folder), MANIFEST: sha256_file(folder / MANIFEST)} if (folder / MANIFEST).is_file() else hash_tree(folder)
    changed = sorted(p for p in set(signed) & set(actual) if signed[p] != actual[p])
    missing, extra = sorted(set(signed) - set(actual)), sorted(set(actual) - set(signed))
    parts = [f"{label}: {', '.join(items)}" for label, items in (("changed", changed), ("missing", missing), ("extra", extra)) if items]
    return "; ".join(parts) or "the signed file list differs"


# ---------------------------------------------------------------- command line


def sign_published(folders: Sequence[Path | None], config: Any) -> None:
    """After publication: sign every artifact folder that was written (before any archive is packed)."""
    if config is None:
        return
    for folder in folders:
        if folder is not None:
            sign_folder(folder, config)
