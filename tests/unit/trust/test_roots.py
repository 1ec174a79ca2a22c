"""Root files: strict parsing, self-signature, rotation by old *and* new keys, chain walking, by-hand check."""

from __future__ import annotations

import base64
import json
import re
import subprocess
from datetime import UTC, datetime
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from airgap.errors import FormatError, TrustError
from airgap.format.manifest import Limits
from airgap.trust.roots import (
    Role,
    check_chain,
    check_self_signed,
    check_successor,
    new_root,
    parse_root,
    root_member_path,
    root_member_version,
    walk_chain,
)
from airgap.trust.signing import Envelope, public_pem, sign_envelope
from tests.support import REPO

LATER = datetime(2040, 1, 1, tzinfo=UTC)


def keys(n: int) -> list[Ed25519PrivateKey]:
    return [Ed25519PrivateKey.generate() for _ in range(n)]


def root(version: int, root_keys: list[Ed25519PrivateKey], release: list[Ed25519PrivateKey], *,
         threshold: int = 1, signers: list[Ed25519PrivateKey] | None = None) -> bytes:
    made = new_root(version, LATER, Role(tuple(k.public_key() for k in root_keys), threshold),
                    Role(tuple(k.public_key() for k in release), 1))
    envelope = made.envelope
    for key in root_keys if signers is None else signers:
        envelope = sign_envelope(envelope, key)
    return envelope.to_bytes()


def edit_payload(data: bytes, change: object) -> bytes:
    envelope = json.loads(data)
    payload = json.loads(base64.b64decode(envelope["payload"]))
    change(payload)  # type: ignore[operator]
    return Envelope(envelope["payloadType"], json.dumps(payload).encode()).to_bytes()


def test_round_trip_and_self_signature() -> None:
    r, rel = keys(2), keys(3)
    parsed = parse_root(root(1, r, rel, threshold=2))
    assert parsed.version == 1 and parsed.expires == LATER
    assert parsed.root.threshold == 2 and len(parsed.release.keys) == 3
    check_self_signed(parsed)
    with pytest.raises(TrustError, match=r"signed by its own root keys.*from 2 trusted"):
        check_self_signed(parse_root(root(1, r, rel, threshold=2, signers=r[:1])))


def test_a_key_id_that_is_not_the_keys_hash_is_refused() -> None:
    """One key under two ids would count twice: ids are checked against keys."""
    r, rel = keys(1), keys(1)

    def alias(payload: dict[str, object]) -> None:
        keys_ = payload["keys"]
        assert isinstance(keys_, dict)
        keys_["f" * 64] = next(iter(keys_.values()))

    with pytest.raises(FormatError, match="does not match its key"):
        parse_root(edit_payload(root(1, r, rel), alias))


@pytest.mark.parametrize("change, message", [
    (lambda p: p["roles"]["release"].update(threshold=2),
     "root version 1 release role: threshold must be between 1 and its 1 distinct key(s), found 2"),
    (lambda p: p["roles"]["release"].update(threshold=0),
     "root version 1 release role: threshold must be between 1 and its 1 distinct key(s), found 0"),
    (lambda p: p["roles"]["release"].update(threshold=True),
     "invalid root version 1 roles.release: field 'threshold' must be an integer, found True"),
    (lambda p: p["roles"]["release"]["keyids"].append(p["roles"]["release"]["keyids"][0]),
     "root version 1 release role: a key is listed twice"),
    (lambda p: p["roles"]["release"]["keyids"].append("e" * 64),
     "root version 1 release role: names key eeeeeeeeeeeeeeee that the root does not define"),
    (lambda p: p["roles"].update(targets={}),
     "root version 1: expected roles ['root', 'release'], found ['release', 'root', 'targets']"),
    (lambda p: p.update(_type="airgap/manifest"), "root file: expected _type 'airgap/root', found 'airgap/manifest'"),
    (lambda p: p.update(version=0), "invalid root file payload: field 'version' must be a positive integer, found 0"),
    (lambda p: p.update(format=2), "root file: this airgap reads root format 1, found 2"),
    (lambda p: p.update(expires="soon"), "invalid root version 1 expiry: expected YYYY-MM-DDTHH:MM:SSZ, found 'soon'"),
    (lambda p: p.update(extra=1),
     "invalid root file payload: expected only the fields _type, expires, format, keys, roles, version, found 'extra'"),
])
def test_malformed_roots_are_refused(change: object, message: str) -> None:
    with pytest.raises(FormatError) as refused:
        parse_root(edit_payload(root(1, keys(1), keys(1)), change))
    assert str(refused.value) == message


def test_a_threshold_above_the_number_of_keys_cannot_be_made() -> None:
    key = Ed25519PrivateKey.generate().public_key()
    with pytest.raises(TrustError, match="between 1 and its 1 distinct"):
        new_root(1, LATER, Role((key, key), 2), Role((key,), 1))  # the same key twice is one key


def test_rotation_needs_old_and_new_root_keys() -> None:
    old, new, rel = keys(2), keys(2), keys(1)
    v1 = parse_root(root(1, old, rel, threshold=2))
    check_successor(v1, parse_root(root(2, new, rel, threshold=2, signers=[*old, *new])))
    with pytest.raises(TrustError, match="root keys of version 1"):
        check_successor(v1, parse_root(root(2, new, rel, threshold=2, signers=[old[0], *new])))
    with pytest.raises(TrustError, match="its own root keys"):
        check_successor(v1, parse_root(root(2, new, rel, threshold=2, signers=[*old, new[0]])))
    with pytest.raises(TrustError, match="one version at a time"):
        check_successor(v1, parse_root(root(3, new, rel, threshold=2, signers=[*old, *new])))


