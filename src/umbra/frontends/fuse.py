"""FUSE block files: one ``DIR/NAME.img`` per block export (a protected volume ``V.img`` read-write,
its snapshots ``V@SNAPSHOT.img`` and points of the repository read-only).

pyfuse3 runs its trio loop in a thread of its own; each request hands the actual I/O to a worker
thread (``trio.to_thread``), so reads and writes run in parallel and release the GIL.  Files are
opened with ``direct_io`` so the page cache is not doubled, and ``--loop`` attaches ``V.img`` with
``losetup --direct-io=on``: every write of the filesystem mounted from that loop device passes
through the cow engine.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import subprocess
import threading
import time
from collections.abc import Callable

import pyfuse3
import trio

from umbra.errors import ServeError, UmbraError
from umbra.frontends.exports import BlockExport

ROOT = pyfuse3.ROOT_INODE
FIRST_INODE = 2
FUSE_WORKERS = 16
Exports = Callable[[], dict[str, BlockExport]]


class _Ops(pyfuse3.Operations):
    def __init__(self, exports: Exports) -> None:
        super().__init__()
        self.exports = exports
        self.current: dict[int, BlockExport] = {}  # inode -> export (inodes never reused while mounted)
        self.inodes: dict[str, int] = {}  # export name -> inode
        self.next_inode = FIRST_INODE
        self.lock = threading.Lock()
        self.started_ns = time.time_ns()

    # --- names -------------------------------------------------------------------------------

    def refresh(self) -> None:
        live = self.exports()
        with self.lock:
            for name in set(self.inodes) - set(live):
                del self.current[self.inodes.pop(name)]
            for name, export in live.items():
                if name not in self.inodes:
                    self.inodes[name] = self.next_inode
                    self.next_inode += 1
                self.current[self.inodes[name]] = export

    def _entries(self) -> list[tuple[str, int]]:
        with self.lock:
            return sorted(((f"{name}.img", ino) for name, ino in self.inodes.items()), key=lambda kv: kv[1])

    def _export(self, inode: int) -> BlockExport:
        with self.lock:
            export = self.current.get(inode)
        if export is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return export

    def _attr(self, inode: int) -> pyfuse3.EntryAttributes:
        attr = pyfuse3.EntryAttributes()
        attr.st_ino = pyfuse3.InodeT(inode)
        attr.st_uid, attr.st_gid = os.getuid(), os.getgid()
        attr.st_atime_ns = attr.st_mtime_ns = attr.st_ctime_ns = self.started_ns
        attr.entry_timeout = attr.attr_timeout = 1
        if inode == ROOT:
            attr.st_mode = pyfuse3.ModeT(stat.S_IFDIR | 0o755)
            attr.st_nlink = 2
            return attr
        export = self._export(inode)
        attr.st_mode = pyfuse3.ModeT(stat.S_IFREG | (0o400 if export.read_only else 0o600))
        attr.st_nlink = 1
        attr.st_size = export.size
        attr.st_blksize = 4096
        attr.st_blocks = -(-export.size // 512)
        return attr

    # --- handlers ----------------------------------------------------------------------------

    async def getattr(self, inode: pyfuse3.InodeT, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return self._attr(inode)

    async def lookup(
        self, parent_inode: pyfuse3.InodeT, name: pyfuse3.FileNameT, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        if parent_inode != ROOT:
            raise pyfuse3.FUSEError(errno.ENOENT)
        wanted = os.fsdecode(name)
        if wanted in (".", ".."):
            return self._attr(ROOT)
        for entry, inode in self._entries():
            if entry == wanted:
                return self._attr(inode)
        raise pyfuse3.FUSEError(errno.ENOENT)

    async def opendir(self, inode: pyfuse3.InodeT, ctx: pyfuse3.RequestContext) -> pyfuse3.FileHandleT:
        if inode != ROOT:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        return pyfuse3.FileHandleT(inode)

    async def readdir(self, fh: pyfuse3.FileHandleT, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        for index, (name, inode) in enumerate(self._entries()):
            if index < start_id:
                continue
            if not pyfuse3.readdir_reply(token, pyfuse3.FileNameT(os.fsencode(name)), self._attr(inode), index + 1):
                return

    async def open(self, inode: pyfuse3.InodeT, flags: pyfuse3.FlagT, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        export = self._export(inode)
        if export.read_only and flags & (os.O_WRONLY | os.O_RDWR | os.O_TRUNC):
            raise pyfuse3.FUSEError(errno.EROFS)
        if flags & os.O_TRUNC:
            raise pyfuse3.FUSEError(errno.EPERM)
        return pyfuse3.FileInfo(fh=pyfuse3.FileHandleT(inode), direct_io=True)

    async def read(self, fh: pyfuse3.FileHandleT, off: int, size: int) -> bytes:
        export = self._export(fh)
        size = max(0, min(size, export.size - off))
        if size == 0:
            return b""
        try:
            return await trio.to_thread.run_sync(export.read, off, size)
        except UmbraError as exc:
            raise pyfuse3.FUSEError(exc.errno) from exc
        except OSError as exc:
            raise pyfuse3.FUSEError(exc.errno or errno.EIO) from exc

    async def write(self, fh: pyfuse3.FileHandleT, off: int, buf: bytes) -> int:
        export = self._export(fh)
        if export.read_only:
            raise pyfuse3.FUSEError(errno.EROFS)
        if off + len(buf) > export.size:
            raise pyfuse3.FUSEError(errno.ENOSPC)
        try:
            await trio.to_thread.run_sync(export.write, off, buf, False)
        except UmbraError as exc:
            raise pyfuse3.FUSEError(exc.errno) from exc
        except OSError as exc:
            raise pyfuse3.FUSEError(exc.errno or errno.EIO) from exc
        return len(buf)

    async def fsync(self, fh: pyfuse3.FileHandleT, datasync: bool) -> None:
        export = self._export(fh)
        if not export.read_only:
            await trio.to_thread.run_sync(export.flush)

    async def flush(self, fh: pyfuse3.FileHandleT) -> None:
        return None  # close(2) is not a durability point; fsync is

    async def release(self, fh: pyfuse3.FileHandleT) -> None:
        return None  # file handles are inode numbers: nothing to free

    async def releasedir(self, fh: pyfuse3.FileHandleT) -> None:
        return None

    async def setattr(
        self,
        inode: pyfuse3.InodeT,
        attr: pyfuse3.EntryAttributes,
        fields: pyfuse3.SetattrFields,
        fh: pyfuse3.FileHandleT | None,
        ctx: pyfuse3.RequestContext,
    ) -> pyfuse3.EntryAttributes:
        if fields.update_size and inode != ROOT and attr.st_size != self._export(inode).size:
            raise pyfuse3.FUSEError(errno.EPERM)  # a block file has the volume's size
        return self._attr(inode)

    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        st = pyfuse3.StatvfsData()
        st.f_bsize = st.f_frsize = 4096
        with self.lock:
            st.f_blocks = sum(-(-e.size // 4096) for e in self.current.values())
        st.f_files = len(self._entries())
        st.f_namemax = 255
        return st


class FuseMount:
    """One pyfuse3 mount served from a thread of its own (pyfuse3 allows one per process)."""

    def __init__(
        self, ops: pyfuse3.Operations, directory: os.PathLike[str] | str, name: str, read_only: bool = False
    ) -> None:
        self.ops = ops
        self.name = name  # the mount's fsname (and, for block files, the default export)
        self.directory = os.fspath(directory)
        self.read_only = read_only
        self._thread: threading.Thread | None = None
        self._token: trio.lowlevel.TrioToken | None = None
        self._started = threading.Event()
        self._error: BaseException | None = None

    def _prepare(self) -> None:
        """Runs just before the loop starts (block files list their exports here)."""

    def start(self) -> None:
        os.makedirs(self.directory, exist_ok=True)
        options = set(pyfuse3.default_options) | {f"fsname=umbra-{self.name}", "subtype=umbra"}
        if self.read_only:
            options.add("ro")
        try:
            pyfuse3.init(self.ops, self.directory, options)
        except RuntimeError as exc:
            raise ServeError(name=self.name, reason=f"cannot mount FUSE at {self.directory}: {exc}") from exc
        self._prepare()
        self._thread = threading.Thread(target=self._run, name="umbra-fuse", daemon=True)
        self._thread.start()
        self._started.wait()
        if self._error is not None:
            raise ServeError(name=self.name, reason=f"FUSE failed: {self._error}")

    def _run(self) -> None:
        async def main() -> None:
            self._token = trio.lowlevel.current_trio_token()
            self._started.set()
            await pyfuse3.main(min_tasks=4, max_tasks=FUSE_WORKERS)

        try:
            trio.run(main)
        except BaseException as exc:  # noqa: BLE001 - reported by start() or stop()
            self._error = exc
            self._started.set()

    @property
    def running(self) -> bool:
        """False once the FUSE loop has ended (for example after ``umount`` from outside)."""
        return self._thread is not None and self._thread.is_alive()

    def stop(self) -> None:
        if self._token is not None and self._thread is not None and self._thread.is_alive():
            with contextlib.suppress(trio.RunFinishedError):  # it ended on its own meanwhile
                trio.from_thread.run_sync(pyfuse3.terminate, trio_token=self._token)
            self._thread.join(timeout=30)
        try:
            pyfuse3.close(unmount=True)
        except (RuntimeError, OSError):
            subprocess.run(["umount", "-l", self.directory], capture_output=True, check=False)
        self._token = None


class FuseBlockFiles(FuseMount):
    """Block files ``DIR/NAME.img`` of the exports; optionally the default one loop-attached."""

    def __init__(self, exports: Exports, directory: os.PathLike[str] | str, name: str) -> None:
        self.block_ops = _Ops(exports)
        super().__init__(self.block_ops, directory, name)
        self.loop_device: str | None = None

    def image_path(self, export: str | None = None) -> str:
        return os.path.join(self.directory, f"{export or self.name}.img")

    def _prepare(self) -> None:
        self.block_ops.refresh()

    def refresh(self) -> None:
        self.block_ops.refresh()
        if self._token is not None:  # drop the kernel's cached directory listing
            trio.from_thread.run_sync(self._invalidate, trio_token=self._token)

    def _invalidate(self) -> None:
        with contextlib.suppress(OSError):  # nothing cached yet
            pyfuse3.invalidate_inode(ROOT, attr_only=False)

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

    def stop(self) -> None:
        if self.loop_device is not None:
            subprocess.run(["losetup", "-d", self.loop_device], capture_output=True, check=False)
            self.loop_device = None
        super().stop()
