"""Which file system a path is on, from the kernel's mount table.

A daemon that may block on a file system in a way it cannot afford (see
`receiver.syscalls`) asks `local_fs` first: NFS, CIFS, FUSE and their kin can leave a call
waiting on another machine or process for as long as that one takes.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

# File systems whose calls may wait on another machine or process (mount(8) type names;
# every "fuse.*" type too)
REMOTE_FS_TYPES = frozenset({
    "nfs", "nfs4", "cifs", "smb3", "smbfs", "9p", "ceph", "glusterfs", "lustre", "gpfs",
    "afs", "ocfs2", "gfs2", "davfs", "fuse", "fuseblk", "virtiofs",
})
MOUNTINFO = "/proc/self/mountinfo"


def fs_type(path: str, mountinfo: str) -> str | None:
    """The type of the file system holding absolute `path` (symlinks resolved), from the
    text of /proc/self/mountinfo: the mount with the longest mount point above it, and of
    mounts on one point the last (it hides the ones before: an NFS share over its autofs
    trigger, say)."""
    best, kind = -1, None
    for line in mountinfo.splitlines():
        fields = line.split(" ")
        try:
            point = _unescape(fields[4])
            fstype = fields[fields.index("-", 6) + 1]
        except (IndexError, ValueError):
            continue
        below = path == point or path.startswith(point.rstrip("/") + "/")
        if below and len(point) >= best:
            best, kind = len(point), fstype
    return kind


def _unescape(field: str) -> str:
    """mountinfo writes space, tab, newline and backslash in octal (\\040 ...)."""
    if "\\" not in field:
        return field
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def local_fs(path: Path) -> bool:
    """True if `path` (or the directory it would be made in) is on a local file system;
    False where that cannot be told (no /proc: the safe answer)."""
    try:
        with open(MOUNTINFO, encoding="utf-8", errors="surrogateescape") as f:
            kind = fs_type(os.path.realpath(path), f.read())
    except OSError:
        return False
    return kind is not None and kind not in REMOTE_FS_TYPES and not kind.startswith("fuse.")
