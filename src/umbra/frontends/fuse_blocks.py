"""FUSE block files: one ``DIR/NAME.img`` per block export (a protected volume ``V.img`` read-write,
its snapshots ``V@SNAPSHOT.img`` and points of the repository read-only).

Served over the kernel's protocol directly (:mod:`umbra.frontends.fuse_wire`): WORKERS threads
each read a request from the connection and handle it to the end, so a write's data lands in the
thread's page-aligned buffer (the journal writes it from there with O_DIRECT) and reaches the cow
engine without any hand-off; reads and writes release the GIL in their system calls.  Files are
opened with ``direct_io`` so the page cache is not doubled, and ``--loop`` attaches ``V.img`` with
``losetup --direct-io=on``: every write of the filesystem mounted from that loop device passes
through the cow engine.
"""

from __future__ import annotations

import errno
import logging
import mmap
import os
import stat
import subprocess
import threading
import time
from collections.abc import Callable, Sequence

from umbra.errors import ServeError, UmbraError
from umbra.frontends import fuse_wire as w
from umbra.frontends.exports import BlockExport

log = logging.getLogger(__name__)

FIRST_INODE = 2
WORKERS = 8  # threads reading requests (each holds one request at a time)
MAX_BACKGROUND = 24  # asynchronous requests the kernel keeps in flight (loop's direct I/O)
MAX_WRITE = 1 << 20
TIMEOUT = 1  # seconds the kernel may cache names and attributes
STOP_TIMEOUT = 30  # seconds stop() waits for the request threads after unmounting
ZEROING_MODES = w.FALLOC_FL_KEEP_SIZE | w.FALLOC_FL_PUNCH_HOLE | w.FALLOC_FL_ZERO_RANGE
Exports = Callable[[], dict[str, BlockExport]]
Parts = Sequence[bytes | memoryview]


class _Errno(OSError):
    """A reply with an error code."""

    def __init__(self, code: int) -> None:
        super().__init__(code, os.strerror(code))


