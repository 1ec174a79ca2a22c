"""Ed25519 keys and signatures over manifest bytes. Pure: bytes in, verified values out, no I/O.

A signature is a raw 64-byte Ed25519 signature over the manifest file's exact bytes, so that
`openssl pkeyutl -verify -rawin` checks it without this tool. Keys are identified by the SHA-256 of
their raw 32-byte public key; thresholds count distinct public keys, never key-id strings.

Trust metadata (root files) travels in DSSE envelopes: the signature covers the pre-authentication
encoding `DSSEv1 <len> <type> <len> <payload>`, so the payload type is bound into the signed bytes,
no canonical JSON is needed, and one envelope holds any number of co-signatures.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from airgap.errors import FormatError, KeyFileError, SignatureError
from airgap.format import strictjson
from airgap.format.fields import Fields

# The key types, named here so that no module outside this package imports cryptography.
PrivateKey = Ed25519PrivateKey
PublicKey = Ed25519PublicKey

SIGNATURES_HEADER = "airgap-signatures v1"
SIGNATURES_BLOCK_SIZE = 8192  # fixed so that `airgap sign` adds a co-signature in place, without a rebuild
_SIG_LINE_RE = re.compile(r"ed25519 ([0-9a-f]{64}) ([A-Za-z0-9+/]{86}==)")


@dataclass(frozen=True)
class Signature:
    keyid: str
    value: bytes


@dataclass(frozen=True)
class KeyPairPem:
    private_pem: bytes
    public_pem: bytes


def raw_public_bytes(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def key_id(key: Ed25519PublicKey) -> str:
    """SHA-256 of the raw public key: `openssl pkey -pubin -outform DER | tail -c 32 | sha256sum`."""
    return hashlib.sha256(raw_public_bytes(key)).hexdigest()


def generate_keypair(passphrase: bytes | None) -> KeyPairPem:
    private = Ed25519PrivateKey.generate()
    encryption: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(passphrase) if passphrase else serialization.NoEncryption()
    )
    return KeyPairPem(
        private_pem=private.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption),
        public_pem=public_pem(private.public_key()),
    )


def public_pem(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def load_private_key(pem: bytes, passphrase: bytes | None, where: str) -> Ed25519PrivateKey:
    try:
        key = serialization.load_pem_private_key(pem, password=passphrase)
    except TypeError as exc:
        if passphrase is None:
            raise KeyFileError(f"{where}: the key is encrypted; set AIRGAP_KEY_PASSPHRASE or enter it") from exc
        raise KeyFileError(f"{where}: the key is not encrypted but a passphrase was given") from exc
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise KeyFileError(f"{where}: expected an Ed25519 PKCS#8 PEM private key (or wrong passphrase)") from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise KeyFileError(f"{where}: expected an Ed25519 private key, found {type(key).__name__}")
    return key


def load_public_key(pem: bytes, where: str) -> Ed25519PublicKey:
    try:
        key = serialization.load_pem_public_key(pem)
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise KeyFileError(f"{where}: expected an Ed25519 public key in PEM (SubjectPublicKeyInfo)") from exc
    if not isinstance(key, Ed25519PublicKey):
        raise KeyFileError(f"{where}: expected an Ed25519 public key, found {type(key).__name__}")
    return key


def public_key_from_raw(raw: bytes) -> Ed25519PublicKey:
    try:
        return Ed25519PublicKey.from_public_bytes(raw)
    except ValueError as exc:
        raise FormatError(f"invalid Ed25519 public key: expected 32 bytes, found {len(raw)}") from exc


def sign(data: bytes, private: Ed25519PrivateKey) -> Signature:
    return Signature(keyid=key_id(private.public_key()), value=private.sign(data))


def encode_signatures(signatures: Iterable[Signature], block_size: int = SIGNATURES_BLOCK_SIZE) -> bytes:
    """The signatures member: a header line, one line per signature, padded with newlines to a fixed size."""
    unique = {s.keyid: s for s in signatures}
    lines = [SIGNATURES_HEADER] + [
        f"ed25519 {s.keyid} {base64.b64encode(s.value).decode()}" for s in sorted(unique.values(),
                                                                                   key=lambda s: s.keyid)
    ]
    text = ("\n".join(lines) + "\n").encode()
    if len(text) > block_size:
        raise SignatureError(f"too many signatures: they need {len(text)} bytes, the block holds {block_size}")
    return text + b"\n" * (block_size - len(text))


def decode_signatures(block: bytes, max_signatures: int = 64) -> tuple[Signature, ...]:
    try:
        text = block.decode("ascii")
    except UnicodeDecodeError as exc:
        raise FormatError("signatures block is not ASCII text") from exc
    lines = text.rstrip("\n").split("\n")  # the padding; anything else must be a line of its own
    if not lines or lines[0] != SIGNATURES_HEADER:
        raise FormatError(f"signatures block: expected header {SIGNATURES_HEADER!r}, found {lines[:1]}")
    if len(lines) - 1 > max_signatures:
        raise FormatError(f"signatures block: limit {max_signatures} signatures, found {len(lines) - 1}")
    signatures = []
    for line in lines[1:]:
        match = _SIG_LINE_RE.fullmatch(line)
        if not match:
            raise FormatError(f"signatures block: malformed line {line[:80]!r}")
        try:
            value = base64.b64decode(match.group(2), validate=True)
        except binascii.Error as exc:
            raise FormatError("signatures block: bad base64") from exc
        if base64.b64encode(value).decode() != match.group(2):  # unused low bits of the last character set
            raise FormatError(f"signatures block: non-canonical base64 in the signature of key {match.group(1)[:16]}")
        signatures.append(Signature(keyid=match.group(1), value=value))
    if encode_signatures(signatures, len(block)) != block:
        raise FormatError("signatures block is not in the form airgap writes: one line per key, sorted by key id, "
                          "padded with newlines")
    return tuple(signatures)


def verified_keys(data: bytes, signatures: Sequence[Signature], trusted: Sequence[Ed25519PublicKey]) -> set[bytes]:
    """Raw public keys among `trusted` whose signature over `data` is valid. Each key counts once."""
    by_id = {key_id(k): k for k in trusted}
    good: set[bytes] = set()
    for signature in signatures:
        key = by_id.get(signature.keyid)
        if key is None:
            continue
        try:
            key.verify(signature.value, data)
        except InvalidSignature:
            continue
        good.add(raw_public_bytes(key))
    return good


def require_threshold(
    data: bytes, signatures: Sequence[Signature], trusted: Sequence[Ed25519PublicKey], threshold: int, what: str
) -> set[bytes]:
    """Raise SignatureError unless at least `threshold` distinct trusted keys signed `data`."""
    if threshold < 1:
        raise SignatureError(f"{what}: threshold must be at least 1, found {threshold}")
    if not signatures:
        raise SignatureError(f"{what} is not signed: expected {threshold} signature(s) from trusted keys, found none")
    good = verified_keys(data, signatures, trusted)
    if len(good) < threshold:
        ids = ", ".join(s.keyid[:16] for s in signatures)
        trusted_ids = ", ".join(key_id(k)[:16] for k in trusted) or "none"
        raise SignatureError(
            f"{what}: expected valid signatures from {threshold} trusted key(s) [{trusted_ids}], "
            f"found {len(good)} valid among signatures by [{ids}]"
        )
    return good


@dataclass(frozen=True)
class TrustPolicy:
    """Which keys may sign release manifests, and how many distinct ones must."""

    keys: tuple[Ed25519PublicKey, ...]
    threshold: int = 1

    def check(self, manifest_bytes: bytes, signatures: Sequence[Signature]) -> set[bytes]:
        return require_threshold(manifest_bytes, signatures, self.keys, self.threshold, "bundle manifest")


# ---------------------------------------------------------------- DSSE envelopes

DSSE_VERSION = b"DSSEv1"


def pae(payload_type: str, payload: bytes) -> bytes:
    """DSSE pre-authentication encoding: the exact bytes a DSSE signature covers."""
    kind = payload_type.encode("utf-8")
    return b"%s %d %s %d %s" % (DSSE_VERSION, len(kind), kind, len(payload), payload)


@dataclass(frozen=True)
class Envelope:
    """A DSSE envelope: a typed payload and the signatures over its pre-authentication encoding."""

    payload_type: str
    payload: bytes
    signatures: tuple[Signature, ...] = ()

    @property
    def signed_bytes(self) -> bytes:
        return pae(self.payload_type, self.payload)

    def with_signatures(self, new: Iterable[Signature]) -> Envelope:
        """Add signatures; a key that signed already keeps one signature, the newest."""
        merged = {s.keyid: s for s in self.signatures} | {s.keyid: s for s in new}
        return Envelope(self.payload_type, self.payload, tuple(sorted(merged.values(), key=lambda s: s.keyid)))

    def to_bytes(self) -> bytes:
        doc = {
            "payloadType": self.payload_type,
            "payload": base64.b64encode(self.payload).decode(),
            "signatures": [{"keyid": s.keyid, "sig": base64.b64encode(s.value).decode()} for s in self.signatures],
        }
        return (json.dumps(doc, indent=1, sort_keys=True) + "\n").encode()


def sign_envelope(envelope: Envelope, private: Ed25519PrivateKey) -> Envelope:
    return envelope.with_signatures([sign(envelope.signed_bytes, private)])


def parse_envelope(data: bytes, payload_type: str, max_bytes: int, max_signatures: int, what: str) -> Envelope:
    """Parse a DSSE envelope of the expected payload type; signatures are parsed, not yet verified."""
    if len(data) > max_bytes:
        raise FormatError(f"{what} too large: limit {max_bytes} bytes, found {len(data)}")
    raw = strictjson.loads(data, f"{what} (a DSSE signature envelope)")
    doc = Fields(raw, f"{what} (a DSSE envelope with payloadType, payload and signatures)")
    doc.only(("payloadType", "payload", "signatures"))
    if doc.raw.get("payloadType") != payload_type:
        raise FormatError(f"{what}: expected payloadType {payload_type!r}, found {doc.raw.get('payloadType')!r}")
    items = doc.objects("signatures", limit=max_signatures)
    if "signatures" not in doc.raw:
        raise doc.refuse("signatures", "a list", None)
    signatures = tuple(_envelope_signature(item, what) for item in items)
    return Envelope(payload_type, _b64(doc.raw.get("payload"), f"{what} payload"), signatures)


def _envelope_signature(item: Fields, what: str) -> Signature:
    keyid = item.only(("keyid", "sig")).text("keyid")
    if not re.fullmatch(r"[0-9a-f]{64}", keyid):
        raise FormatError(f"{what}: key id must be 64 lowercase hex digits, found {keyid[:80]!r}")
    value = _b64(item.raw.get("sig"), f"{what} signature")
    if len(value) != 64:
        raise FormatError(f"{what}: an Ed25519 signature has 64 bytes, found {len(value)}")
    return Signature(keyid=keyid, value=value)


def _b64(value: object, what: str) -> bytes:
    if not isinstance(value, str):
        raise FormatError(f"{what}: expected base64 text, found {type(value).__name__}")
    try:
        decoded = base64.b64decode(value, validate=True)
    except ValueError as exc:  # binascii.Error, and ValueError for text that is not ASCII (found by fuzzing)
        raise FormatError(f"{what}: bad base64") from exc
    if base64.b64encode(decoded).decode() != value:
        raise FormatError(f"{what}: non-canonical base64")
    return decoded
