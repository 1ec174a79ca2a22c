"""Key files on disk: Ed25519 private keys (PKCS#8 PEM, mode 0600) and public keys (SPKI PEM)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from airgap.errors import KeyFileError
from airgap.trust.signing import TrustPolicy, generate_keypair, key_id, load_private_key, load_public_key

PASSPHRASE_ENV = "AIRGAP_KEY_PASSPHRASE"


@dataclass(frozen=True)
class KeyFiles:
    private: Path
    public: Path
    keyid: str


def write_keypair(stem: Path, passphrase: bytes | None, overwrite: bool = False) -> KeyFiles:
    """Write `<stem>.key` (0600 from the first byte) and `<stem>.pub`; never overwrite by accident."""
    private, public = stem.with_name(stem.name + ".key"), stem.with_name(stem.name + ".pub")
    for path in (private, public):
        if path.exists() and not overwrite:
            raise KeyFileError(f"{path} already exists; refusing to overwrite a key (use --force)")
    stem.parent.mkdir(parents=True, exist_ok=True)
    pair = generate_keypair(passphrase)
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
    fd = os.open(private, flags, 0o600)
    os.fchmod(fd, 0o600)  # an existing file keeps its mode through O_TRUNC: narrow it before the secret lands
    with os.fdopen(fd, "wb") as out:
        out.write(pair.private_pem)
    public.write_bytes(pair.public_pem)
    return KeyFiles(private, public, key_id(load_public_key(pair.public_pem, str(public))))


def read_private_key(path: Path, passphrase: bytes | None) -> Ed25519PrivateKey:
    return load_private_key(_read(path, "private key"), passphrase, str(path))


def read_public_key(path: Path) -> Ed25519PublicKey:
    return load_public_key(_read(path, "public key"), str(path))


def key_is_encrypted(path: Path) -> bool:
    return b"ENCRYPTED" in _read(path, "private key")[:64]


def trust_from_files(paths: list[Path], threshold: int = 1) -> TrustPolicy:
    if not paths:
        raise KeyFileError("no trusted key given: pass --trust PUBLIC_KEY.pub (the release key's public half)")
    return TrustPolicy(keys=tuple(read_public_key(p) for p in paths), threshold=threshold)


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError as exc:
        raise KeyFileError(f"{what} not found: {path}") from exc
    except OSError as exc:
        raise KeyFileError(f"cannot read {what} {path}: {exc.strerror}") from exc
