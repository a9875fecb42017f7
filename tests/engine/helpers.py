"""Shared helpers for engine tests."""

from __future__ import annotations

import hashlib
import os
import random
import stat
from pathlib import Path

from umbra.engine import backup, restore
from umbra.repo.manifest import Point
from umbra.repo.repository import Repository


def sha(path: Path | str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def do_backup(
    repo: Repository, source: Path, volume: str = "v", type_: str = "full", all_blocks: bool = False
) -> Point:
    return backup.run(repo, backup.BackupOptions(str(source), volume, type_, all_blocks=all_blocks, workers=2)).point


def restored(repo: Repository, point: Point, dest: Path) -> Path:
    if dest.exists():
        dest.unlink()
    restore.run(repo, point, str(dest))
    return dest


def write_at(path: Path, offset: int, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        os.pwrite(fd, data, offset)
    finally:
        os.close(fd)


MiB = 1 << 20
LONG_NAME = "ü" * 127  # 254 bytes of UTF-8


def special_tree(root: Path) -> Path:
    """Every kind of file ``ls``/``extract`` must get right."""
    rng = random.Random(42)
    (root / "dir" / "sub" / "deeper").mkdir(parents=True)
    (root / "plain.txt").write_text("hello umbra\n")
    (root / "empty").write_bytes(b"")
    (root / "random.bin").write_bytes(rng.randbytes(300_000))
    (root / "dir" / "sub" / "deeper" / "nested.bin").write_bytes(rng.randbytes(70_000))
    with open(root / "sparse.img", "wb") as f:
        f.seek(3 * MiB)
        f.write(b"tail")
        f.seek(100)
        f.write(b"head")
    os.link(root / "plain.txt", root / "dir" / "hardlink.txt")
    os.symlink("../plain.txt", root / "dir" / "rel-link")
    os.symlink("/etc/hostname", root / "abs-link")
    os.symlink("t" * 200, root / "long-link")  # a slow symlink: the target lives in a data block
    os.symlink("does-not-exist", root / "dangling")
    os.mkfifo(root / "fifo")
    (root / LONG_NAME).write_text("long unicode name")
    (root / "名前 with spaces").write_text("spaces")
    (root / "setuid").write_text("#!/bin/sh\n")
    os.chmod(root / "setuid", 0o4755)
    os.chmod(root / "dir" / "sub", 0o750)
    os.setxattr(root / "plain.txt", "user.colour", b"blue")
    os.setxattr(root / "dir", "user.big", b"x" * 2000)  # too big for the inode: an xattr block
    for i, path in enumerate(sorted(root.rglob("*"))):
        if not path.is_symlink():
            os.utime(path, (1_700_000_000 + i, 1_600_000_000 + i))
    if os.geteuid() == 0:
        os.chown(root / "random.bin", 1234, 5678)
        os.lchown(root / "dir" / "rel-link", 42, 43)
        os.mknod(root / "null-dev", 0o640 | stat.S_IFCHR, os.makedev(1, 3))
    return root


def assert_same_tree(src: Path, dst: Path, owners: bool) -> None:
    src_inodes: dict[int, str] = {}
    dst_inodes: dict[int, str] = {}
    names = sorted(p.relative_to(src) for p in src.rglob("*"))
    assert names == sorted(p.relative_to(dst) for p in dst.rglob("*") if p.name != "lost+found")
    for rel in names:
        a, b = os.lstat(src / rel), os.lstat(dst / rel)
        assert stat.S_IFMT(a.st_mode) == stat.S_IFMT(b.st_mode), rel
        if not stat.S_ISLNK(a.st_mode):
            assert stat.S_IMODE(a.st_mode) == stat.S_IMODE(b.st_mode), rel
            assert int(a.st_mtime) == int(b.st_mtime), rel  # mkfs -d keeps whole seconds
        if owners:
            assert (a.st_uid, a.st_gid) == (b.st_uid, b.st_gid), rel
        if stat.S_ISREG(a.st_mode):
            assert (src / rel).read_bytes() == (dst / rel).read_bytes(), rel
            if a.st_nlink > 1:  # hard links stay hard links
                assert b.st_nlink == a.st_nlink
                assert src_inodes.setdefault(a.st_ino, str(rel)) == dst_inodes.setdefault(b.st_ino, str(rel))
        if stat.S_ISLNK(a.st_mode):
            assert os.readlink(src / rel) == os.readlink(dst / rel), rel
        if stat.S_ISCHR(a.st_mode):
            assert a.st_rdev == b.st_rdev
        if not stat.S_ISLNK(a.st_mode):
            for name in os.listxattr(src / rel):
                assert os.getxattr(dst / rel, name) == os.getxattr(src / rel, name), (rel, name)
