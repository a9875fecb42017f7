"""Physical extents of a file (FIEMAP), to leave files such as swap or caches out of an image.

Called while the filesystem is frozen, so the extents cannot move before the snapshot; the
FIEMAP_FLAG_SYNC flag is not used (a sync would block on the frozen filesystem; the freeze has
flushed everything already).
"""

from __future__ import annotations

import fcntl
import os
import struct

from umbra.errors import SourceError
from umbra.volume.extents import Extent, merge

FS_IOC_FIEMAP = 0xC020660B
_HEADER = struct.Struct("=QQIIII")  # start, length, flags, mapped (out), count (in), reserved
_EXTENT = struct.Struct("=QQQQQIIII")  # logical, physical, length, 2 reserved, flags, 3 reserved
FIEMAP_EXTENT_LAST = 0x1
FIEMAP_EXTENT_UNKNOWN = 0x2
FIEMAP_EXTENT_DATA_INLINE = 0x200
_BATCH = 256


def file_extents(path: str) -> list[Extent]:
    """Byte ranges of the device that hold ``path``'s data.

    Raises:
        SourceError: the file cannot be opened or mapped (FIEMAP unsupported, delayed allocation).
    """
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as exc:
        raise SourceError(path=path, reason=exc.strerror) from exc
    try:
        out: list[Extent] = []
        start = 0
        while True:
            buf = bytearray(_HEADER.pack(start, 2**64 - 1 - start, 0, 0, _BATCH, 0) + bytes(_EXTENT.size * _BATCH))
            fcntl.ioctl(fd, FS_IOC_FIEMAP, buf)
            mapped = _HEADER.unpack_from(buf)[3]
            last = False
            for i in range(mapped):
                logical, physical, length, _, _, flags, _, _, _ = _EXTENT.unpack_from(
                    buf, _HEADER.size + i * _EXTENT.size
                )
                if flags & (FIEMAP_EXTENT_UNKNOWN | FIEMAP_EXTENT_DATA_INLINE):
                    raise SourceError(path=path, reason="its extents are not on the device yet or are inline")
                out.append((physical, physical + length))
                start = logical + length
                last = bool(flags & FIEMAP_EXTENT_LAST)
            if last or mapped == 0:
                return merge(out)
    except OSError as exc:
        raise SourceError(path=path, reason=f"cannot map its extents: {exc.strerror}") from exc
    finally:
        os.close(fd)
