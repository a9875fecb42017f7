"""Read a filesystem inside a block view without mounting it: names, metadata and file data.

The Sleuth Kit (pytsk3) parses the filesystem (ext2/3/4, FAT, exFAT, NTFS, HFS+, ISO 9660, UFS)
through a reader callable, so only the blocks it needs are read.  What it does not expose on ext4,
extended attributes (POSIX ACLs included) and device numbers, is read from the inode itself
(:mod:`umbra.volume.ext4`).  Nothing here trusts the image: names that could not be a single path
component are reported and skipped by the caller, and every parse failure becomes
:class:`FileSystemError`.
"""

from __future__ import annotations

import logging
import stat
import struct
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytsk3

from umbra.errors import FileSystemError
from umbra.volume import ext4, jbd2
from umbra.volume.extents import merge

log = logging.getLogger(__name__)
Reader = Callable[[int, int], bytes]
READ_CHUNK = 1 << 20
OPEN_FILES = 64

_KIND = {
    pytsk3.TSK_FS_META_TYPE_REG: "file",
    pytsk3.TSK_FS_META_TYPE_DIR: "dir",
    pytsk3.TSK_FS_META_TYPE_LNK: "symlink",
    pytsk3.TSK_FS_META_TYPE_FIFO: "fifo",
    pytsk3.TSK_FS_META_TYPE_CHR: "char",
    pytsk3.TSK_FS_META_TYPE_BLK: "block",
    pytsk3.TSK_FS_META_TYPE_SOCK: "socket",
}
KIND_MODE = {
    "file": stat.S_IFREG,
    "dir": stat.S_IFDIR,
    "symlink": stat.S_IFLNK,
    "fifo": stat.S_IFIFO,
    "char": stat.S_IFCHR,
    "block": stat.S_IFBLK,
    "socket": stat.S_IFSOCK,
}
_TYPE_NAMES = {
    int(getattr(pytsk3, name)): name.removeprefix("TSK_FS_TYPE_").lower()
    for name in dir(pytsk3)
    if name.startswith("TSK_FS_TYPE_") and not name.endswith(("_DETECT", "_ENUM"))
}
_DETECT_ORDER = [
    pytsk3.TSK_FS_TYPE_EXT_DETECT,
    pytsk3.TSK_FS_TYPE_NTFS_DETECT,
    pytsk3.TSK_FS_TYPE_FAT_DETECT,
    pytsk3.TSK_FS_TYPE_HFS_DETECT,
    pytsk3.TSK_FS_TYPE_ISO9660_DETECT,
    pytsk3.TSK_FS_TYPE_FFS_DETECT,
    pytsk3.TSK_FS_TYPE_APFS_DETECT,
]
TSK_ERRORS = (OSError, RuntimeError)  # its own errors; what the image's reader raised
_DATA_ATTRS = {int(pytsk3.TSK_FS_ATTR_TYPE_DEFAULT), int(pytsk3.TSK_FS_ATTR_TYPE_NTFS_DATA)}
_WHOLE_READ = int(pytsk3.TSK_FS_ATTR_COMP) | int(pytsk3.TSK_FS_ATTR_ENC)
_EXT_TYPES = {pytsk3.TSK_FS_TYPE_EXT2, pytsk3.TSK_FS_TYPE_EXT3, pytsk3.TSK_FS_TYPE_EXT4}


@dataclass
class Entry:
    """One directory entry with its inode's metadata; ``name`` is the raw bytes from the image."""

    path: bytes  # absolute, b"/" separated
    name: bytes
    inode: int
    kind: str  # file, dir, symlink, fifo, char, block, socket
    mode: int  # permission bits incl. setuid/setgid/sticky
    uid: int
    gid: int
    size: int
    nlink: int
    atime_ns: int
    mtime_ns: int
    ctime_ns: int
    link_target: bytes = b""
    rdev: tuple[int, int] = (0, 0)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def st_mode(self) -> int:
        return KIND_MODE[self.kind] | self.mode

    def to_dict(self) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "path": self.path.decode(errors="surrogateescape"),
            "name": self.name.decode(errors="surrogateescape"),
            "type": self.kind,
            "mode": f"{self.mode:04o}",
            "uid": self.uid,
            "gid": self.gid,
            "size": self.size,
            "nlink": self.nlink,
            "inode": self.inode,
            "mtime_ns": self.mtime_ns,
        }
        if self.kind == "symlink":
            doc["target"] = self.link_target.decode(errors="surrogateescape")
        if self.kind in ("char", "block"):
            doc["rdev"] = list(self.rdev)
        return doc


