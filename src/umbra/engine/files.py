"""File-level restore from an image point without mounting it: list and extract files.

The filesystem is read through a :class:`PointView`, so only the blocks its metadata and the
chosen files occupy are fetched from the repository.  Extraction never leaves DEST: every name is
checked to be one path component, every file and directory is created relative to an open
directory descriptor with ``O_NOFOLLOW``/``O_EXCL``, and nothing that exists is overwritten or
followed.  Ownership is restored when running as root; extended attributes when the target
filesystem accepts them (what it refuses is reported, not fatal).

:func:`list_files` and :func:`extract_files` are what ``ls`` and ``extract`` do; the CLI resolves
the point (:func:`open_image`) and hands them the filesystem as a parser in a confined process of
its own (:mod:`umbra.engine.parser_process`), since it came from the backed-up machine: the walk
and every write into DEST stay here, the parsing happens there.  The fuzzing harness runs them on
an in-process :class:`FileSystem` in a forked child instead (:mod:`umbra.engine.isolated`), where
``tick`` reports progress: an entry, file data, or a part of the image not read before.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from umbra.errors import ExtractError, FileSystemError
from umbra.repo.manifest import Point
from umbra.repo.repository import Repository
from umbra.repo.view import BlockView, open_state
from umbra.volume import btrfs_send
from umbra.volume.blockio import pwrite_all
from umbra.volume.filesystem import Entry, FileSystem, FileTree, safe_name

MAX_DEPTH = 4096
WATCH_CHUNK = 64 * 1024  # granularity of "a part of the image not read before"
Tick = Callable[[], None]


class NewReads:
    """A reader that calls ``tick`` when a read touches a chunk of the image for the first time
    (re-reading the same blocks, as a parser caught in a loop does, is no progress)."""

    def __init__(self, read: Callable[[int, int], bytes], size: int, tick: Tick) -> None:
        self._read, self._tick = read, tick
        self._chunks = -(-size // WATCH_CHUNK)
        self._seen = bytearray(-(-self._chunks // 8))

    def __call__(self, offset: int, length: int) -> bytes:
        data = self._read(offset, length)
        last = min((offset + max(length, 1) - 1) // WATCH_CHUNK, self._chunks - 1)
        for chunk in range(offset // WATCH_CHUNK, last + 1):
            byte, bit = divmod(chunk, 8)
            if not self._seen[byte] >> bit & 1:
                self._seen[byte] |= 1 << bit
                self._tick()
        return data


@dataclass
class PointImage:
    """The volume image of a point (or VOLUME@TIME), resolved and ready to be read."""

    ref: str
    point: Point
    view: BlockView

    @property
    def label(self) -> str:
        return f"{self.ref} (point {self.point.short_id} of {self.point.volume})"

    def filesystem(self, tick: Tick | None = None) -> FileSystem:
        """The filesystem, parsed in this process (the commands use a parser process instead)."""
        read = self.view.read if tick is None else NewReads(self.view.read, self.view.size, tick)
        return FileSystem(read, self.view.size, self.label)


def open_image(repo: Repository, ref: str) -> PointImage:
    """Resolve ``ref`` and load the index: the repository's part of the work, done before the
    parser starts, so that its first read does not wait for the whole index."""
    inst, view = open_state(repo, ref)
    point = inst.point
    if point.content == btrfs_send.CONTENT:
        raise FileSystemError(
            point=ref, reason="a btrfs subvolume stored as its send stream: `umbra restore` it into a btrfs directory"
        )
    repo.index  # noqa: B018 - loaded now
    return PointImage(ref, point, view)


def open_filesystem(repo: Repository, ref: str) -> tuple[Point, BlockView, FileSystem]:
    """The filesystem inside the state that ``ref`` names (a point, or VOLUME@TIME)."""
    image = open_image(repo, ref)
    return image.point, image.view, image.filesystem()


def list_entries(fs: FileTree, path: str = "/", recursive: bool = False, tick: Tick | None = None) -> list[Entry]:
    """What ``ls`` shows: the entries of directory ``path`` (or everything below it), or the one
    entry ``path`` names; sorted by path."""
    top = fs.lookup(path)
    if top.kind != "dir":
        return [top]
    entries = []
    for entry in walk(fs, top) if recursive else fs.children(top):
        entries.append(entry)
        if tick is not None:
            tick()
    if recursive:
        entries = entries[1:]  # (top itself)
    return sorted(entries, key=lambda e: e.path)


def list_files(image: PointImage, fs: FileTree, path: str = "/", recursive: bool = False) -> dict[str, Any]:
    """What ``ls`` shows: ``{"point", "filesystem", "entries": [describe(entry), ...]}``."""
    entries = list_entries(fs, path, recursive)
    return {"point": image.point.id, "filesystem": fs.type_name, "entries": [describe(e) for e in entries]}


def extract_files(image: PointImage, fs: FileTree, path: str, dest: str) -> dict[str, Any]:
    """What ``extract`` did, and what it read of which point."""
    point = image.point
    result = extract(fs, path, dest)
    return {
        "point": point.id,
        "short_id": point.short_id,
        "volume": point.volume,
        "size": point.size,
        "counts": result.counts,
        "bytes_written": result.bytes_written,
        "bytes_fetched": image.view.bytes_fetched,
        "warnings": result.warnings,
    }


def walk(fs: FileTree, top: Entry) -> Iterator[Entry]:
    """``top`` and everything below it, depth first; a directory met twice (a loop in a damaged
    image) is not entered again."""
    seen = {top.inode}
    stack = [iter([top])]
    while stack:
        entry = next(stack[-1], None)
        if entry is None:
            stack.pop()
            continue
        yield entry
        if entry.kind == "dir" and (entry is top or entry.inode not in seen) and len(stack) < MAX_DEPTH:
            seen.add(entry.inode)
            stack.append(iter(fs.children(entry)))


def _data_runs(data: bytes, page: int = 4096) -> Iterator[tuple[int, int]]:
    """(start, stop) of the runs of pages in ``data`` that are not all zeros."""
    start = None
    for pos in range(0, len(data), page):
        chunk = data[pos : pos + page]
        if chunk.count(0) == len(chunk):
            if start is not None:
                yield start, pos
                start = None
        elif start is None:
            start = pos
    if start is not None:
        yield start, len(data)


@dataclass
class ExtractResult:
    counts: dict[str, int] = field(default_factory=dict)
    bytes_written: int = 0
    warnings: list[str] = field(default_factory=list)

    def count(self, kind: str) -> None:
        self.counts[kind] = self.counts.get(kind, 0) + 1


class _Extractor:
    def __init__(self, fs: FileTree, dest: str, owners: bool, tick: Tick | None = None) -> None:
        self.fs = fs
        self.tick = tick or _no_progress
        self.dest = dest
        self.owners = owners
        self.result = ExtractResult()
        self.links: dict[int, bytes] = {}  # inode -> path below DEST of its first copy
        self.dest_fd = -1

    def warn(self, message: str) -> None:
        self.result.warnings.append(message)

    def shown(self, rel: bytes) -> str:
        return os.path.join(self.dest, rel.decode(errors="replace"))

    # --- the walk ------------------------------------------------------------------------------

    def run(self, top: Entry) -> ExtractResult:
        os.makedirs(self.dest, exist_ok=True)
        self.dest_fd = os.open(self.dest, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            if top.inode == self.fs.root_inode:
                self._directory_contents(self.dest_fd, b"", top, 0, {top.inode})
            else:
                self._one(self.dest_fd, b"", top, 0, set())
        finally:
            os.close(self.dest_fd)
        return self.result

    def _directory_contents(self, dir_fd: int, rel: bytes, directory: Entry, depth: int, seen: set[int]) -> None:
        names: set[bytes] = set()
        for child in self.fs.children(directory):
            if child.name in names:  # only a damaged or crafted directory has these
                self.warn(f"skipped a second entry named {child.name!r} in {directory.path!r}")
                continue
            names.add(child.name)
            self._one(dir_fd, rel, child, depth + 1, seen)

    def _one(self, dir_fd: int, parent_rel: bytes, entry: Entry, depth: int, seen: set[int]) -> None:
        self.tick()
        if not safe_name(entry.name):
            self.warn(f"skipped an entry with an unsafe name {entry.name!r} in {entry.path[: -len(entry.name)]!r}")
            return
        rel = parent_rel + b"/" + entry.name if parent_rel else entry.name
        if entry.kind == "dir":
            if entry.inode in seen or depth > MAX_DEPTH:
                self.warn(f"skipped {entry.path!r}: a directory loop in the image")
                return
            self._dir(dir_fd, rel, entry, depth, seen | {entry.inode})
            return
        if entry.nlink > 1 and entry.inode in self.links:
            self._hardlink(dir_fd, rel, entry)
            return
        handler = {"file": self._file, "symlink": self._symlink}.get(entry.kind, self._special)
        if handler(dir_fd, rel, entry) and entry.nlink > 1:
            self.links[entry.inode] = rel

    # --- kinds ---------------------------------------------------------------------------------

    def _dir(self, dir_fd: int, rel: bytes, entry: Entry, depth: int, seen: set[int]) -> None:
        with contextlib.suppress(FileExistsError):  # merged into an existing directory, never
            os.mkdir(entry.name, 0o700, dir_fd=dir_fd)  # through a symlink (O_NOFOLLOW below)
        try:
            fd = os.open(entry.name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
        except OSError as exc:
            raise ExtractError(path=self.shown(rel), reason=f"exists and is not a directory ({exc.strerror})") from None
        try:
            self._directory_contents(fd, rel, entry, depth, seen)
            self._metadata(fd, rel, entry)
        finally:
            os.close(fd)
        self.result.count("directories")

    def _file(self, dir_fd: int, rel: bytes, entry: Entry) -> bool:
        fd = self._create(dir_fd, rel, entry)
        try:
            try:
                for offset, data in self.fs.read_file(entry):
                    self.tick()
                    for start, stop in _data_runs(data):  # all-zero pages stay holes
                        pwrite_all(fd, memoryview(data)[start:stop], offset + start)
                        self.result.bytes_written += stop - start
                os.ftruncate(fd, entry.size)
            except OSError as exc:  # a full disk, most likely: one line naming the file
                raise ExtractError(path=self.shown(rel), reason=exc.strerror or str(exc)) from None
            self._metadata(fd, rel, entry)
        finally:
            os.close(fd)
        self.result.count("files")
        return True

    def _create(self, dir_fd: int, rel: bytes, entry: Entry) -> int:
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            return os.open(entry.name, flags, 0o600, dir_fd=dir_fd)
        except FileExistsError:
            raise ExtractError(path=self.shown(rel), reason="it exists; extract into an empty directory") from None
        except OSError as exc:
            raise ExtractError(path=self.shown(rel), reason=exc.strerror or str(exc)) from None

    def _symlink(self, dir_fd: int, rel: bytes, entry: Entry) -> bool:
        try:
            os.symlink(entry.link_target, entry.name, dir_fd=dir_fd)
        except FileExistsError:
            raise ExtractError(path=self.shown(rel), reason="it exists; extract into an empty directory") from None
        self._path_metadata(dir_fd, rel, entry)
        self.result.count("symlinks")
        return True

    def _special(self, dir_fd: int, rel: bytes, entry: Entry) -> bool:
        if entry.kind == "socket":
            self.warn(f"skipped socket {self.shown(rel)} (sockets are made by the programs that listen on them)")
            return False
        if entry.kind in ("char", "block") and os.geteuid() != 0:
            self.warn(f"skipped device {self.shown(rel)}: only root can create device nodes")
            return False
        try:
            if entry.kind == "fifo":
                os.mkfifo(entry.name, 0o600, dir_fd=dir_fd)
            else:
                os.mknod(entry.name, 0o600 | entry.st_mode & ~0o7777, os.makedev(*entry.rdev), dir_fd=dir_fd)
        except FileExistsError:
            raise ExtractError(path=self.shown(rel), reason="it exists; extract into an empty directory") from None
        self._path_metadata(dir_fd, rel, entry)
        self.result.count("special files")
        return True

    def _hardlink(self, dir_fd: int, rel: bytes, entry: Entry) -> None:
        first = self.links[entry.inode]
        try:
            os.link(first, entry.name, src_dir_fd=self.dest_fd, dst_dir_fd=dir_fd, follow_symlinks=False)
        except FileExistsError:
            raise ExtractError(path=self.shown(rel), reason="it exists; extract into an empty directory") from None
        self.result.count("hard links")

    # --- metadata ------------------------------------------------------------------------------

    def _metadata(self, fd: int, rel: bytes, entry: Entry) -> None:
        """Owner, then mode (chown clears setuid bits), xattrs, and times last."""
        if self.owners:
            os.fchown(fd, entry.uid, entry.gid)
        os.fchmod(fd, entry.mode)
        for name, value in self.fs.xattrs(entry):
            self._setxattr(fd, rel, name, value)
        os.utime(fd, ns=(entry.atime_ns, entry.mtime_ns))

    def _path_metadata(self, dir_fd: int, rel: bytes, entry: Entry) -> None:
        """The same for symlinks and special files, which cannot be opened for it."""
        if self.owners:
            os.chown(entry.name, entry.uid, entry.gid, dir_fd=dir_fd, follow_symlinks=False)
        if entry.kind != "symlink":
            os.chmod(entry.name, entry.mode, dir_fd=dir_fd, follow_symlinks=False)
        proc_path = os.fsencode(f"/proc/self/fd/{dir_fd}/") + entry.name
        for name, value in self.fs.xattrs(entry):
            self._setxattr(proc_path, rel, name, value)
        os.utime(entry.name, ns=(entry.atime_ns, entry.mtime_ns), dir_fd=dir_fd, follow_symlinks=False)

    def _setxattr(self, target: int | bytes, rel: bytes, name: bytes, value: bytes) -> None:
        try:
            if isinstance(target, int):
                os.setxattr(target, name, value)
            else:
                os.setxattr(target, name, value, follow_symlinks=False)
        except OSError as exc:
            if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EACCES, errno.EINVAL):
                raise
            self.warn(f"{self.shown(rel)}: extended attribute {name.decode(errors='replace')} not set ({exc.strerror})")


def extract(fs: FileTree, path: str, dest: str, owners: bool | None = None, tick: Tick | None = None) -> ExtractResult:
    """Extract ``path`` (a file, or a directory with everything below it) into directory ``dest``:
    ``/`` extracts the filesystem's contents into ``dest``, anything else becomes ``dest/NAME``.

    Raises:
        FileSystemError (unreadable image, no such path), ExtractError (a target exists or cannot be made).
    """
    top = fs.lookup(path)
    extractor = _Extractor(fs, dest, os.geteuid() == 0 if owners is None else owners, tick)
    return extractor.run(top)


def _no_progress() -> None:
    """(Nobody is watching.)"""


def describe(entry: Entry) -> dict[str, Any]:
    doc = entry.to_dict()
    doc["mode_string"] = stat.filemode(entry.st_mode)
    return doc
