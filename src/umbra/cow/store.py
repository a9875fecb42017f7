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
from typing import Any

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

    def persist(self) -> dict[str, Any]:
        """Move every copy to the spill file, make it durable, and describe it (for a restart)."""
        with self._lock:
            for slot, data in list(self._memory.items()):
                self._spilled[slot] = self._spill(data)
            self._memory.clear()
            self._memory_bytes = 0
            if self._spill_fd is not None:
                os.fsync(self._spill_fd)
            return {
                "chunk_size": self.chunk_size,
                "slots": {str(slot): [offset, self._refs[slot]] for slot, offset in self._spilled.items()},
                "next": self._next,
                "spill_end": self._spill_end,
                "free": list(self._free_offsets),
            }

    @classmethod
    def reopen(cls, index: dict[str, Any], spill_dir: Path, memory_limit: int, limit: int) -> DifferenceStore:
        """The store :meth:`persist` described, its copies read from the spill file on demand."""
        store = cls(int(index["chunk_size"]), spill_dir, memory_limit, limit)
        assert store._spill_path is not None
        if index["slots"]:
            store._spill_fd = os.open(store._spill_path, os.O_RDWR | os.O_CLOEXEC)
        for slot, (offset, refs) in index["slots"].items():
            store._spilled[int(slot)] = int(offset)
            store._refs[int(slot)] = int(refs)
        store._next = int(index["next"])
        store._spill_end = int(index["spill_end"])
        store._free_offsets = [int(o) for o in index["free"]]
        return store

    def close(self, keep: bool = False) -> None:
        """Close the spill file; delete it unless ``keep`` (after :meth:`persist`)."""
        if self._spill_fd is not None:
            os.close(self._spill_fd)
            self._spill_fd = None
        if self._spill_path is not None and not keep:
            self._spill_path.unlink(missing_ok=True)