class _ReaderImage(pytsk3.Img_Info):  # type: ignore[misc]
    """A pytsk3 image over a reader callable (a point view, a file, a snapshot)."""

    def __init__(self, read: Reader, size: int) -> None:
        self._read, self._size = read, size
        super().__init__(url="", type=pytsk3.TSK_IMG_TYPE_EXTERNAL)

    def read(self, offset: int, size: int) -> bytes:
        return self._read(offset, size)

    def get_size(self) -> int:
        return self._size


def safe_name(name: bytes) -> bool:
    """Could ``name`` be one path component (what a listing may show or extract may create)?"""
    return bool(name) and name not in (b".", b"..") and b"/" not in name and b"\0" not in name


def _ns(seconds: int, nanos: int) -> int:
    return int(seconds) * 1_000_000_000 + int(nanos)


class FileTree(ABC):
    """A filesystem tree to read: :class:`FileSystem` here, or a parser in a process of its own
    (:class:`umbra.engine.parser_process.ParserProcess`).  ``lookup`` and ``read_file`` are
    derived from the rest."""

    label: str
    type_name: str
    root_inode: int

    @abstractmethod
    def root(self) -> Entry: ...

    @abstractmethod
    def children(self, directory: Entry) -> Iterable[Entry]:
        """The allocated entries of a directory, without ``.`` and ``..``."""

    @abstractmethod
    def data_ranges(self, entry: Entry) -> list[tuple[int, int]] | None: ...

    @abstractmethod
    def read_at(self, entry: Entry, offset: int, size: int) -> bytes: ...

    @abstractmethod
    def xattrs(self, entry: Entry) -> list[tuple[bytes, bytes]]: ...

    def lookup(self, path: str | bytes) -> Entry:
        """The entry at an absolute path (symlinks are not followed)."""
        raw = path.encode(errors="surrogateescape") if isinstance(path, str) else path
        entry = self.root()
        for part in [p for p in raw.split(b"/") if p and p != b"."]:
            if entry.kind != "dir":
                raise FileSystemError(
                    point=self.label, reason=f"{entry.path.decode(errors='replace')} is not a directory"
                )
            found = next((c for c in self.children(entry) if c.name == part), None)
            if found is None:
                shown = raw.decode(errors="replace")
                raise FileSystemError(point=self.label, reason=f"no such file or directory: {shown}")
            entry = found
        return entry

    def read_file(self, entry: Entry) -> Iterator[tuple[int, bytes]]:
        """(offset, data) chunks of a regular file, in order.  Where :meth:`data_ranges` knows the
        file's runs only the ranges they map are read and holes are left out (a file that claims a
        terabyte and maps nothing costs nothing); elsewhere holes come back as zeros."""
        ranges = self.data_ranges(entry)
        for start, end in [(0, entry.size)] if ranges is None else ranges:
            offset = start
            while offset < end:
                n = min(READ_CHUNK, end - offset)
                data = self.read_at(entry, offset, n)
                if len(data) != n:
                    shown = entry.path.decode(errors="replace")
                    reason = f"{shown} is shorter than its size ({offset + len(data)} bytes)"
                    raise FileSystemError(point=self.label, reason=reason)
                yield offset, data
                offset += n