class FuseBlockFiles:
    """Block files ``DIR/NAME.img`` of the exports; optionally the default one loop-attached."""

    def __init__(self, exports: Exports, directory: os.PathLike[str] | str, name: str) -> None:
        self.exports = exports
        self.directory = os.fspath(directory)
        self.name = name  # the mount's fsname and the default export
        self.loop_device: str | None = None
        self._current: dict[int, BlockExport] = {}  # inode -> export (inodes never reused while mounted)
        self._inodes: dict[str, int] = {}  # export name -> inode
        self._next_inode = FIRST_INODE
        self._lock = threading.Lock()
        self._started_s = int(time.time())
        self._fd: int | None = None
        self._threads: list[threading.Thread] = []
        self._handlers: dict[int, Callable[[int, bytes], Parts]] = {
            w.INIT: self._init,
            w.LOOKUP: self._lookup,
            w.GETATTR: self._getattr,
            w.SETATTR: self._setattr,
            w.OPEN: self._open,
            w.OPENDIR: self._opendir,
            w.READ: self._read,
            w.READDIR: self._readdir,
            w.FSYNC: self._fsync,
            w.FALLOCATE: self._fallocate,
            w.STATFS: self._statfs,
            w.FLUSH: _nothing,  # close(2) is not a durability point; fsync is
            w.RELEASE: _nothing,  # file handles are inode numbers: nothing to free
            w.RELEASEDIR: _nothing,
            w.FSYNCDIR: _nothing,
            w.ACCESS: _nothing,  # mounted with default_permissions: the kernel checks modes
            w.DESTROY: _nothing,
        }

    # --- life cycle --------------------------------------------------------------------------

    def image_path(self, export: str | None = None) -> str:
        return os.path.join(self.directory, f"{export or self.name}.img")

    def start(self) -> None:
        os.makedirs(self.directory, exist_ok=True)
        self._refresh_names()
        try:
            self._fd = w.mount(self.directory, f"umbra-{self.name}", read_only=False)
        except OSError as exc:
            raise ServeError(name=self.name, reason=f"cannot mount FUSE at {self.directory}: {exc}") from exc
        self._threads = [
            threading.Thread(target=self._worker, name=f"umbra-fuse-{i}", daemon=True) for i in range(WORKERS)
        ]
        for thread in self._threads:
            thread.start()

    @property
    def running(self) -> bool:
        """False once the connection has ended (for example after ``umount`` from outside)."""
        return any(t.is_alive() for t in self._threads)

    def stop(self) -> None:
        if self.loop_device is not None:
            subprocess.run(["losetup", "-d", self.loop_device], capture_output=True, check=False)
            self.loop_device = None
        if self._fd is None:
            return
        if self.running:
            try:
                w.unmount(self.directory)
            except OSError as exc:
                log.warning("fuse: cannot unmount %s: %s", self.directory, exc)
        deadline = time.monotonic() + STOP_TIMEOUT  # a lazy unmount ends the connection when its last user is gone
        for thread in self._threads:
            thread.join(timeout=max(0.0, deadline - time.monotonic()))
        if not self.running:
            os.close(self._fd)
            self._fd = None

    def attach_loop(self) -> str:
        """``losetup`` the read-write block file; returns ``/dev/loopN``."""
        proc = subprocess.run(
            ["losetup", "--find", "--show", "--direct-io=on", self.image_path()],
            capture_output=True,
            text=True,
            check=False,
        )
        if proc.returncode != 0:
            raise ServeError(name=self.name, reason=f"losetup failed: {proc.stderr.strip()}")
        self.loop_device = proc.stdout.strip()
        return self.loop_device

    def refresh(self) -> None:
        """Take up the current exports (a snapshot created or deleted) and drop the kernel's cached
        directory listing."""
        self._refresh_names()
        fd = self._fd
        if fd is None:
            return
        body = w.NOTIFY_INVAL_INODE_OUT.pack(w.ROOT_INODE, 0, 0)
        try:
            os.write(fd, w.OUT_HEADER.pack(w.OUT_HEADER.size + len(body), w.NOTIFY_INVAL_INODE, 0) + body)
        except OSError as exc:
            if exc.errno not in (errno.ENOENT, errno.ENODEV):  # nothing cached yet; unmounted
                raise

    def _refresh_names(self) -> None:
        live = self.exports()
        with self._lock:
            for name in set(self._inodes) - set(live):
                del self._current[self._inodes.pop(name)]
            for name, export in live.items():
                if name not in self._inodes:
                    self._inodes[name] = self._next_inode
                    self._next_inode += 1
                self._current[self._inodes[name]] = export

    # --- the request loop --------------------------------------------------------------------

    def _worker(self) -> None:
        fd = self._fd
        assert fd is not None
        head = bytearray(w.WRITE_HEAD)
        data = mmap.mmap(-1, MAX_WRITE + mmap.PAGESIZE)  # page-aligned: a write's data lands here
        view = memoryview(data)
        while True:
            try:
                n = os.readv(fd, [head, data])
            except OSError as exc:
                if exc.errno in (errno.EINTR, errno.EAGAIN, errno.ENOENT):  # ENOENT: interrupted request
                    continue
                if exc.errno != errno.ENODEV:  # ENODEV: unmounted
                    log.error("fuse: reading requests from %s failed: %s", self.directory, exc)
                return
            if n < w.IN_HEADER.size:
                log.error("fuse: a request of %d bytes from %s", n, self.directory)
                continue
            _len, opcode, unique, nodeid, *_ = w.IN_HEADER.unpack_from(head)
            if opcode in w.NO_REPLY:
                continue
            try:
                if opcode == w.WRITE:
                    parts = self._write(head, view, n - w.WRITE_HEAD)
                else:
                    body = bytes(head[w.IN_HEADER.size : n]) + bytes(view[: max(0, n - w.WRITE_HEAD)])
                    handler = self._handlers.get(opcode)
                    if handler is None:
                        raise _Errno(errno.ENOSYS)
                    parts = handler(nodeid, body)
            except UmbraError as exc:
                self._reply(unique, (), exc.errno)
            except OSError as exc:
                self._reply(unique, (), exc.errno or errno.EIO)
            except Exception:  # a bug in one request must not take the block file down
                log.exception("fuse: request %d on inode %d failed", opcode, nodeid)
                self._reply(unique, (), errno.EIO)
            else:
                self._reply(unique, parts)

    def _reply(self, unique: int, parts: Parts, error: int = 0) -> None:
        assert self._fd is not None
        size = w.OUT_HEADER.size + sum(len(p) for p in parts)
        try:
            os.writev(self._fd, [w.OUT_HEADER.pack(size, -error, unique), *parts])
        except OSError as exc:
            if exc.errno not in (errno.ENOENT, errno.ENODEV):  # interrupted request; unmounted
                log.error("fuse: replying to %s failed: %s", self.directory, exc)

    # --- handlers: each gets the node id and the request's arguments, returns the reply --------

    def _write(self, head: bytearray, view: memoryview, received: int) -> Parts:
        fh, offset, size, *_ = w.WRITE_IN.unpack_from(head, w.IN_HEADER.size)
        if size != received:
            raise _Errno(errno.EINVAL)
        export = self._export(fh)
        if export.read_only:
            raise _Errno(errno.EROFS)
        if offset + size > export.size:
            raise _Errno(errno.ENOSPC)
        export.write(offset, view[:size], False)
        return (w.WRITE_OUT.pack(size, 0),)

    def _init(self, nodeid: int, body: bytes) -> Parts:
        major, minor, max_readahead, flags = w.INIT_IN.unpack_from(body)
        if major != w.MAJOR:
            log.error("fuse: the kernel speaks protocol %d.%d, umbra %d.%d", major, minor, w.MAJOR, w.MINOR)
            raise _Errno(errno.EPROTO)
        pages = MAX_WRITE // mmap.PAGESIZE
        reply = w.INIT_OUT.pack(
            w.MAJOR, w.MINOR, max_readahead, flags & w.WANTED_FLAGS, MAX_BACKGROUND, MAX_BACKGROUND * 3 // 4,
            MAX_WRITE, 1, pages, 0, 0, 0, 0,
        )  # fmt: skip
        return (reply,)

    def _lookup(self, nodeid: int, body: bytes) -> Parts:
        if nodeid != w.ROOT_INODE:
            raise _Errno(errno.ENOENT)
        wanted = os.fsdecode(body.split(b"\0", 1)[0])
        inode = w.ROOT_INODE if wanted in (".", "..") else next((i for n, i in self._entries() if n == wanted), 0)
        if not inode:
            raise _Errno(errno.ENOENT)
        return (w.ENTRY_OUT.pack(inode, 0, TIMEOUT, TIMEOUT, 0, 0), self._attr(inode))

    def _getattr(self, nodeid: int, body: bytes) -> Parts:
        return (w.ATTR_OUT.pack(TIMEOUT, 0, 0), self._attr(nodeid))

    def _setattr(self, nodeid: int, body: bytes) -> Parts:
        valid, _pad, _fh, size = w.SETATTR_IN.unpack_from(body)
        if valid & w.FATTR_SIZE and nodeid != w.ROOT_INODE and size != self._export(nodeid).size:
            raise _Errno(errno.EPERM)  # a block file has the volume's size
        return self._getattr(nodeid, body)

    def _open(self, nodeid: int, body: bytes) -> Parts:
        flags, _ = w.OPEN_IN.unpack_from(body)
        export = self._export(nodeid)
        if export.read_only and flags & (os.O_WRONLY | os.O_RDWR | os.O_TRUNC):
            raise _Errno(errno.EROFS)
        if flags & os.O_TRUNC:
            raise _Errno(errno.EPERM)
        return (w.OPEN_OUT.pack(nodeid, w.FOPEN_DIRECT_IO, 0),)

    def _opendir(self, nodeid: int, body: bytes) -> Parts:
        if nodeid != w.ROOT_INODE:
            raise _Errno(errno.ENOTDIR)
        return (w.OPEN_OUT.pack(nodeid, 0, 0),)

    def _read(self, nodeid: int, body: bytes) -> Parts:
        fh, offset, size, *_ = w.READ_IN.unpack_from(body)
        export = self._export(fh)
        size = max(0, min(size, export.size - offset))
        return (export.read(offset, size),) if size else ()

    def _readdir(self, nodeid: int, body: bytes) -> Parts:
        _fh, offset, size, *_ = w.READ_IN.unpack_from(body)
        entries = [(".", w.ROOT_INODE, w.DT_DIR), ("..", w.ROOT_INODE, w.DT_DIR)]
        entries += [(name, inode, w.DT_REG) for name, inode in self._entries()]
        out = bytearray()
        for index in range(offset, len(entries)):
            name, inode, kind = entries[index]
            entry = w.dirent(inode, index + 1, os.fsencode(name), kind)
            if len(out) + len(entry) > size:
                break
            out += entry
        return (bytes(out),)

    def _fallocate(self, nodeid: int, body: bytes) -> Parts:
        """Punching a hole or zeroing a range (a loop device's discard and write-zeroes, ``fstrim``,
        ``blkdiscard``) zeroes it through the engine, as NBD's TRIM does; allocating space is
        refused (a block file has its volume's size and nothing to reserve)."""
        fh, offset, length, mode, _ = w.FALLOCATE_IN.unpack_from(body)
        export = self._export(fh)
        if export.read_only:
            raise _Errno(errno.EROFS)
        if not mode & (w.FALLOC_FL_PUNCH_HOLE | w.FALLOC_FL_ZERO_RANGE) or mode & ~ZEROING_MODES:
            raise _Errno(errno.EOPNOTSUPP)
        end = min(offset + length, export.size)  # past the end: nothing there to punch (as for files)
        if end > offset:
            export.zero(offset, end - offset, False)
        return ()

    def _fsync(self, nodeid: int, body: bytes) -> Parts:
        export = self._export(nodeid)
        if not export.read_only:
            export.flush()
        return ()

    def _statfs(self, nodeid: int, body: bytes) -> Parts:
        with self._lock:
            blocks = sum(-(-e.size // 4096) for e in self._current.values())
            files = len(self._current)
        return (w.STATFS_OUT.pack(blocks, 0, 0, files, 0, 4096, 255, 4096, 0),)

    # --- names and attributes ----------------------------------------------------------------

    def _entries(self) -> list[tuple[str, int]]:
        with self._lock:
            return sorted(((f"{name}.img", ino) for name, ino in self._inodes.items()), key=lambda kv: kv[1])

    def _export(self, inode: int) -> BlockExport:
        with self._lock:
            export = self._current.get(inode)
        if export is None:
            raise _Errno(errno.ENOENT)
        return export

    def _attr(self, inode: int) -> bytes:
        t = self._started_s
        uid, gid = os.getuid(), os.getgid()
        if inode == w.ROOT_INODE:
            return w.ATTR.pack(inode, 0, 0, t, t, t, 0, 0, 0, stat.S_IFDIR | 0o755, 2, uid, gid, 0, 4096, 0)
        export = self._export(inode)
        mode = stat.S_IFREG | (0o400 if export.read_only else 0o600)
        blocks = -(-export.size // 512)
        return w.ATTR.pack(inode, export.size, blocks, t, t, t, 0, 0, 0, mode, 1, uid, gid, 0, 4096, 0)


def _nothing(nodeid: int, body: bytes) -> Parts:
    return ()
