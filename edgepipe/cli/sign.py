"""``edgepipe sign`` and the signing options of ``build`` / ``verify``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from edgepipe.core.errors import BadInput
from edgepipe.core.sign import PASSWORD_ENV, sign_folder, signer, verifier


def add_build_options(parser: Any) -> None:
    """``build --sign-key K [--sign-certificate C --sign-cert-chain P...]``: sign each published artifact."""
    parser.add_argument("--sign-key", type=Path, help="sign each published artifact folder with this EC private key (PEM): writes model.sig")
    parser.add_argument("--sign-certificate", type=Path, help="with --sign-key: the key's signing certificate (PEM)")
    parser.add_argument("--sign-cert-chain", type=Path, nargs="+", default=[], help="with --sign-certificate: intermediate certificates (PEM)")


def build_signer(args: Any) -> Any:
    """The signer ``build`` was asked for (None without --sign-key); loading it checks the key before any work."""
    if getattr(args, "sign_key", None) is None:
        if getattr(args, "sign_certificate", None) or getattr(args, "sign_cert_chain", None):
            raise BadInput("--sign-certificate/--sign-cert-chain need --sign-key (the certificate's private key)")
        return None
    return signer(args.sign_key, args.sign_certificate, args.sign_cert_chain)


def add_verify_options(parser: Any) -> None:
    parser.add_argument("--public-key", type=Path, help="also check model.sig against this EC public key (PEM)")
    parser.add_argument("--cert-chain", type=Path, nargs="+", help="also check model.sig: its certificate must chain to these (PEM)")


def verify_trust(args: Any) -> Any:
    """The verifying config ``verify`` was asked for, or None (no signature check)."""
    if args.public_key is not None and args.cert_chain:
        raise BadInput("give --public-key or --cert-chain, not both")
    if args.public_key is None and not args.cert_chain:
        return None
    return verifier(args.public_key, args.cert_chain or ())


def add_command(sub: Any) -> None:
    s = sub.add_parser("sign", help="sign an artifact folder (OpenSSF model signing, key-based, offline)")
    s.add_argument("artifact", help="artifact folder OUT/<name>/<target>")
    s.add_argument("--key", type=Path, required=True, help="EC private key (PEM); encrypted: its password in $" + PASSWORD_ENV)
    s.add_argument("--certificate", type=Path, help="the key's signing certificate (PEM)")
    s.add_argument("--cert-chain", type=Path, nargs="+", default=[], help="intermediate certificates (PEM)")
    s.set_defaults(func=cmd_sign)


def cmd_sign(args: Any) -> int:
    if args.cert_chain and args.certificate is None:
        raise BadInput("--cert-chain needs --certificate (the signing certificate the chain vouches for)")
    config = signer(args.key, args.certificate, args.cert_chain)
    folder = Path(args.artifact)
    if not folder.is_dir():
        raise BadInput(f"{folder} is not an artifact folder; pass OUT/<name>/<target> (sign before packing a .tar.gz)")
    print(f"signed: {sign_folder(folder, config)}")
    return 0
