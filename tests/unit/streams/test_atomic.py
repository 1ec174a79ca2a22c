"""Writes never go through a planted link; a prefix others could change is refused (StrictModes)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from airgap.errors import UnsafePathError
from airgap.streams.atomic import check_private_path, write_atomic

NAMES = ("state.json", "staging", "store")


def test_write_atomic_never_follows_a_planted_tmp_symlink(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    (tmp_path / ".state.json.tmp").symlink_to(victim)
    write_atomic(tmp_path / "state.json", b"{}")
    assert victim.read_bytes() == b"precious"
    assert (tmp_path / "state.json").read_bytes() == b"{}" and not (tmp_path / ".state.json.tmp").exists()


def test_a_private_prefix_under_a_sticky_folder_passes(tmp_path: Path) -> None:
    sticky = tmp_path / "shared"
    sticky.mkdir()
    sticky.chmod(0o1777)
    (sticky / "prefix").mkdir(mode=0o755)
    check_private_path(sticky / "prefix", NAMES, os.geteuid())
    check_private_path(sticky / "not-yet", NAMES, os.geteuid())


@pytest.mark.parametrize("mode", [0o775, 0o757, 0o1775])
def test_a_prefix_writable_by_others_is_refused(tmp_path: Path, mode: int) -> None:
    prefix = tmp_path / "prefix"
    prefix.mkdir()
    prefix.chmod(mode)
    with pytest.raises(UnsafePathError, match=f"unsafe prefix: {prefix} is writable by .* run `chmod go-w {prefix}`"):
        check_private_path(prefix, NAMES, os.geteuid())


def test_a_parent_writable_by_a_group_is_refused_naming_it_and_its_mode(tmp_path: Path) -> None:
    parent = tmp_path / "group"
    parent.mkdir()
    parent.chmod(0o775)
    with pytest.raises(UnsafePathError, match=f"unsafe prefix: {parent} is writable by group .mode drwxrwxr-x."):
        check_private_path(parent / "a" / "prefix", NAMES, os.geteuid())


def test_inside_names_must_not_be_links_or_writable_by_others(tmp_path: Path) -> None:
    prefix = tmp_path / "prefix"
    prefix.mkdir(mode=0o755)
    attacker = tmp_path / "attacker"
    attacker.mkdir()
    (prefix / "staging").symlink_to(attacker)
    with pytest.raises(UnsafePathError, match=f"{prefix}/staging is a symlink airgap did not make .to {attacker}."):
        check_private_path(prefix, NAMES, os.geteuid())
    (prefix / "staging").unlink()
    (prefix / "store").mkdir()
    (prefix / "store").chmod(0o777)
    with pytest.raises(UnsafePathError, match=f"{prefix}/store is writable by group"):
        check_private_path(prefix, NAMES, os.geteuid())


@pytest.mark.skipif(os.geteuid() != 0, reason="chown to another user needs root")
def test_a_parent_owned_by_another_user_is_refused(tmp_path: Path) -> None:
    theirs = tmp_path / "theirs"
    theirs.mkdir(mode=0o755)
    os.chown(theirs, 4242, 4242)
    with pytest.raises(UnsafePathError, match=f"{theirs} is owned by uid 4242, not by root or uid 0"):
        check_private_path(theirs / "prefix", NAMES, 0)


def test_a_dangling_prefix_symlink_is_one_clear_line(tmp_path: Path) -> None:
    link = tmp_path / "prefix"
    link.symlink_to(tmp_path / "gone")
    with pytest.raises(UnsafePathError, match=f"prefix {link} is a symlink to {tmp_path}/gone, which does not exist"):
        check_private_path(link, NAMES, os.geteuid())
