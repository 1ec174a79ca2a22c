"""A leaked release key must not own the host: hostile bundles, signed for real, through the real CLI.

Each bundle here is written by airgap's own writer (tests.support.make_test_bundle) and signed with a
valid key, as a leaked-key attacker would; each refusal is one line and leaves the host as it was.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from airgap.bundle.drops import create_root
from airgap.prefix.install import recover
from airgap.prefix.state import load_state
from airgap.trust.keyfiles import read_private_key
from tests.conftest import Built, KeyPair
from tests.support import REPO, Result, airgap, assert_refused, make_test_bundle, write_wheel

GGUF = b"GGUF" + bytes(range(256)) * 8
NOW = datetime.now(UTC).replace(microsecond=0)


def bundle(folder: Path, keys: KeyPair, files: dict[str, bytes], **options: object) -> Path:
    key = read_private_key(keys.private, None)
    return make_test_bundle(folder, files, key, expires_days=30, created=options.pop("created", NOW),
                            **options)  # type: ignore[arg-type]


def wheel_bytes(folder: Path, name: str, files: dict[str, bytes], entry_points: str = "") -> tuple[str, bytes]:
    path = write_wheel(folder, name, "1.0", files, entry_points=entry_points)
    return f"wheels/{path.name}", path.read_bytes()


def install(bundle_path: Path, keys: KeyPair, prefix: Path, *extra: str) -> Result:
    return airgap("install", bundle_path, "--trust", keys.public, "--prefix", prefix, "-q", *extra)


@pytest.fixture
def host(tmp_path: Path, keys: KeyPair) -> Path:
    prefix = tmp_path / "prefix"
    good = bundle(tmp_path / "good", keys, {"models/m/w.gguf": GGUF}, name="b", version="1.0")
    assert install(good, keys, prefix).code == 0
    return prefix


def tree(prefix: Path) -> list[str]:
    return sorted(str(p.relative_to(prefix)) for p in prefix.rglob("*") if p.name != ".lock")


def test_a_meta_file_under_venv_never_lands_in_the_virtualenv(host: Path, tmp_path: Path, keys: KeyPair) -> None:
    before = tree(host)
    hostile = bundle(tmp_path / "h", keys, {"models/m/w.gguf": GGUF, "venv/lib/python3.11/site-packages/x.pth":
                                            b"import os; os.system('touch /tmp/owned')\n"}, version="2.0")
    assert_refused(install(hostile, keys, host), "venv/lib/python3.11/site-packages/x.pth: a meta file may not lie "
                                                 "in 'venv', which belongs to airgap")
    assert_refused(airgap("verify", hostile, "--trust", keys.public), "may not lie in 'venv'")
    assert tree(host) == before


def test_an_sdist_is_never_built(host: Path, tmp_path: Path, keys: KeyPair) -> None:
    hostile = bundle(tmp_path / "h", keys, {"wheels/x-1.0.tar.gz": b"setup.py runs as root"}, version="2.0",
                     kinds={"wheels/x-1.0.tar.gz": "sdist"})
    assert_refused(install(hostile, keys, host), "a source distribution; install takes binary wheels only")
    as_wheel = bundle(tmp_path / "w", keys, {"wheels/x-1.0.tar.gz": b"setup.py"}, version="2.1",
                      kinds={"wheels/x-1.0.tar.gz": "wheel"}, packages=(("x", "1.0", "wheels/x-1.0.tar.gz"),))
    assert_refused(install(as_wheel, keys, host), "'x-1.0.tar.gz' is not a wheel file name (PEP 427")


def test_wheels_that_would_replace_the_venvs_python_or_pip_are_refused(host: Path, tmp_path: Path,
                                                                       keys: KeyPair) -> None:
    before = tree(host)
    script = wheel_bytes(tmp_path / "w1", "x", {"x.py": b""}, "[console_scripts]\npython3 = x:main\n")
    assert_refused(install(bundle(tmp_path / "b1", keys, dict([script]), version="2.0"), keys, host),
                   "refused script 'python3'")
    pip = wheel_bytes(tmp_path / "w2", "pip", {"pip/__init__.py": b""})
    assert_refused(install(bundle(tmp_path / "b2", keys, dict([pip]), version="2.0"), keys, host),
                   "python package 'pip' refused")
    injected = wheel_bytes(tmp_path / "w3", "x", {"x.py": b""})
    hostile = bundle(tmp_path / "b3", keys, dict([injected]), version="2.0",
                     packages=(("x\n-r /etc/hostname\n", "1.0", injected[0]),))
    assert_refused(install(hostile, keys, host), "invalid python package name")
    assert tree(host) == before


def test_inspect_shows_pth_files_and_scripts_and_install_runs_none_of_them(host: Path, tmp_path: Path,
                                                                           keys: KeyPair) -> None:
    marker = tmp_path / "ran"
    pth = wheel_bytes(tmp_path / "w", "hooks", {"hooks.py": b"", "zz-hooks.pth": f"import os; open({str(marker)!r}, "
                                                                                 f"'w')\n".encode()},
                      "[console_scripts]\nhooks-cli = hooks:main\n")
    signed = bundle(tmp_path / "b", keys, {"models/m/w.gguf": GGUF, pth[0]: pth[1]}, version="2.0")
    shown = airgap("inspect", signed)
    assert f"wheel {pth[0]}: .pth run at every start of the venv's Python: zz-hooks.pth" in shown.stdout
    assert f"wheel {pth[0]}: scripts hooks-cli" in shown.stdout
    listed = json.loads(airgap("inspect", signed, "--json").stdout)["wheels"]
    assert listed == [{"path": pth[0], "pth_files": ["zz-hooks.pth"], "scripts": ["hooks-cli"], "problem": None}]
    assert install(signed, keys, host).code == 0
    assert not marker.exists()  # nothing of the wheel ran during install (no pip, no python start in the venv)
    assert not list((host / "current" / "venv").rglob("pip"))


def test_store_blobs_are_never_written_through_a_link_and_reuse_checks_size(host: Path, tmp_path: Path,
                                                                            keys: KeyPair) -> None:
    model_sha = hashlib.sha256(GGUF).hexdigest()
    blob = host / "store" / "sha256" / model_sha
    # the old attack: a meta file `manifest.json` sharing the model's hash, so the version's manifest.json
    # became a link to the model's blob and was written through it
    hostile = bundle(tmp_path / "h", keys, {"models/m/w.gguf": GGUF, "manifest.json": GGUF}, version="2.0")
    assert_refused(install(hostile, keys, host), "manifest.json: a meta file may not lie in 'manifest.json'")
    assert blob.read_bytes() == GGUF
    manifest = host / "current" / "manifest.json"
    assert not manifest.is_symlink() and manifest.stat().st_nlink == 1

    checked = json.loads(airgap("verify", "--installed", "--prefix", host, "--json").stdout)
    assert checked["ok"] and checked["blobs"] == 1 and checked["bytes"] == len(GGUF)
    os.chmod(blob, 0o644)
    blob.write_bytes(GGUF[:-1] + b"!")  # same size, other bytes: only re-hashing finds it
    result = airgap("verify", "--installed", "--prefix", host, "--json")
    assert result.code == 1 and "store blob" in result.error_line and "changed" in result.error_line
    assert json.loads(result.stdout)["problems"][0].startswith(f"store blob {model_sha} (models/m/w.gguf) changed")
    blob.write_bytes(b"{}")  # another size: the next install that carries it does not reuse it
    newer = bundle(tmp_path / "n", keys, {"models/m/w.gguf": GGUF}, version="3.0")
    assert install(newer, keys, host).code == 0
    assert blob.read_bytes() == GGUF and airgap("verify", "--installed", "--prefix", host).code == 0


def test_a_planted_staging_symlink_is_refused_and_recover_removes_it(host: Path, tmp_path: Path,
                                                                     keys: KeyPair) -> None:
    attacker = tmp_path / "attacker"
    attacker.mkdir()
    (host / "staging").symlink_to(attacker)
    newer = bundle(tmp_path / "n", keys, {"models/m/w.gguf": GGUF + b"2"}, version="2.0")
    assert_refused(install(newer, keys, host), f"{host}/staging is a symlink airgap did not make (to {attacker})")
    recover(host, load_state(host))
    assert not (host / "staging").exists() and attacker.is_dir() and not list(attacker.iterdir())
    assert install(newer, keys, host).code == 0 and not list(attacker.iterdir())


def test_a_group_writable_prefix_is_refused_with_its_mode(host: Path, tmp_path: Path, keys: KeyPair) -> None:
    host.chmod(0o775)
    newer = bundle(tmp_path / "n", keys, {"models/m/w.gguf": GGUF}, version="2.0")
    assert_refused(install(newer, keys, host), f"unsafe prefix: {host} is writable by group (mode drwxrwxr-x)")
    assert_refused(airgap("rollback", "--prefix", host), "unsafe prefix")


def test_a_dangling_prefix_symlink_is_one_line(tmp_path: Path, keys: KeyPair) -> None:
    link = tmp_path / "prefix"
    link.symlink_to(tmp_path / "missing")
    good = bundle(tmp_path / "g", keys, {"models/m/w.gguf": GGUF})
    assert_refused(install(good, keys, link), f"prefix {link} is a symlink to {tmp_path}/missing, which does not")


def test_a_drop_for_another_bundle_name_is_refused(host: Path, tmp_path: Path, keys: KeyPair) -> None:
    from dataclasses import replace

    from airgap.bundle.container import read_head_from_path, write_bundle
    from airgap.format.manifest import BaseRef
    from airgap.trust.signing import sign

    installed = load_state(host).generations[0]
    model = read_head_from_path(next((tmp_path / "good").glob("*.airgap"))).manifest.files[0]
    draft = replace(read_head_from_path(next((tmp_path / "good").glob("*.airgap"))).manifest, name="other",
                    version="2.0", files=(), base=BaseRef("b", "1.0", installed.manifest_sha256))
    drop = tmp_path / "drop.airgap"
    key = read_private_key(keys.private, None)
    write_bundle(drop, draft, [], lambda data: [sign(data, key)],
                 absent=[replace(model, storage="absent", stored_size=0)])
    assert_refused(install(drop, keys, host), "update drop other 2.0 names a base of another bundle, b 1.0")


def test_a_far_future_creation_time_and_the_recorded_way_back(tmp_path: Path, keys: KeyPair) -> None:
    prefix = tmp_path / "prefix"
    future = bundle(tmp_path / "f", keys, {"models/m/w.gguf": GGUF}, created=datetime(2099, 1, 1, tzinfo=UTC))
    assert_refused(install(future, keys, prefix), "claims it was created at 2099-01-01T00:00:00Z, more than 1 day "
                                                  "ahead of this host's clock")
    assert install(future, keys, prefix, "--allow-future-created").code == 0
    assert load_state(prefix).generations[0].overrides == ("allow-future-created",)

    key = read_private_key(keys.private, None)
    root = create_root(1, [key.public_key()], 1, [key.public_key()], 1, NOW + timedelta(days=365), [key])
    root_file = tmp_path / "root.1.json"
    root_file.write_bytes(root.to_bytes())
    assert_refused(airgap("trust", "init", root_file, "--prefix", prefix, "--force"), "expired")
    assert_refused(airgap("trust", "init", root_file, "--prefix", prefix, "--reset-time-floor"), "with --force")
    result = airgap("trust", "init", root_file, "--prefix", prefix, "--force", "--reset-time-floor")
    assert result.code == 0, result.stderr
    status = json.loads(airgap("status", "--prefix", prefix, "--json").stdout)
    assert [r["previous_floor"] for r in status["time_floor_resets"]] == ["2099-01-01T00:00:00Z"]
    assert "trusted-time floor reset at " in airgap("status", "--prefix", prefix).stdout


def test_disk_full_while_building_the_venv_names_the_path_and_free_space(built: Built, tmp_path: Path) -> None:
    """versions/ is a tiny file system (private mount namespace): the payload fits, the new venv does not."""
    prefix = tmp_path / "prefix"
    script = (f'mkdir -p "{prefix}/versions" && mount -t tmpfs -o size=3m,mode=0755 tmpfs "{prefix}/versions" '
              f'&& exec "$@"')
    command = ["unshare", "-m", "sh", "-c", script, "sh", sys.executable, "-m", "airgap", "install",
               str(built.bundle), "--trust", str(built.keys.public), "--prefix", str(prefix), "-q"]
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)},
                          check=False)
    if "unshare" in done.stderr and "Operation not permitted" in done.stderr:
        pytest.skip("no mount namespace here")
    assert_refused(Result(done.returncode, done.stdout, done.stderr), f"disk full under {prefix} while writing",
                   "MiB free now); nothing was changed")
    assert not (prefix / "current").exists()
