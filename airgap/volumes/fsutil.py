"""What the destination file system allows, and I/O that reaches the device rather than the page cache."""

from __future__ import annotations

import contextlib
import errno
import os
from pathlib import Path

FAT_TYPES = frozenset({"vfat", "msdos", "fat", "umsdos"})
FAT_MAX_FILE = (4 << 30) - 1
FAT_VOLUME_SIZE = (4 << 30) - (1 << 20)  # a round size under FAT32's 4 GiB - 1 byte file limit
PROC_MOUNTS = Path("/proc/mounts")


def _unescape(field: str) -> str:
    """/proc/mounts writes space, tab, newline and backslash as octal escapes."""
    for code, char in (("\\040", " "), ("\\011", "\t"), ("\\012", "\n"), ("\\134", "\\")):
        field = field.replace(code, char)
    return field


def filesystem_type(path: Path, mounts_text: str | None = None) -> str:
    """The type of the file system holding `path` (longest matching mount point), '' if unknown."""
    if mounts_text is None:
        try:
            mounts_text = PROC_MOUNTS.read_text()
        except OSError:
            return ""
    target = os.path.realpath(path)
    best, best_type = "", ""
    for line in mounts_text.splitlines():
        fields = line.split()
        if len(fields) < 3:
            continue
        mount_point = _unescape(fields[1])
        inside = target == mount_point or target.startswith(mount_point.rstrip("/") + "/")
        if inside and len(mount_point) >= len(best):
            best, best_type = mount_point, fields[2]
    return best_type


def max_file_size(path: Path, mounts_text: str | None = None) -> int | None:
    """The largest file the file system at `path` can hold, None when it has no limit that matters here."""
    return FAT_MAX_FILE if filesystem_type(path, mounts_text) in FAT_TYPES else None


def auto_volume_size(path: Path, mounts_text: str | None = None) -> int | None:
    """`--volume-size auto`: just under 4 GiB on FAT, one volume elsewhere (exFAT, ext4, NTFS...)."""
    return FAT_VOLUME_SIZE if max_file_size(path, mounts_text) is not None else None


def free_bytes(path: Path) -> int:
    stat = os.statvfs(path)
    return stat.f_bavail * stat.f_frsize


def drop_cache(fd: int) -> None:
    """Forget the file's clean cached pages, so the next read comes from the device (best effort)."""
    with contextlib.suppress(OSError):
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)


def describe_os_error(exc: OSError) -> str:
    """One line for an I/O failure, with the likely cause for the errors a pulled stick or full disk gives."""
    reason = exc.strerror or str(exc)
    hints = {errno.ENOSPC: "the destination is full", errno.EIO: "was the device removed?",
             errno.ENODEV: "was the device removed?", errno.ENXIO: "was the device removed?",
             errno.EROFS: "the destination is read-only", errno.ENOENT: "was the device removed?"}
    hint = hints.get(exc.errno or 0)
    return f"{reason} ({hint})" if hint else reason
