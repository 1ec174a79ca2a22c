"""Root metadata: which keys may sign releases, how many must, and how that changes. Pure: no I/O.

A root file is a DSSE envelope (see airgap.trust.signing) whose payload is JSON:

    {"_type": "airgap/root", "format": 1, "version": N, "expires": "YYYY-MM-DDTHH:MM:SSZ",
     "keys": {"<keyid>": {"keytype": "ed25519", "public": "<SPKI PEM>"}},
     "roles": {"root": {"keyids": [...], "threshold": k}, "release": {"keyids": [...], "threshold": m}}}

The root role signs root files; the release role signs bundle manifests. As in TUF, root N+1 is
trusted only when a threshold of root N's root keys *and* a threshold of its own root keys signed it,
so a host that trusts N walks to N+1, N+2, ... one step at a time. A key id is the SHA-256 of the raw
public key and is checked against the key: two ids can never name one key, and thresholds count
distinct public keys.
"""

from __future__ import annotations

import itertools
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from airgap.errors import FormatError, KeyFileError, SignatureError, TrustError
from airgap.format import strictjson
from airgap.format.fields import Fields
from airgap.format.manifest import DEFAULT_LIMITS, Limits, format_time, parse_time
from airgap.trust.signing import (
    Envelope,
    TrustPolicy,
    key_id,
    load_public_key,
    parse_envelope,
    public_pem,
    raw_public_bytes,
    require_threshold,
)

ROOT_PAYLOAD_TYPE = "application/vnd.airgap.root+json"
ROOT_TYPE = "airgap/root"
ROOT_FORMAT = 1
DEFAULT_ROOT_EXPIRES_DAYS = 1095  # roots change rarely and by hand: three years
ROLE_NAMES = ("root", "release")
ROOTS_FOLDER = "trust"
_MEMBER_RE = re.compile(r"trust/root\.([1-9][0-9]{0,8})\.json")


@dataclass(frozen=True)
class Role:
    """Keys allowed to sign for a role, and how many distinct ones must."""

    keys: tuple[Ed25519PublicKey, ...]
    threshold: int

    @property
    def keyids(self) -> tuple[str, ...]:
        return tuple(sorted(key_id(k) for k in self.keys))


@dataclass(frozen=True)
class Root:
    """A parsed root file. Parsing checks the format only; trust comes from check_* and walk_chain."""

    version: int
    expires: datetime
    root: Role
    release: Role
    envelope: Envelope

    @property
    def release_policy(self) -> TrustPolicy:
        return TrustPolicy(keys=self.release.keys, threshold=self.release.threshold)

    def to_bytes(self) -> bytes:
        return self.envelope.to_bytes()


def root_member_path(version: int) -> str:
    """Where a bundle carries root version N: a meta file listed in its manifest."""
    return f"{ROOTS_FOLDER}/root.{version}.json"


def root_member_version(path: str) -> int | None:
    match = _MEMBER_RE.fullmatch(path)
    return int(match.group(1)) if match else None


# ---------------------------------------------------------------- making roots

def new_root(version: int, expires: datetime, root: Role, release: Role) -> Root:
    """An unsigned root; sign it with airgap.trust.signing.sign_envelope, once per root key."""
    for name, role in (("root", root), ("release", release)):
        _check_role_size(name, len({raw_public_bytes(k) for k in role.keys}), role.threshold)
    if version < 1:
        raise TrustError(f"root version must be at least 1, found {version}")
    keys = {key_id(k): {"keytype": "ed25519", "public": public_pem(k).decode()} for k in (*root.keys, *release.keys)}
    payload = {
        "_type": ROOT_TYPE, "format": ROOT_FORMAT, "version": version, "expires": format_time(expires),
        "keys": keys,
        "roles": {name: {"keyids": list(role.keyids), "threshold": role.threshold}
                  for name, role in (("root", root), ("release", release))},
    }
    data = (json.dumps(payload, indent=1, sort_keys=True) + "\n").encode()
    return parse_root(Envelope(ROOT_PAYLOAD_TYPE, data).to_bytes())


def with_envelope(root: Root, envelope: Envelope) -> Root:
    if envelope.payload != root.envelope.payload:
        raise TrustError(f"root version {root.version}: a co-signature must not change the payload")
    return Root(root.version, root.expires, root.root, root.release, envelope)


# ---------------------------------------------------------------- parsing

def parse_root(data: bytes, limits: Limits = DEFAULT_LIMITS, what: str = "root file") -> Root:
    """Parse a root envelope and its payload, strictly; signatures are checked elsewhere."""
    envelope = parse_envelope(data, ROOT_PAYLOAD_TYPE, limits.max_metadata_bytes, limits.max_signatures, what)
    doc = Fields(strictjson.loads(envelope.payload, f"{what} payload"), f"{what} payload")
    if doc.raw.get("_type") != ROOT_TYPE:
        raise FormatError(f"{what}: expected _type {ROOT_TYPE!r}, found {doc.raw.get('_type')!r}")
    if doc.raw.get("format") != ROOT_FORMAT:
        raise FormatError(f"{what}: this airgap reads root format {ROOT_FORMAT}, found {doc.raw.get('format')!r}")
    version = doc.positive("version")
    if version >= 10**9:
        raise FormatError(f"{what}: version must be below 1000000000, found {version}")
    what = f"root version {version}"
    doc.only(("_type", "format", "version", "expires", "keys", "roles"))
    keys = _parse_keys(Fields(doc.raw.get("keys"), f"{what} keys"), limits, what)
    roles = Fields(doc.raw.get("roles"), f"{what} roles")
    if sorted(roles.raw) != sorted(ROLE_NAMES):
        raise FormatError(f"{what}: expected roles {list(ROLE_NAMES)}, found {sorted(roles.raw)!r}")
    return Root(
        version=version, expires=parse_time(doc.text("expires"), f"{what} expiry"),
        root=_parse_role(roles.sub("root"), keys, limits, f"{what} root role"),
        release=_parse_role(roles.sub("release"), keys, limits, f"{what} release role"),
        envelope=envelope,
    )


