"""Virtual disks: VMDK (sparse, flat, split, streamOptimized, delta chains), raw, NBD.

Everything is a `BlockImage`; `open_disk` picks the format from the name or URL.
"""

from boite.disk.base import SECTOR, BlockImage
from boite.disk.ops import (
    DISK_TYPES,
    CheckReport,
    DiskInfo,
    MapEntry,
    check_disk,
    commit_child_into_parent,
    compact_disk,
    convert_disk,
    create_child,
    create_disk,
    disk_files,
    disk_info,
    grow_disk,
    image_map,
    map_disk,
    merge_parent_into_child,
    open_disk,
    set_cid,
    set_parent,
)
from boite.disk.raw import RawImage
from boite.disk.vmdk import VmdkDisk

__all__ = [
    "DISK_TYPES",
    "SECTOR",
    "BlockImage",
    "CheckReport",
    "DiskInfo",
    "MapEntry",
    "RawImage",
    "VmdkDisk",
    "check_disk",
    "commit_child_into_parent",
    "compact_disk",
    "convert_disk",
    "create_child",
    "create_disk",
    "disk_files",
    "disk_info",
    "grow_disk",
    "image_map",
    "map_disk",
    "merge_parent_into_child",
    "open_disk",
    "set_cid",
    "set_parent",
]