def test_walk_ignores_old_roots_and_refuses_gaps() -> None:
    r, rel = keys(1), keys(1)
    chain = {v: root(v, r, rel) for v in range(1, 5)}
    v2 = parse_root(chain[2])
    walked = walk_chain(v2, chain)
    assert [x.version for x in walked] == [3, 4]
    forged_old = root(1, keys(1), keys(1))  # another root 1: already passed, ignored
    assert walk_chain(v2, {1: forged_old}) == ()
    with pytest.raises(TrustError, match="carries root version 4 but not version 3"):
        walk_chain(v2, {4: chain[4]})


def test_walk_is_capped() -> None:
    r, rel = keys(1), keys(1)
    chain = {v: root(v, r, rel) for v in range(1, 6)}
    assert len(walk_chain(parse_root(chain[1]), {v: chain[v] for v in (2, 3, 4)}, Limits(max_root_chain=3))) == 3
    with pytest.raises(TrustError, match="carries 5 root files, limit 3"):
        walk_chain(parse_root(chain[1]), chain, Limits(max_root_chain=3))


def test_check_chain_for_the_build() -> None:
    r, rel = keys(1), keys(1)
    check_chain([parse_root(root(v, r, rel)) for v in (2, 1, 3)])
    with pytest.raises(TrustError, match="one version at a time"):
        check_chain([parse_root(root(v, r, rel)) for v in (1, 3)])


def root_recipe() -> str:
    """The by-hand root check, exactly as SECURITY.md gives it."""
    found = re.search(r"<!-- recipe:verify-root -->\n```sh\n(.*?)```", (REPO / "SECURITY.md").read_text(), re.S)
    assert found, "recipe verify-root not found in SECURITY.md"
    return found.group(1)


def test_member_paths() -> None:
    assert root_member_path(12) == "trust/root.12.json"
    assert root_member_version("trust/root.12.json") == 12
    assert root_member_version("trust/root.0.json") is None
    assert root_member_version("trust/root.1.json.zst") is None
    assert root_member_version("models/trust/root.1.json") is None


def test_the_documented_recipe_verifies_a_root_by_hand(tmp_path: Path) -> None:
    recipe = root_recipe()
    r, rel = keys(2), keys(2)
    pubs = []
    for index, key in enumerate(r):
        pub = tmp_path / f"root{index}.pub"
        pub.write_bytes(public_pem(key.public_key()))
        pubs.append(str(pub))
    good = tmp_path / "root.1.json"
    good.write_bytes(root(1, r, rel, threshold=2))

    def run(path: Path, work: str) -> subprocess.CompletedProcess[str]:
        env = {"PATH": "/usr/bin:/bin", "ROOT": str(path), "KEYS": " ".join(pubs), "WORK": str(tmp_path / work)}
        return subprocess.run(["bash", "-c", recipe], env=env, capture_output=True, text=True, check=False)

    result = run(good, "ok")
    assert result.returncode == 0, result.stderr
    assert (result.stdout + result.stderr).count("Signature Verified Successfully") == 2
    assert '"threshold":2' in result.stdout
    released = sorted(p.name for p in (tmp_path / "ok").glob("release-*.pub"))
    assert len(released) == 2
    assert (tmp_path / "ok" / released[0]).read_text().startswith("-----BEGIN PUBLIC KEY-----")

    tampered = tmp_path / "tampered.json"
    envelope = json.loads(good.read_bytes())
    envelope["payload"] = base64.b64encode(
        base64.b64decode(envelope["payload"]).replace(b'"threshold": 2', b'"threshold": 1')).decode()
    tampered.write_text(json.dumps(envelope))
    assert run(tampered, "bad").returncode != 0


def test_duplicate_keys_and_deep_nesting_are_refused_in_root_files() -> None:
    first = keys(1)
    data = root(1, first, first)
    envelope = json.loads(data)
    payload = base64.b64decode(envelope["payload"])
    twice = Envelope(envelope["payloadType"], payload.replace(b'"version": 1', b'"version": 1,\n "version": 2', 1))
    with pytest.raises(FormatError, match="root file payload is not valid JSON for airgap: key 'version' appears"):
        parse_root(twice.to_bytes())
    with pytest.raises(FormatError, match=r"root file \(a DSSE signature envelope\) is not valid JSON for airgap: key"):
        parse_root(data.replace(b'"payloadType"', b'"payloadType": "x",\n "payloadType"', 1))
    with pytest.raises(FormatError, match="nested 100000 levels deep"):
        parse_root(b"[" * 100_000 + b"]" * 100_000)
    with pytest.raises(FormatError, match="root file signature: non-canonical base64"):
        sig = envelope["signatures"][0]["sig"]
        alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
        other = sig[:-3] + alphabet[alphabet.index(sig[-3]) ^ 1] + "=="
        parse_root(data.replace(sig.encode(), other.encode(), 1))
    with pytest.raises(FormatError, match="bad base64"):  # found by fuzzing: text that is not ASCII
        parse_root(data.replace(envelope["payload"][:8].encode(), "\u00e9".encode() * 4, 1))
