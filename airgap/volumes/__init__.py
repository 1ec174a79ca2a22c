"""Bundles on USB sticks: volumes under the file system's limit, verified copies, recovery volumes.

    split_bundle(bundle, out_dir, volume_size, parity)   -> VolumeIndex
    copy_bundle(source, dest_dir, volume_size, parity)   -> CopyReport (synced, read back, README.txt)
    open_bundle(path)                                    -> context manager of a BundleStream (.read, .repaired)
    scan_volumes(path)                                   -> VolumeScan (every volume, recovery ones included)
"""

from airgap.volumes.fsutil import FAT_VOLUME_SIZE, auto_volume_size, filesystem_type
from airgap.volumes.index import (
    INDEX_SUFFIX,
    SEGMENT_SIZE,
    IndexLimits,
    VolumeFile,
    VolumeIndex,
    format_size,
    parse_index,
    parse_size,
    read_index,
)
from airgap.volumes.reader import BundleStream, Repair, VolumeScan, locate_bundle, open_bundle, scan_volumes
from airgap.volumes.writer import CopyReport, copy_bundle, render_readme, split_bundle

__all__ = [
    "FAT_VOLUME_SIZE",
    "INDEX_SUFFIX",
    "SEGMENT_SIZE",
    "BundleStream",
    "CopyReport",
    "IndexLimits",
    "Repair",
    "VolumeFile",
    "VolumeIndex",
    "VolumeScan",
    "auto_volume_size",
    "copy_bundle",
    "filesystem_type",
    "format_size",
    "locate_bundle",
    "open_bundle",
    "parse_index",
    "parse_size",
    "read_index",
    "render_readme",
    "scan_volumes",
    "split_bundle",
]
