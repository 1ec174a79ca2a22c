"""DSSE envelopes and threshold counting: signatures cover typed bytes, and a key counts once."""

from __future__ import annotations

import base64
import json

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from airgap.errors import FormatError, SignatureError
from airgap.trust.signing import (
    Envelope,
    Signature,
    TrustPolicy,
    key_id,
    pae,
    parse_envelope,
    require_threshold,
    sign,
    sign_envelope,
    verified_keys,
)

TYPE = "application/vnd.example+json"


def test_pae_matches_the_dsse_specification_example() -> None:
    assert pae("http://example.com/HelloWorld", b"hello world") == (
        b"DSSEv1 29 http://example.com/HelloWorld 11 hello world")


def test_envelope_round_trip_and_signature_over_pae() -> None:
    key = Ed25519PrivateKey.generate()
    envelope = sign_envelope(Envelope(TYPE, b'{"a": 1}'), key)
    parsed = parse_envelope(envelope.to_bytes(), TYPE, 1 << 20, 8, "test envelope")
    assert parsed == envelope
    key.public_key().verify(parsed.signatures[0].value, pae(TYPE, b'{"a": 1}'))
    assert verified_keys(parsed.signed_bytes, parsed.signatures, [key.public_key()])


def test_the_payload_type_is_bound_into_the_signature() -> None:
    key = Ed25519PrivateKey.generate()
    envelope = sign_envelope(Envelope(TYPE, b"{}"), key)
    relabelled = Envelope("application/vnd.other+json", envelope.payload, envelope.signatures)
    assert not verified_keys(relabelled.signed_bytes, relabelled.signatures, [key.public_key()])
    with pytest.raises(FormatError, match="expected payloadType"):
        parse_envelope(relabelled.to_bytes(), TYPE, 1 << 20, 8, "envelope")


def test_cosigning_keeps_one_signature_per_key() -> None:
    a, b = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    envelope = sign_envelope(sign_envelope(sign_envelope(Envelope(TYPE, b"{}"), a), b), a)
    assert sorted(s.keyid for s in envelope.signatures) == sorted([key_id(a.public_key()), key_id(b.public_key())])


_ENVELOPE = "invalid envelope (a DSSE envelope with payloadType, payload and signatures)"


@pytest.mark.parametrize("mutate, message", [
    (lambda d: d | {"payload": "not base64!"}, "envelope payload: bad base64"),
    (lambda d: d | {"signatures": [{"keyid": "AB" * 32, "sig": base64.b64encode(bytes(64)).decode()}]},
     f"envelope: key id must be 64 lowercase hex digits, found '{'AB' * 32}'"),
    (lambda d: d | {"signatures": [{"keyid": "ab" * 32, "sig": base64.b64encode(bytes(63)).decode()}]},
     "envelope: an Ed25519 signature has 64 bytes, found 63"),
    (lambda d: d | {"signatures": [{"keyid": "ab" * 32}] * 9}, f"{_ENVELOPE}: field 'signatures' has 9 items, limit 8"),
    (lambda d: [d], f"{_ENVELOPE}: expected a JSON object, found list"),
])
def test_malformed_envelopes_are_refused(mutate: object, message: str) -> None:
    doc = json.loads(Envelope(TYPE, b"{}").to_bytes())
    data = json.dumps(mutate(doc)).encode()  # type: ignore[operator]
    with pytest.raises(FormatError) as refused:
        parse_envelope(data, TYPE, 1 << 20, 8, "envelope")
    assert str(refused.value) == message


def test_oversized_envelope_refused_before_parsing() -> None:
    with pytest.raises(FormatError, match="too large"):
        parse_envelope(b" " * 101, TYPE, 100, 8, "envelope")


def test_the_same_key_is_counted_once_whatever_the_signature_list_says() -> None:
    a, b = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    data = b"manifest"
    one = sign(data, a)
    trusted = [a.public_key(), b.public_key(), a.public_key()]  # a listed twice among the trusted keys too
    assert len(verified_keys(data, [one, one, one], trusted)) == 1
    with pytest.raises(SignatureError, match="found 1 valid"):
        require_threshold(data, [one, one], trusted, 2, "manifest")
    assert len(TrustPolicy((a.public_key(), b.public_key()), 2).check(data, [one, sign(data, b)])) == 2


def test_a_signature_under_another_keys_id_does_not_count() -> None:
    a, b = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    forged = Signature(keyid=key_id(b.public_key()), value=sign(b"m", a).value)
    assert not verified_keys(b"m", [forged], [a.public_key(), b.public_key()])
