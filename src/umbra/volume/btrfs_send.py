"""btrfs subvolumes as volumes: a read-only snapshot is read as its ``btrfs send`` stream, and a
stored stream is restored with ``btrfs receive``.

A subvolume is not a block device, so umbra stores the one byte stream that describes it
completely (files, metadata, xattrs, reflinks inside it) as the volume's content, cut into the
repository's fixed blocks like an image.  Restore pipes the blocks, in order, to ``btrfs receive``,
which recreates the subvolume (read-only, as sent) inside the target directory.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
from typing import IO

from umbra.errors import SourceReadError, TargetError
from umbra.volume.mounts import filesystem_of
from umbra.volume.sink import Target

CONTENT = "btrfs-send"  # Point.content of a volume stored as a send stream


def _stderr_file() -> IO[bytes]:
    return tempfile.TemporaryFile(prefix="umbra-btrfs-")


def _stderr_text(f: IO[bytes]) -> str:
    f.seek(0)
    return f.read().decode(errors="replace").strip()


def _failure(proc: subprocess.Popen[bytes], err: IO[bytes], command: str) -> str | None:
    """Wait for ``proc``; why it failed (its stderr, or its exit code), or None if it succeeded."""
    code = proc.wait()
    reason = _stderr_text(err)
    err.close()
    return None if code == 0 else reason or f"{command} exited {code}"


class SendStream:
    """``btrfs send`` of a read-only subvolume, read sequentially in blocks."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.offset = 0
        self._err = _stderr_file()
        self._proc = subprocess.Popen(["btrfs", "send", "-q", path], stdout=subprocess.PIPE, stderr=self._err)

    def read(self, length: int) -> bytes:
        """Up to ``length`` bytes; shorter only at the end of the stream."""
        assert self._proc.stdout is not None
        data = self._proc.stdout.read(length)
        self.offset += len(data)
        return data

    def close(self) -> None:
        """Wait for ``btrfs send``.

        Raises:
            SourceReadError: it failed (the stream is then incomplete).
        """
        if self._proc.stdout is not None:
            self._proc.stdout.close()
        failure = _failure(self._proc, self._err, "btrfs send")
        if failure is not None:
            raise SourceReadError(path=self.path, offset=self.offset, reason=failure)

    def kill(self) -> None:
        """Stop ``btrfs send`` if it still runs (a backup that failed or stopped early)."""
        self._proc.kill()  # nothing once it has exited and been waited for
        self._proc.wait()
        if self._proc.stdout is not None:
            self._proc.stdout.close()
        self._err.close()


class ReceiveTarget(Target):
    """``btrfs receive`` into a directory, fed the stream strictly in order."""

    ordered = True

    def __init__(self, directory: str) -> None:
        fs = filesystem_of(directory) if os.path.isdir(directory) else None
        if fs is None or fs.fstype != "btrfs":
            raise TargetError(path=directory, reason="a btrfs send stream restores into a directory on btrfs")
        self._err = _stderr_file()
        self._proc = subprocess.Popen(
            ["btrfs", "receive", directory], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=self._err
        )
        assert self._proc.stdin is not None
        super().__init__(directory, self._proc.stdin.fileno(), False)
        self.position = 0

    def write_at(self, offset: int, data: bytes | memoryview) -> None:
        if offset != self.position:
            raise TargetError(path=self.path, reason=f"stream written out of order at {offset}")
        assert self._proc.stdin is not None
        try:
            self._proc.stdin.write(data)
        except BrokenPipeError:
            self._proc.wait()
            raise TargetError(path=self.path, reason=_stderr_text(self._err) or "btrfs receive stopped") from None
        self.position += len(data)

    def zero_range(self, offset: int, length: int) -> None:
        while length > 0:
            n = min(length, 1 << 20)
            self.write_at(offset, bytes(n))
            offset, length = offset + n, length - n

    def finish(self) -> None:
        assert self._proc.stdin is not None
        self._proc.stdin.close()
        failure = _failure(self._proc, self._err, "btrfs receive")
        if failure is not None:
            raise TargetError(path=self.path, reason=failure)

    def abort(self) -> None:
        self._proc.kill()
        self._proc.wait()
        self._err.close()