class FileSystem(FileTree):
    """A read-only filesystem inside a block view.

    Raises:
        FileSystemError: no filesystem that can be read, or damage found while reading.
    """

    def __init__(self, read: Reader, size: int, label: str) -> None:
        self.label = label
        self._read = read
        self._fs = self._detect(_ReaderImage(read, size))
        self.type_name = _TYPE_NAMES.get(int(self._fs.info.ftype), "unknown")
        self._ext = self._fs.info.ftype in _EXT_TYPES
        self.journal_blocks = 0  # blocks read from the journal instead of their home (ext3/4)
        if self._ext:
            self._replay_journal(size)
        self._geo = ext4.read_geometry(self._read, size) if self._ext else None
        self.root_inode = int(self._fs.info.root_inum)
        self.bytes_read = 0
        self._open_files: dict[int, Any] = {}  # inode -> TSK file, for read_at

    def _replay_journal(self, size: int) -> None:
        """An ext3/4 image that needs recovery is read as a mount would see it: with its journal's
        committed blocks laid over their home locations (:mod:`umbra.volume.jbd2`)."""
        superblock = self._read(ext4.SUPERBLOCK_OFFSET, 1024)
        info = jbd2.journal_of(superblock)
        if not info.needs_recovery or not info.inode:
            return
        try:
            journal = self._fs.open_meta(inode=info.inode)
            geo = ext4.read_geometry(self._read, size)  # None on layouts it does not map: the low count then
            fs_blocks = geo.blocks_count if geo else struct.unpack_from("<I", superblock, 4)[0]

            def read_journal(offset: int, length: int) -> bytes:
                return bytes(journal.read_random(offset, length))

            replay = jbd2.scan(read_journal, int(journal.info.meta.size), fs_blocks)
        except (*TSK_ERRORS, struct.error) as exc:
            log.warning("%s: journal not replayed (%s): recent changes may be missing", self.label, exc)
            return
        if replay is None:
            return
        self._read = jbd2.ReplayedReader(self._read, read_journal, replay)
        self._fs = self._detect(_ReaderImage(self._read, size))
        self.journal_blocks = len(replay.copies)

    def _detect(self, image: _ReaderImage) -> Any:
        """Try each family in turn.  TSK's own all-type detection also probes for YAFFS2 (a flash
        filesystem), which reads hundreds of blocks of any volume that is not one."""
        for fstype in _DETECT_ORDER:
            try:
                return pytsk3.FS_Info(image, 0, fstype)
            except OSError:
                continue
            except RuntimeError as exc:  # the reader failed (pytsk3 wraps what a callback raises)
                raise FileSystemError(point=self.label, reason=f"cannot read the image: {exc}") from None
        kinds = "ext2/3/4, NTFS, FAT, exFAT, HFS+, ISO 9660, UFS, APFS"
        raise FileSystemError(point=self.label, reason=f"no filesystem that umbra can read ({kinds})")

    # --- entries -----------------------------------------------------------------------------

    def _entry(self, path: bytes, name: bytes, f: Any) -> Entry | None:
        meta = f.info.meta
        kind = _KIND.get(int(meta.type)) if meta is not None else None
        if kind is None:
            return None  # TSK's virtual entries ($OrphanFiles) and unknown types
        entry = Entry(
            path=path,
            name=name,
            inode=int(meta.addr),
            kind=kind,
            mode=int(meta.mode) & 0o7777,
            uid=int(meta.uid),
            gid=int(meta.gid),
            size=int(meta.size),
            nlink=int(meta.nlink),
            atime_ns=_ns(meta.atime, meta.atime_nano),
            mtime_ns=_ns(meta.mtime, meta.mtime_nano),
            ctime_ns=_ns(meta.ctime, meta.ctime_nano),
        )
        if kind == "symlink":
            entry.link_target = self._link(f, entry)
        elif kind in ("char", "block") and self._geo is not None:
            entry.rdev = ext4.device_number(self._raw_inode(entry.inode))
        return entry

    def _link(self, f: Any, entry: Entry) -> bytes:
        target = f.info.meta.link
        if isinstance(target, str):
            target = target.encode(errors="surrogateescape")
        if not target and entry.size:
            target = self._read_all(f, entry.size)  # a slow symlink: the target is the file's data
        return bytes(target or b"")

    def _read_all(self, f: Any, size: int) -> bytes:
        try:
            data = bytes(f.read_random(0, size))
        except TSK_ERRORS as exc:
            raise FileSystemError(point=self.label, reason=f"cannot read inode {f.info.meta.addr}: {exc}") from None
        self.bytes_read += len(data)
        return data

    def _open(self, inode: int) -> Any:
        try:
            return self._fs.open_meta(inode=inode)
        except TSK_ERRORS as exc:
            raise FileSystemError(point=self.label, reason=f"cannot open inode {inode}: {exc}") from None

    def root(self) -> Entry:
        entry = self._entry(b"/", b"/", self._open(self.root_inode))
        if entry is None or entry.kind != "dir":
            raise FileSystemError(point=self.label, reason="the root directory is damaged")
        return entry

    def children(self, directory: Entry) -> Iterator[Entry]:
        """The allocated entries of a directory, without ``.`` and ``..``."""
        try:
            d = self._fs.open_dir(inode=directory.inode)
        except TSK_ERRORS as exc:
            raise FileSystemError(point=self.label, reason=f"cannot read directory {directory.path!r}: {exc}") from None
        base = directory.path.rstrip(b"/")
        try:
            for f in d:
                name = bytes(f.info.name.name)
                if name in (b".", b"..") or not int(f.info.name.flags) & int(pytsk3.TSK_FS_NAME_FLAG_ALLOC):
                    continue
                entry = self._entry(base + b"/" + name, name, f)
                if entry is not None:
                    yield entry
        except TSK_ERRORS as exc:
            raise FileSystemError(point=self.label, reason=f"cannot read directory {directory.path!r}: {exc}") from None

    # --- data --------------------------------------------------------------------------------

    def data_ranges(self, entry: Entry) -> list[tuple[int, int]] | None:
        """The byte ranges of a regular file that its data runs map (not sparse), in order and
        within its size: ext2/3/4, NTFS (the unnamed ``$DATA``) and FAT/exFAT.  None for data
        kept in the inode or MFT record itself, and on filesystems whose runs are not read here."""
        block = int(self._fs.info.block_size)
        sparse = int(pytsk3.TSK_FS_ATTR_RUN_FLAG_SPARSE) | int(pytsk3.TSK_FS_ATTR_RUN_FLAG_FILLER)
        try:
            for attr in self._file(entry.inode):
                if int(attr.info.type) not in _DATA_ATTRS or attr.info.name:
                    continue  # metadata, or an NTFS named stream
                if int(attr.info.flags) & _WHOLE_READ or not int(attr.info.flags) & int(pytsk3.TSK_FS_ATTR_NONRES):
                    return None  # resident, or compressed (its "sparse" runs hold data) or encrypted
                return merge(
                    (int(run.offset) * block, min((int(run.offset) + int(run.len)) * block, entry.size))
                    for run in attr
                    if not int(run.flags) & sparse
                )
        except TSK_ERRORS as exc:
            reason = f"cannot map {entry.path.decode(errors='replace')}: {exc}"
            raise FileSystemError(point=self.label, reason=reason) from None
        return None

    def read_at(self, entry: Entry, offset: int, size: int) -> bytes:
        """Up to ``size`` bytes of a regular file at ``offset`` (random access, for FUSE)."""
        size = max(0, min(size, entry.size - offset))
        if size == 0:
            return b""
        f = self._file(entry.inode)
        try:
            data = bytes(f.read_random(offset, size))
        except TSK_ERRORS as exc:
            reason = f"cannot read {entry.path.decode(errors='replace')} at {offset}: {exc}"
            raise FileSystemError(point=self.label, reason=reason) from None
        self.bytes_read += len(data)
        return data

    def _file(self, inode: int) -> Any:
        """The TSK file of an inode, kept open for the next reads (a few dozen at most)."""
        f = self._open_files.get(inode)
        if f is None:
            f = self._open_files[inode] = self._open(inode)
            while len(self._open_files) > OPEN_FILES:
                self._open_files.pop(next(iter(self._open_files)))
        return f

    def xattrs(self, entry: Entry) -> list[tuple[bytes, bytes]]:
        """Extended attributes as the xattr interface names them (ext2/3/4 only; none elsewhere)."""
        if self._geo is None:
            return []
        out = []
        try:
            for name, value in ext4.inode_xattrs(self._read, self._geo, self._raw_inode(entry.inode), entry.inode):
                if isinstance(value, int):  # the value lives in an inode of its own
                    f = self._open(value)
                    value = self._read_all(f, int(f.info.meta.size))
                if name.startswith(b"system.posix_acl_"):
                    value = ext4.acl_to_xattr(value)
                out.append((name, value))
        except ValueError as exc:
            raise FileSystemError(point=self.label, reason=str(exc)) from None
        return out

    def _raw_inode(self, inode: int) -> bytes:
        assert self._geo is not None
        try:
            return ext4.read_inode(self._read, self._geo, inode)
        except ValueError as exc:
            raise FileSystemError(point=self.label, reason=str(exc)) from None
