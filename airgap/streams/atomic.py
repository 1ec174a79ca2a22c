"""Crash-safe small writes (temporary file, fsync, rename, fsync the folder) and who may write where.

Names are created with O_EXCL | O_NOFOLLOW, so nothing is ever written through a link someone planted."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import stat
from pathlib import Path

from airgap.errors import UnsafePathError


def fsync_dir(path: Path) -> None:
    """Make a rename in `path` durable. File systems that cannot sync folders (FAT, some FUSE) are let be."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise
    finally:
        os.close(fd)


def create_new(path: Path, mode: int = 0o644) -> int:
    """Open a file that must not exist yet: never an existing file, never through a symlink."""
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode)


def write_new(path: Path, data: bytes) -> None:
    """Write `data` to a new file of its own at `path` (fsynced)."""
    with os.fdopen(create_new(path), "wb") as out:
        out.write(data)
        out.flush()
        os.fsync(out.fileno())


def write_atomic(path: Path, data: bytes) -> None:
    """Replace `path` with `data`: readers and crashes see the old bytes or the new, never a mix.

    The temporary name is created afresh (O_EXCL | O_NOFOLLOW): a leftover or planted `.tmp`, even a
    symlink, is removed as a name and never written through."""
    tmp = path.with_name(f".{path.name}.tmp")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp)
    write_new(tmp, data)
    os.replace(tmp, path)
    fsync_dir(path.parent)


def remove_tree(path: Path) -> None:
    """Remove a folder we made, or just the name if something put a symlink (or a file) there instead."""
    if path.is_symlink() or (path.exists() and not path.is_dir()):
        path.unlink()
    else:
        shutil.rmtree(path, ignore_errors=True)


# ---------------------------------------------------------------- who may write where (sshd's StrictModes)

def check_private_path(prefix: Path, inside: tuple[str, ...], uid: int) -> None:
    """Refuse a prefix that anyone but root or `uid` could change under us.

    Every folder from `/` down to `prefix` (as given and as resolved) must be owned by root or `uid` and
    not writable by group or others, unless sticky (like /tmp: others cannot rename or remove our
    entries there). `prefix` itself and the names `inside` it that exist must be owned likewise, never
    group- or other-writable (sticky or not: others could add names), and must not be symlinks.
    """
    absolute = Path(os.path.abspath(prefix))
    if absolute.is_symlink() and not absolute.exists():
        raise UnsafePathError(f"prefix {absolute} is a symlink to {os.readlink(absolute)}, which does not exist; "
                              f"create that folder or pass the real path")
    real = Path(os.path.realpath(absolute))
    for folder in sorted(_ancestors(absolute) | _ancestors(real)):
        if folder.exists():  # the missing ones airgap creates itself, 0755
            _check_owner_and_mode(folder, uid, allow_sticky=True)
    if not real.exists():
        return
    if not real.is_dir():
        raise UnsafePathError(f"prefix {absolute} is not a folder")
    _check_owner_and_mode(real, uid, allow_sticky=False)
    for name in inside:
        path = real / name
        try:
            info = os.lstat(path)
        except FileNotFoundError:
            continue
        if stat.S_ISLNK(info.st_mode):
            raise UnsafePathError(f"{path} is a symlink airgap did not make (to {os.readlink(path)}); remove it")
        _check_owner_and_mode(path, uid, allow_sticky=False, info=info)


def _ancestors(path: Path) -> set[Path]:
    return {Path(os.path.realpath(p)) for p in path.parents}


def _check_owner_and_mode(path: Path, uid: int, allow_sticky: bool, info: os.stat_result | None = None) -> None:
    info = info or os.stat(path)
    if info.st_uid not in (0, uid):
        raise UnsafePathError(f"unsafe prefix: {path} is owned by uid {info.st_uid}, not by root or uid {uid} "
                              f"(mode {stat.filemode(info.st_mode)}); another user could change what is installed")
    sticky = allow_sticky and stat.S_ISDIR(info.st_mode) and info.st_mode & stat.S_ISVTX
    if info.st_mode & 0o022 and not sticky:
        raise UnsafePathError(f"unsafe prefix: {path} is writable by {'group' if info.st_mode & 0o020 else 'others'} "
                              f"(mode {stat.filemode(info.st_mode)}); run `chmod go-w {path}`")
