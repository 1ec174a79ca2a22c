"""Key files on disk: Ed25519 only, 0600 private keys, passphrases, and one-line messages for every wrong file."""

from __future__ import annotations

import os
import re
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from airgap.bundle.container import read_head_from_path
from airgap.cli import main
from airgap.errors import KeyFileError
from airgap.trust.keyfiles import (
    PASSPHRASE_ENV,
    key_is_encrypted,
    read_private_key,
    read_public_key,
    trust_from_files,
    write_keypair,
)
from airgap.trust.signing import key_id, sign
from tests.support import REPO, make_test_bundle


@pytest.fixture
def open_umask() -> Iterator[None]:
    """The most permissive umask: the private key's mode must come from airgap, not from the umask."""
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_keygen_round_trip(tmp_path: Path, open_umask: None) -> None:
    files = write_keypair(tmp_path / "keys" / "release", None)
    assert (files.private, files.public) == (tmp_path / "keys" / "release.key", tmp_path / "keys" / "release.pub")
    private, public = read_private_key(files.private, None), read_public_key(files.public)
    assert key_id(private.public_key()) == key_id(public) == files.keyid
    public.verify(sign(b"manifest", private).value, b"manifest")
    assert not key_is_encrypted(files.private)
    assert files.private.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----\n")
    assert files.public.read_bytes().startswith(b"-----BEGIN PUBLIC KEY-----\n")
    assert mode(files.private) == 0o600


def test_encrypted_key_round_trip(tmp_path: Path) -> None:
    files = write_keypair(tmp_path / "release", b"correct horse")
    assert key_is_encrypted(files.private)
    assert b"-----BEGIN ENCRYPTED PRIVATE KEY-----" in files.private.read_bytes()
    assert key_id(read_private_key(files.private, b"correct horse").public_key()) == files.keyid


def test_encrypted_key_without_passphrase(tmp_path: Path) -> None:
    files = write_keypair(tmp_path / "release", b"correct horse")
    with pytest.raises(KeyFileError, match=rf"^{re.escape(str(files.private))}: the key is encrypted; "
                                           rf"set AIRGAP_KEY_PASSPHRASE or enter it$"):
        read_private_key(files.private, None)


def test_wrong_passphrase(tmp_path: Path) -> None:
    files = write_keypair(tmp_path / "release", b"correct horse")
    with pytest.raises(KeyFileError, match=rf"^{re.escape(str(files.private))}: expected an Ed25519 PKCS#8 PEM "
                                           rf"private key \(or wrong passphrase\)$"):
        read_private_key(files.private, b"battery staple")


def test_passphrase_for_a_plain_key(tmp_path: Path) -> None:
    files = write_keypair(tmp_path / "release", None)
    with pytest.raises(KeyFileError, match=rf"^{re.escape(str(files.private))}: the key is not encrypted but a "
                                           rf"passphrase was given$"):
        read_private_key(files.private, b"correct horse")


def test_public_key_where_a_private_key_is_expected(tmp_path: Path) -> None:
    files = write_keypair(tmp_path / "release", None)
    with pytest.raises(KeyFileError, match=rf"^{re.escape(str(files.public))}: expected an Ed25519 PKCS#8 PEM "
                                           rf"private key \(or wrong passphrase\)$"):
        read_private_key(files.public, None)


def test_private_key_where_a_public_key_is_expected(tmp_path: Path) -> None:
    files = write_keypair(tmp_path / "release", None)
    with pytest.raises(KeyFileError, match=rf"^{re.escape(str(files.private))}: expected an Ed25519 public key "
                                           rf"in PEM \(SubjectPublicKeyInfo\)$"):
        read_public_key(files.private)