def _parse_keys(doc: Fields, limits: Limits, what: str) -> dict[str, Ed25519PublicKey]:
    if not doc.raw:
        raise FormatError(f"{what}: expected at least one key in 'keys', found none")
    if len(doc.raw) > limits.max_signatures:
        raise FormatError(f"{what}: limit {limits.max_signatures} keys, found {len(doc.raw)}")
    keys: dict[str, Ed25519PublicKey] = {}
    for keyid in doc.raw:
        entry = doc.sub(keyid).only(("keytype", "public"))
        if entry.text("keytype") != "ed25519":
            raise FormatError(f"{what}: key {keyid[:16]} must be of keytype 'ed25519', "
                              f"found {entry.text('keytype')[:80]!r}")
        try:
            key = load_public_key(entry.text("public").encode(), f"{what} key {keyid[:16]}")
        except KeyFileError as exc:
            raise FormatError(exc.message) from exc
        if key_id(key) != keyid:
            # an id is a hash of the key: an id that is not would let one key pass as two
            raise FormatError(f"{what}: key id {keyid[:16]} does not match its key (SHA-256 {key_id(key)[:16]})")
        keys[keyid] = key
    return keys


def _parse_role(doc: Fields, keys: Mapping[str, Ed25519PublicKey], limits: Limits, what: str) -> Role:
    doc.only(("keyids", "threshold"))
    keyids = doc.texts("keyids", limit=limits.max_signatures)
    if len(set(keyids)) != len(keyids):
        raise FormatError(f"{what}: a key is listed twice")
    unknown = [k for k in keyids if k not in keys]
    if unknown:
        raise FormatError(f"{what}: names key {unknown[0][:16]} that the root does not define")
    threshold = doc.num("threshold")
    try:
        _check_role_size(what, len(keyids), threshold)
    except TrustError as exc:
        raise FormatError(exc.message) from exc
    return Role(keys=tuple(keys[k] for k in keyids), threshold=threshold)


def _check_role_size(what: str, distinct_keys: int, threshold: int) -> None:
    if not 1 <= threshold <= distinct_keys:
        raise TrustError(f"{what}: threshold must be between 1 and its {distinct_keys} distinct key(s), "
                         f"found {threshold}")


# ---------------------------------------------------------------- trusting roots

def _require(root: Root, signer: Role, what: str) -> None:
    try:
        require_threshold(root.envelope.signed_bytes, root.envelope.signatures, signer.keys, signer.threshold, what)
    except SignatureError as exc:
        raise TrustError(exc.message) from exc


def check_self_signed(root: Root) -> None:
    """A first root, pinned out of band, must still be signed by a threshold of its own root keys."""
    _require(root, root.root, f"root version {root.version} (signed by its own root keys)")


def check_successor(trusted: Root, candidate: Root) -> None:
    """Root N+1 needs a threshold of N's root keys (so N consents) and of its own (so N+1 is complete)."""
    if candidate.version != trusted.version + 1:
        raise TrustError(f"root rotation must go one version at a time: trusted version {trusted.version}, "
                         f"found version {candidate.version}")
    _require(candidate, trusted.root, f"root version {candidate.version} (signed by the root keys of version "
                                      f"{trusted.version})")
    _require(candidate, candidate.root, f"root version {candidate.version} (signed by its own root keys)")


def walk_chain(trusted: Root, candidates: Mapping[int, bytes], limits: Limits = DEFAULT_LIMITS) -> tuple[Root, ...]:
    """The roots after `trusted` that `candidates` (version -> root file bytes) chain to, in order.

    Versions up to the trusted one are ignored: an old root replayed changes nothing. A gap or a
    version beyond the cap is refused, so a bundle cannot make the host skip a rotation.
    """
    if len(candidates) > limits.max_root_chain:  # each step takes one candidate: this caps the steps too
        raise TrustError(f"bundle carries {len(candidates)} root files, limit {limits.max_root_chain}")
    walked: list[Root] = []
    current = trusted
    while current.version + 1 in candidates:
        candidate = parse_root(candidates[current.version + 1], limits, f"root file {current.version + 1}")
        check_successor(current, candidate)
        walked.append(candidate)
        current = candidate
    beyond = sorted(v for v in candidates if v > current.version)
    if beyond:
        raise TrustError(f"root chain broken: the bundle carries root version {beyond[0]} but not version "
                         f"{current.version + 1}, which this host (trusting version {trusted.version}) needs first")
    return tuple(walked)


def check_chain(roots: Sequence[Root]) -> None:
    """Build side: the roots a bundle will carry must form one unbroken, correctly signed chain."""
    if not roots:
        return
    ordered = sorted(roots, key=lambda r: r.version)
    check_self_signed(ordered[0])
    for previous, following in itertools.pairwise(ordered):
        check_successor(previous, following)
