from __future__ import annotations

from datetime import UTC, datetime

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from airgap.bundle.gate import check_before_parsing
from airgap.errors import SignatureError
from airgap.trust.roots import Role, new_root, parse_root
from airgap.trust.signing import TrustPolicy, sign, sign_envelope

DEEP = b'{"files": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"


def pinned(release: Ed25519PrivateKey) -> object:
    root_key = Ed25519PrivateKey.generate()
    made = new_root(1, datetime(2040, 1, 1, tzinfo=UTC), Role((root_key.public_key(),), 1),
                    Role((release.public_key(),), 1))
    return parse_root(sign_envelope(made.envelope, root_key).to_bytes())


def test_trusted_keys_decide_before_the_manifest_is_parsed() -> None:
    key = Ed25519PrivateKey.generate()
    check = check_before_parsing(TrustPolicy((key.public_key(),)))
    check(DEEP, [sign(DEEP, key)])  # signed: goes on to the (bounded) parser
    with pytest.raises(SignatureError, match="bundle manifest: expected valid signatures from 1 trusted key"):
        check(DEEP, [sign(DEEP, Ed25519PrivateKey.generate())])
    with pytest.raises(SignatureError, match="bundle manifest is not signed"):
        check(DEEP, [])


def test_a_pinned_root_decides_unless_the_manifest_lists_root_files() -> None:
    release = Ed25519PrivateKey.generate()
    check = check_before_parsing(pinned(release))  # type: ignore[arg-type]
    check(DEEP, [sign(DEEP, release)])
    with pytest.raises(SignatureError, match="found 0 valid"):
        check(DEEP, [sign(DEEP, Ed25519PrivateKey.generate())])
    rotating = DEEP.replace(b"{", b'{"path": "trust/root.2.json", ', 1)  # newer release keys may come with it
    check(rotating, [sign(rotating, Ed25519PrivateKey.generate())])