def test_rsa_private_key_refused(tmp_path: Path) -> None:
    path = tmp_path / "rsa.key"
    path.write_bytes(rsa.generate_private_key(public_exponent=65537, key_size=1024).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    with pytest.raises(KeyFileError, match=rf"^{re.escape(str(path))}: expected an Ed25519 private key, "
                                           rf"found RSAPrivateKey$"):
        read_private_key(path, None)


def test_ec_public_key_refused(tmp_path: Path) -> None:
    path = tmp_path / "ec.pub"
    path.write_bytes(ec.generate_private_key(ec.SECP256R1()).public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    with pytest.raises(KeyFileError, match=rf"^{re.escape(str(path))}: expected an Ed25519 public key, "
                                           rf"found ECPublicKey$"):
        read_public_key(path)
    with pytest.raises(KeyFileError, match=rf"^{re.escape(str(path))}: expected an Ed25519 public key, "
                                           rf"found ECPublicKey$"):
        trust_from_files([path])


def test_missing_key_files(tmp_path: Path) -> None:
    with pytest.raises(KeyFileError, match=rf"^private key not found: {re.escape(str(tmp_path / 'a.key'))}$"):
        read_private_key(tmp_path / "a.key", None)
    with pytest.raises(KeyFileError, match=rf"^public key not found: {re.escape(str(tmp_path / 'a.pub'))}$"):
        read_public_key(tmp_path / "a.pub")
    with pytest.raises(KeyFileError, match=rf"^private key not found: {re.escape(str(tmp_path / 'a.key'))}$"):
        key_is_encrypted(tmp_path / "a.key")


def test_unreadable_key_files(tmp_path: Path) -> None:
    # a folder where the key should be: unreadable even for root, which ignores mode bits
    (tmp_path / "a.key").mkdir()
    (tmp_path / "a.pub").mkdir()
    with pytest.raises(KeyFileError, match=rf"^cannot read private key {re.escape(str(tmp_path / 'a.key'))}: "
                                           rf"Is a directory$"):
        read_private_key(tmp_path / "a.key", None)
    with pytest.raises(KeyFileError, match=rf"^cannot read public key {re.escape(str(tmp_path / 'a.pub'))}: "
                                           rf"Is a directory$"):
        read_public_key(tmp_path / "a.pub")


def test_never_overwrites_a_key_by_accident(tmp_path: Path) -> None:
    first = write_keypair(tmp_path / "release", None)
    before = first.private.read_bytes()
    with pytest.raises(KeyFileError, match=rf"^{re.escape(str(first.private))} already exists; refusing to "
                                           rf"overwrite a key \(use --force\)$"):
        write_keypair(tmp_path / "release", None)
    assert first.private.read_bytes() == before
    first.private.unlink()  # only the public half left: still refused, the private half is not written alone
    with pytest.raises(KeyFileError, match=rf"^{re.escape(str(first.public))} already exists; refusing to "
                                           rf"overwrite a key \(use --force\)$"):
        write_keypair(tmp_path / "release", None)
    assert not first.private.exists()
    second = write_keypair(tmp_path / "release", None, overwrite=True)
    assert second.keyid != first.keyid and read_public_key(second.public) is not None


def test_overwritten_key_is_private_before_its_first_byte(tmp_path: Path) -> None:
    """Overwriting a world-readable file: a write that fails half-way (disk full) leaves no readable secret.

    The file size limit makes the write fail after 64 bytes, which already hold key material.
    """
    stem = tmp_path / "release"
    private = tmp_path / "release.key"
    private.write_bytes(b"old")
    private.chmod(0o644)
    script = ("import resource, signal, sys\nfrom pathlib import Path\n"
              "from airgap.trust.keyfiles import write_keypair\n"
              "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
              "resource.setrlimit(resource.RLIMIT_FSIZE, (64, 64))\n"
              "try:\n    write_keypair(Path(sys.argv[1]), None, overwrite=True)\n"
              "except OSError as exc:\n    print(exc.errno)\n")
    done = subprocess.run([sys.executable, "-c", script, str(stem)], capture_output=True, text=True, check=False,
                          cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "27"  # EFBIG: the write did fail half-way
    assert private.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----\n")
    assert mode(private) == 0o600


def test_trust_from_files(tmp_path: Path) -> None:
    a, b = write_keypair(tmp_path / "a", None), write_keypair(tmp_path / "b", None)
    policy = trust_from_files([a.public, b.public], threshold=2)
    assert policy.threshold == 2 and sorted(key_id(k) for k in policy.keys) == sorted([a.keyid, b.keyid])
    with pytest.raises(KeyFileError, match=r"^no trusted key given: pass --trust PUBLIC_KEY\.pub \(the release "
                                           r"key's public half\)$"):
        trust_from_files([])


# ---------------------------------------------------------------- the passphrase through the CLI

def test_passphrase_from_the_environment(tmp_path: Path) -> None:
    """keygen encrypts with AIRGAP_KEY_PASSPHRASE; sign reads the key with it; a wrong one is refused."""
    runner = CliRunner()
    result = runner.invoke(main, ["keygen", str(tmp_path / "cosigner")], env={PASSPHRASE_ENV: "correct horse"})
    assert result.exit_code == 0, result.output
    key = tmp_path / "cosigner.key"
    assert key_is_encrypted(key)
    cosigner = read_private_key(key, b"correct horse")

    bundle = make_test_bundle(tmp_path / "b", {"notes.txt": b"hello"}, Ed25519PrivateKey.generate())
    wrong = runner.invoke(main, ["sign", str(bundle), "--key", str(key)], env={PASSPHRASE_ENV: "battery staple"})
    assert wrong.exit_code == 1
    assert wrong.output == (f"airgap: error: {key}: expected an Ed25519 PKCS#8 PEM private key "
                            f"(or wrong passphrase)\n")
    assert key_id(cosigner.public_key()) not in {s.keyid for s in read_head_from_path(bundle).signatures}

    right = runner.invoke(main, ["sign", str(bundle), "--key", str(key)], env={PASSPHRASE_ENV: "correct horse"})
    assert right.exit_code == 0, right.output
    assert key_id(cosigner.public_key()) in {s.keyid for s in read_head_from_path(bundle).signatures}


def test_passphrase_needed_but_no_terminal(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["keygen", str(tmp_path / "k")], env={PASSPHRASE_ENV: ""})
    assert result.exit_code == 1
    assert result.output == ("airgap: error: a passphrase is needed: set AIRGAP_KEY_PASSPHRASE "
                             "(no terminal to prompt on)\n")
    assert not (tmp_path / "k.key").exists()
