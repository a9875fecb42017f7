"""FUSE file tree: the filesystem inside a point, browsed read-only without root or loop devices
(``umbra mount --files``).

Inode numbers are the filesystem's own (shifted so that its root is FUSE's root), so hard links
show as one inode.  The Sleuth Kit is not thread-safe: every call into :class:`FileSystem` holds
one lock, and runs in a worker thread so the FUSE loop stays responsive.  ``umbra mount --files``
hands in a parser in a process of its own (:class:`umbra.engine.parser_process.ParserProcess`): a
call it fails on (a crash, a stall) is EIO for that call, and the mount stays up.  Names that could
not be one path component are left out of listings.
"""

from __future__ import annotations

import errno
import os
import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import TypeVar

import pyfuse3
import trio

from umbra.errors import UmbraError
from umbra.frontends.fuse import FuseMount
from umbra.volume.filesystem import Entry, FileTree, safe_name

INODE_SHIFT = 16  # filesystem inode n is FUSE inode n + INODE_SHIFT; the root is FUSE's ROOT_INODE
DIR_CACHE = 1024
T = TypeVar("T")


class _TreeOps(pyfuse3.Operations):
    def __init__(self, fs: FileTree) -> None:
        super().__init__()
        self.fs = fs
        self.lock = threading.Lock()  # TSK objects are not thread-safe
        self.root = fs.root()
        self.entries: dict[int, Entry] = {pyfuse3.ROOT_INODE: self.root}
        self.dirs: OrderedDict[int, list[tuple[bytes, int]]] = OrderedDict()  # inode -> (name, inode)

    def _ino(self, entry: Entry) -> int:
        return pyfuse3.ROOT_INODE if entry.inode == self.root.inode else entry.inode + INODE_SHIFT

    async def _call(self, fn: Callable[..., T], *args: object) -> T:
        def locked() -> T:
            with self.lock:
                return fn(*args)

        try:
            return await trio.to_thread.run_sync(locked)
        except UmbraError as exc:
            raise pyfuse3.FUSEError(errno.EIO) from exc

    def _entry(self, inode: int) -> Entry:
        entry = self.entries.get(inode)
        if entry is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return entry

    def _attr(self, entry: Entry) -> pyfuse3.EntryAttributes:
        attr = pyfuse3.EntryAttributes()
        attr.st_ino = pyfuse3.InodeT(self._ino(entry))
        attr.st_mode = pyfuse3.ModeT(entry.st_mode)
        attr.st_nlink = max(1, entry.nlink)
        attr.st_uid, attr.st_gid = entry.uid, entry.gid
        attr.st_size = entry.size
        attr.st_rdev = os.makedev(*entry.rdev)
        attr.st_atime_ns, attr.st_mtime_ns, attr.st_ctime_ns = entry.atime_ns, entry.mtime_ns, entry.ctime_ns
        attr.st_blksize = 4096
        attr.st_blocks = -(-entry.size // 512)
        attr.entry_timeout = attr.attr_timeout = 300  # a point never changes
        return attr

    def _list(self, directory: Entry) -> list[tuple[bytes, int]]:
        """Called with the lock held."""
        inode = self._ino(directory)
        listing = self.dirs.get(inode)
        if listing is None:
            listing = []
            for child in self.fs.children(directory):
                if not safe_name(child.name):
                    continue  # (the kernel would refuse the whole listing)
                self.entries[self._ino(child)] = child
                listing.append((child.name, self._ino(child)))
            self.dirs[inode] = listing
            while len(self.dirs) > DIR_CACHE:
                self.dirs.popitem(last=False)
        return listing

    async def _listing(self, inode: int) -> list[tuple[bytes, int]]:
        directory = self._entry(inode)
        if directory.kind != "dir":
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        return await self._call(self._list, directory)

    # --- handlers ----------------------------------------------------------------------------

    async def getattr(self, inode: pyfuse3.InodeT, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return self._attr(self._entry(inode))

    async def lookup(
        self, parent_inode: pyfuse3.InodeT, name: pyfuse3.FileNameT, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        if name == b".":
            return self._attr(self._entry(parent_inode))
        for child_name, inode in await self._listing(parent_inode):
            if child_name == name:
                return self._attr(self._entry(inode))
        raise pyfuse3.FUSEError(errno.ENOENT)

    async def opendir(self, inode: pyfuse3.InodeT, ctx: pyfuse3.RequestContext) -> pyfuse3.FileHandleT:
        await self._listing(inode)
        return pyfuse3.FileHandleT(inode)

    async def readdir(self, fh: pyfuse3.FileHandleT, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        listing = await self._listing(fh)
        for index in range(start_id, len(listing)):
            name, inode = listing[index]
            if not pyfuse3.readdir_reply(token, pyfuse3.FileNameT(name), self._attr(self._entry(inode)), index + 1):
                return

    async def readlink(self, inode: pyfuse3.InodeT, ctx: pyfuse3.RequestContext) -> pyfuse3.FileNameT:
        entry = self._entry(inode)
        if entry.kind != "symlink":
            raise pyfuse3.FUSEError(errno.EINVAL)
        return pyfuse3.FileNameT(entry.link_target)

    async def open(self, inode: pyfuse3.InodeT, flags: pyfuse3.FlagT, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        entry = self._entry(inode)
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_TRUNC | os.O_APPEND):
            raise pyfuse3.FUSEError(errno.EROFS)
        if entry.kind != "file":
            raise pyfuse3.FUSEError(errno.EISDIR if entry.kind == "dir" else errno.EACCES)
        return pyfuse3.FileInfo(fh=pyfuse3.FileHandleT(inode), keep_cache=True)

    async def read(self, fh: pyfuse3.FileHandleT, off: int, size: int) -> bytes:
        entry = self._entry(fh)
        size = max(0, min(size, entry.size - off))
        if size == 0:
            return b""
        return await self._call(self.fs.read_at, entry, off, size)

    async def listxattr(self, inode: pyfuse3.InodeT, ctx: pyfuse3.RequestContext) -> list[pyfuse3.XAttrNameT]:
        pairs = await self._call(self.fs.xattrs, self._entry(inode))
        return [pyfuse3.XAttrNameT(name) for name, _ in pairs]

    async def getxattr(self, inode: pyfuse3.InodeT, name: pyfuse3.XAttrNameT, ctx: pyfuse3.RequestContext) -> bytes:
        for key, value in await self._call(self.fs.xattrs, self._entry(inode)):
            if key == name:
                return value
        raise pyfuse3.FUSEError(pyfuse3.ENOATTR)

    async def release(self, fh: pyfuse3.FileHandleT) -> None:
        return None  # file handles are inode numbers: nothing to free

    async def releasedir(self, fh: pyfuse3.FileHandleT) -> None:
        return None

    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        st = pyfuse3.StatvfsData()
        st.f_bsize = st.f_frsize = 4096
        st.f_namemax = 255
        return st


class FuseFileTree(FuseMount):
    """Mount the files of ``fs`` read-only at ``directory``."""

    def __init__(self, fs: FileTree, directory: os.PathLike[str] | str, name: str) -> None:
        super().__init__(_TreeOps(fs), directory, name, read_only=True)
