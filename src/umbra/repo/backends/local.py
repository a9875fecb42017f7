"""The local filesystem backend: the embedded default.

All writes go through :func:`atomic_write`: temporary file in the same directory, write, fsync,
rename, fsync the directory.  An fsync failure is fatal for the object (never retried, after
PostgreSQL's fsyncgate): the temporary file is removed and the error raised.

Large objects (packs) are written with O_DIRECT from a page-aligned copy: on this kind of VM,
copying into fresh page-cache pages was a fifth of a backup's CPU time (SPEC section 7), and a
pack is not read again soon.  Their unaligned end, small objects, and filesystems that refuse
O_DIRECT go through the page cache.
"""

from __future__ import annotations

import errno
import os
import threading
from collections.abc import Iterator
from pathlib import Path

from umbra.errors import RepositoryExists, RepositoryFull, RepositoryIOError
from umbra.repo.backends.base import DIRECTORIES, Backend, ObjectMissing, validate_name
from umbra.volume.blockio import open_direct, pwrite_all, pwrite_direct, staging_buffer, sync_path


def _io_error(name: str, exc: OSError) -> RepositoryIOError:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return RepositoryFull(name=name)
    return RepositoryIOError(name=name, reason=exc.strerror or str(exc))


DIRECT_MIN = 1 << 20  # objects at least this big are written with O_DIRECT
_staging = threading.local()  # each writing thread's page-aligned buffer


def atomic_write(path: Path, data: bytes, replace: bool = False) -> None:
    """Publish ``data`` at ``path`` atomically and durably.

    Raises:
        FileExistsError: ``path`` exists and ``replace`` is false.
        OSError: from the filesystem; the temporary file is gone afterwards.
    """
    if not replace and path.exists():
        raise FileExistsError(str(path))
    tmp = path.with_name(f".tmp-{path.name}-{os.getpid()}-{os.urandom(4).hex()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    direct_fd = open_direct(tmp) if len(data) >= DIRECT_MIN else None
    try:
        if direct_fd is not None:  # from a page-aligned copy
            buf = staging_buffer(_staging, -(-len(data) >> 20) << 20)  # whole MiB: reused by the next pack
            buf[: len(data)] = data
            with memoryview(buf) as view:
                pwrite_direct(direct_fd, fd, view[: len(data)], 0)
        else:
            pwrite_all(fd, data, 0)
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
    finally:
        if direct_fd is not None:
            os.close(direct_fd)
    os.close(fd)
    try:
        if replace:
            os.replace(tmp, path)
        else:
            # link() fails if the name exists: no silent overwrite even when two writers race.
            os.link(tmp, path)
            tmp.unlink()
        sync_path(path.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


class LocalBackend(Backend):
    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.root = Path(path)
        self.location = str(self.root)

    def _path(self, name: str) -> Path:
        return self.root / validate_name(name)

    def exists(self) -> bool:
        return (self.root / "config").is_file()

    def create(self) -> None:
        if self.root.exists() and any(self.root.iterdir()):
            raise RepositoryExists(location=self.location)
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            for d in DIRECTORIES:
                (self.root / d).mkdir()
            for i in range(256):
                (self.root / "data" / f"{i:02x}").mkdir()
            sync_path(self.root)
        except OSError as exc:
            raise _io_error(self.location, exc) from exc

    def load(self, name: str, offset: int = 0, length: int | None = None) -> bytes:
        path = self._path(name)
        try:
            with open(path, "rb", buffering=0) as f:
                if length is None:
                    f.seek(offset)
                    return f.read()
                return os.pread(f.fileno(), length, offset)
        except FileNotFoundError:
            raise ObjectMissing(name=name) from None
        except OSError as exc:
            raise _io_error(name, exc) from exc

    def store(self, name: str, data: bytes, replace: bool = False) -> None:
        try:
            path = self._path(name)
            if not path.parent.is_dir() and path.parent.parent == self.root:
                path.parent.mkdir()  # a directory newer than the repository (cdp/, verify/)
            atomic_write(path, data, replace=replace)
        except FileExistsError:
            raise
        except OSError as exc:
            raise _io_error(name, exc) from exc

    def delete(self, name: str) -> None:
        path = self._path(name)
        try:
            path.unlink()
            sync_path(path.parent)
        except FileNotFoundError:
            raise ObjectMissing(name=name) from None
        except OSError as exc:
            raise _io_error(name, exc) from exc

    def size(self, name: str) -> int:
        try:
            return self._path(name).stat().st_size
        except FileNotFoundError:
            raise ObjectMissing(name=name) from None

    def local_path(self) -> str | None:
        return str(self.root)

    def list(self, directory: str) -> Iterator[str]:
        assert directory in DIRECTORIES
        base = self.root / directory
        if not base.is_dir():
            return  # a directory newer than the repository (cdp/, verify/): nothing stored there yet
        subdirs = sorted(p for p in base.iterdir() if p.is_dir()) if directory == "data" else [base]
        for sub in subdirs:
            prefix = sub.relative_to(self.root).as_posix()
            for entry in sorted(os.listdir(sub)):
                if not entry.startswith("."):
                    yield f"{prefix}/{entry}"

    def remove_temporaries(self) -> int:
        """Delete temporary files that a crashed writer left behind; returns how many.

        Only safe under the exclusive lock; lock files' own temporaries are left alone.
        """
        count = 0
        dirs = [self.root, *(self.root / x for x in DIRECTORIES if x != "locks"), *(self.root / "data").iterdir()]
        for d in dirs:
            if d.is_dir():
                for p in d.glob(".tmp-*"):
                    p.unlink(missing_ok=True)
                    count += 1
        return count
