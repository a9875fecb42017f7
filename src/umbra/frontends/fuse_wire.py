"""The kernel's FUSE protocol (``include/uapi/linux/fuse.h``), as far as block files need it, and
mounting a ``/dev/fuse`` connection.

umbra speaks it directly for its block files (:mod:`umbra.frontends.fuse_blocks`): several threads
read requests from one connection, each handling its request to the end, so a write goes from the
kernel into a page-aligned buffer and on to the cow engine without a task or a thread hand-off
(pyfuse3, still used for the file trees of :mod:`umbra.frontends.fuse_tree`, runs every handler in
one trio thread).  Protocol 7.31: 1 MiB requests (``max_pages``), asynchronous direct I/O.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import socket
import struct
import subprocess

MAJOR, MINOR = 7, 31

# opcodes
LOOKUP = 1
FORGET = 2
GETATTR = 3
SETATTR = 4
OPEN = 14
READ = 15
WRITE = 16
STATFS = 17
RELEASE = 18
FSYNC = 20
FLUSH = 25
INIT = 26
OPENDIR = 27
READDIR = 28
RELEASEDIR = 29
FSYNCDIR = 30
ACCESS = 34
INTERRUPT = 36
DESTROY = 38
BATCH_FORGET = 42
FALLOCATE = 43
NO_REPLY = frozenset({FORGET, BATCH_FORGET, INTERRUPT})

# INIT flags umbra asks for
ASYNC_READ = 1 << 0
BIG_WRITES = 1 << 5
ASYNC_DIO = 1 << 15
MAX_PAGES = 1 << 22
WANTED_FLAGS = ASYNC_READ | BIG_WRITES | ASYNC_DIO | MAX_PAGES

FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, FALLOC_FL_ZERO_RANGE = 0x1, 0x2, 0x10
FOPEN_DIRECT_IO = 1 << 0
FATTR_SIZE = 1 << 3
NOTIFY_INVAL_INODE = 2
ROOT_INODE = 1
DT_DIR, DT_REG = 4, 8

IN_HEADER = struct.Struct("<IIQQIIIHH")  # len, opcode, unique, nodeid, uid, gid, pid, extlen, pad
OUT_HEADER = struct.Struct("<IiQ")  # len, error (negative errno), unique
INIT_IN = struct.Struct("<IIII")  # major, minor, max_readahead, flags
# major, minor, max_readahead, flags, max_background, congestion_threshold, max_write, time_gran,
# max_pages, map_alignment, flags2, max_stack_depth, request_timeout, unused[11]
INIT_OUT = struct.Struct("<IIIIHHIIHHIIH22x")
# ino, size, blocks, atime, mtime, ctime, atimensec, mtimensec, ctimensec, mode, nlink, uid, gid,
# rdev, blksize, flags
ATTR = struct.Struct("<QQQQQQIIIIIIIIII")
ENTRY_OUT = struct.Struct("<QQQQII")  # nodeid, generation, entry_valid, attr_valid, nsecs (then ATTR)
ATTR_OUT = struct.Struct("<QII")  # attr_valid, attr_valid_nsec, dummy (then ATTR)
OPEN_IN = struct.Struct("<II")  # flags, open_flags
OPEN_OUT = struct.Struct("<QIi")  # fh, open_flags, backing_id
READ_IN = struct.Struct("<QQIIQII")  # fh, offset, size, read_flags, lock_owner, flags, padding
WRITE_IN = struct.Struct("<QQIIQII")  # fh, offset, size, write_flags, lock_owner, flags, padding
WRITE_OUT = struct.Struct("<II")  # size, padding
FALLOCATE_IN = struct.Struct("<QQQII")  # fh, offset, length, mode, padding
SETATTR_IN = struct.Struct("<IIQQ")  # valid, padding, fh, size (the rest is not needed)
DIRENT = struct.Struct("<QQII")  # ino, off, namelen, type (then the name, padded to 8 bytes)
# blocks, bfree, bavail, files, ffree, bsize, namelen, frsize, padding, spare[6]
STATFS_OUT = struct.Struct("<QQQQQIIII24x")
NOTIFY_INVAL_INODE_OUT = struct.Struct("<Qqq")  # ino, offset, length
WRITE_HEAD = IN_HEADER.size + WRITE_IN.size  # a write's data starts right after this


def dirent(ino: int, next_offset: int, name: bytes, kind: int) -> bytes:
    entry = DIRENT.pack(ino, next_offset, len(name), kind) + name
    return entry + bytes(-len(entry) % 8)


# --- mounting ---------------------------------------------------------------------------------

MS_RDONLY, MS_NOSUID, MS_NODEV = 1, 2, 4
MNT_DETACH = 2


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def mount(directory: str, fsname: str, read_only: bool) -> int:
    """Mount a new FUSE connection at ``directory``; returns its ``/dev/fuse`` descriptor.  As root
    with mount(2), as anyone else through ``fusermount3`` (which passes the descriptor back over a
    socket), as libfuse does."""
    options = ["default_permissions"]
    if os.geteuid() != 0:
        return _mount_fusermount(directory, ",".join([*options, f"fsname={fsname}", "subtype=umbra"]), read_only)
    fd = os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC)
    data = f"fd={fd},rootmode=40000,user_id=0,group_id=0," + ",".join(options)
    flags = MS_NOSUID | MS_NODEV | (MS_RDONLY if read_only else 0)
    if _libc().mount(fsname.encode(), os.fsencode(directory), b"fuse.umbra", flags, data.encode()) != 0:
        err = ctypes.get_errno()
        os.close(fd)
        raise OSError(err, os.strerror(err), directory)
    return fd


def _mount_fusermount(directory: str, options: str, read_only: bool) -> int:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with ours, theirs:
        proc = subprocess.run(
            ["fusermount3", "-o", options + (",ro" if read_only else ""), "--", directory],
            env={**os.environ, "_FUSE_COMMFD": str(theirs.fileno())},
            pass_fds=(theirs.fileno(),),
            capture_output=True,
            text=True,
            check=False,
        )
        if proc.returncode != 0:
            raise OSError(proc.stderr.strip() or "fusermount3 failed")
        _msg, fds, _flags, _addr = socket.recv_fds(ours, 1, 1)
    if not fds:
        raise OSError("fusermount3 passed no descriptor")
    return fds[0]


def unmount(directory: str) -> None:
    """Unmount (lazily if busy: the kernel ends the connection when its last user is gone)."""
    if os.geteuid() == 0:
        libc = _libc()
        if libc.umount2(os.fsencode(directory), 0) != 0 and libc.umount2(os.fsencode(directory), MNT_DETACH) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err), directory)
        return
    proc = subprocess.run(["fusermount3", "-u", "-z", "--", directory], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise OSError(proc.stderr.strip() or "fusermount3 -u failed")
