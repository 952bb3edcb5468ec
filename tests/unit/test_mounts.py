"""The mount table read right: which file system holds a path, and whether it is local."""

from __future__ import annotations

from pathlib import Path

import pytest

from replicator import mounts
from replicator.mounts import fs_type, local_fs

# /proc/self/mountinfo as Linux writes it (proc(5)): optional fields before the "-"
MOUNTINFO = """\
22 27 0:21 / /proc rw,relatime - proc proc rw
27 1 254:0 / / rw,relatime shared:1 - ext4 /dev/vda rw
30 27 0:40 / /mnt/nas rw,relatime shared:7 master:2 - nfs4 nas:/export rw,vers=4.2
31 27 0:41 / /mnt/my\\040share rw - cifs //srv/share rw
32 30 254:1 / /mnt/nas/local rw - xfs /dev/vdb rw
33 27 0:42 / /home/u/remote rw,nosuid - fuse.sshfs u@host:/ rw
34 27 0:43 / /srv/ram rw - tmpfs tmpfs rw
36 27 0:45 / /net/dr rw - autofs systemd-1 rw,fd=51
37 36 0:46 / /net/dr rw - nfs4 dr:/mirror rw
35 27 0:44 / /broken line
"""


@pytest.mark.parametrize(("path", "kind", "local"), [
    ("/", "ext4", True),
    ("/srv/mirror", "ext4", True),
    ("/mnt/nas", "nfs4", False),
    ("/mnt/nas/dr/mirror", "nfs4", False),
    ("/mnt/nasty/mirror", "ext4", True),           # a sibling that shares a prefix
    ("/mnt/nas/local/mirror", "xfs", True),        # a local mount below a remote one
    ("/mnt/my share/mirror", "cifs", False),       # an escaped space in the mount point
    ("/home/u/remote/dr", "fuse.sshfs", False),
    ("/srv/ram/m", "tmpfs", True),
    ("/net/dr/m", "nfs4", False),                  # mounted over its autofs trigger
])
def test_fs_type_of_a_path(path: str, kind: str, local: bool, tmp_path: Path,
                           monkeypatch: pytest.MonkeyPatch) -> None:
    assert fs_type(path, MOUNTINFO) == kind
    (tmp_path / "mountinfo").write_text(MOUNTINFO)
    monkeypatch.setattr(mounts, "MOUNTINFO", str(tmp_path / "mountinfo"))
    assert local_fs(Path(path)) is local
