"""The difference store: old chunk contents kept for snapshots.

Copies live in memory up to ``memory_limit`` bytes and then spill to one file in the state
directory, whose freed slots are reused.  A copy is shared by every snapshot that needed it
(reference counted).  ``limit`` bounds memory plus spill: past it ``put`` raises
:class:`DifferenceStoreFull`, and the engine fails the snapshots that needed the copy, never the
write that caused it.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from pathlib import Path

from umbra.errors import DifferenceStoreFull


@dataclass
class StoreStats:
    copies: int
    memory_bytes: int
    spilled_bytes: int
    limit: int


class DifferenceStore:
    def __init__(
        self, chunk_size: int, spill_dir: Path | None, memory_limit: int = 256 << 20, limit: int = 64 << 30
    ) -> None:
        self.chunk_size = chunk_size
        self.memory_limit = memory_limit
        self.limit = limit
        self._lock = threading.Lock()
        self._memory: dict[int, bytes] = {}
        self._spilled: dict[int, int] = {}  # slot -> offset in the spill file
        self._refs: dict[int, int] = {}
        self._free_offsets: list[int] = []
        self._spill_end = 0
        self._next = 0
        self._memory_bytes = 0
        self._spill_path = spill_dir / "difference.spill" if spill_dir else None
        self._spill_fd: int | None = None

    def put(self, data: bytes, refs: int) -> int:
        """Keep ``data`` for ``refs`` snapshots; returns its slot."""
        with self._lock:
            used = self._memory_bytes + len(self._spilled) * self.chunk_size
            if used + len(data) > self.limit:
                raise DifferenceStoreFull(used=used, limit=self.limit)
            slot = self._next
            self._next += 1
            if self._memory_bytes + len(data) <= self.memory_limit or self._spill_path is None:
                self._memory[slot] = data
                self._memory_bytes += len(data)
            else:
                self._spilled[slot] = self._spill(data)
            self._refs[slot] = refs
            return slot

    def _spill(self, data: bytes) -> int:
        if self._spill_fd is None:
            assert self._spill_path is not None
            self._spill_fd = os.open(self._spill_path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        if self._free_offsets:
            offset = self._free_offsets.pop()
        else:
            offset, self._spill_end = self._spill_end, self._spill_end + self.chunk_size
        padded = data if len(data) == self.chunk_size else data.ljust(self.chunk_size, b"\0")
        os.pwrite(self._spill_fd, padded, offset)
        return offset

    def get(self, slot: int, length: int) -> bytes:
        with self._lock:
            data = self._memory.get(slot)
            if data is not None:
                return data
            offset = self._spilled[slot]
            assert self._spill_fd is not None
            fd = self._spill_fd
        return os.pread(fd, length, offset)

    def unref(self, slot: int) -> None:
        with self._lock:
            self._refs[slot] -= 1
            if self._refs[slot] > 0:
                return
            del self._refs[slot]
            data = self._memory.pop(slot, None)
            if data is not None:
                self._memory_bytes -= len(data)
            else:
                self._free_offsets.append(self._spilled.pop(slot))

    def stats(self) -> StoreStats:
        with self._lock:
            return StoreStats(len(self._refs), self._memory_bytes, len(self._spilled) * self.chunk_size, self.limit)

    def close(self) -> None:
        if self._spill_fd is not None:
            os.close(self._spill_fd)
            self._spill_fd = None
            if self._spill_path is not None:
                self._spill_path.unlink(missing_ok=True)
