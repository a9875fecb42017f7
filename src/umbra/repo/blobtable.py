"""An open-addressing hash table of blob locations in one flat buffer.

A large repository lists tens of millions of blobs; a Python dict of them costs about 140 bytes a
blob (a bytes key, an int value, the dict's own slots).  Here a blob costs one SLOT of 44 bytes at
a load of at most MAX_LOAD, so about 60 bytes (borg's hashindex does the same in C).  Blob ids are
keyed BLAKE3 hashes, evenly spread, so their first eight bytes pick the slot directly; collisions go
to the next free slot (linear probing).  Lookups stay under a microsecond in pure Python.

Reads need no lock (every slot is written by one ``pack_into``, and a grown table replaces the old
one in one assignment); writers take the table's lock.
"""

from __future__ import annotations

import struct
import threading
from collections.abc import Iterable, Iterator

SLOT = struct.Struct("<32sIII")  # blob id, pack number << 2 | blob type, offset, length
TYPE_BITS = 2  # blob types are 1 and 2: a used slot's pack-and-type byte is never 0
MAX_TYPE = (1 << TYPE_BITS) - 1
MAX_PACKS = 1 << (32 - TYPE_BITS)
MAX_LOAD = 0.7
MIN_SLOTS = 64
_first_word = struct.Struct("<Q").unpack_from  # where a blob's probe starts (ids are evenly spread)
_KEY = 32
_SIZE = SLOT.size
_MARK = 32  # offset of the slot's first pack-and-type byte: 0 in an empty slot


class BlobTable:
    """blob id (32 bytes) → (pack number, blob type, offset, length); the first location added wins."""

    def __init__(self, capacity: int = 0) -> None:
        self._lock = threading.Lock()
        self._used = 0
        self._mem = bytearray()
        self._resize(_slots_for(capacity))

    @classmethod
    def from_buffer(cls, mem: bytearray, used: int) -> BlobTable:
        """A table over a buffer another table had (:attr:`buffer`), holding ``used`` blobs."""
        if len(mem) % _SIZE or len(mem) < MIN_SLOTS * _SIZE or not 0 <= used <= len(mem) // _SIZE * MAX_LOAD:
            raise ValueError("not the buffer of a blob table")
        table = cls()
        table._mem, table._used = mem, used
        return table

    @property
    def buffer(self) -> bytearray:
        """The slots themselves (for a cache file; not to be changed)."""
        return self._mem

    def __len__(self) -> int:
        return self._used

    def __contains__(self, blob_id: bytes) -> bool:
        return _probe(self._mem, blob_id) >= 0

    @property
    def nbytes(self) -> int:
        return len(self._mem)

    @property
    def _slots(self) -> int:
        return len(self._mem) // SLOT.size

    def get(self, blob_id: bytes) -> tuple[int, int, int, int] | None:
        """(pack number, blob type, offset, length), or None."""
        mem = self._mem
        off = _probe(mem, blob_id)
        if off < 0:
            return None
        _, pack_type, offset, length = SLOT.unpack_from(mem, off)
        return pack_type >> TYPE_BITS, pack_type & MAX_TYPE, offset, length

    def reserve(self, capacity: int) -> None:
        """Make room for ``capacity`` blobs in all, so loading them grows the table only once."""
        with self._lock:
            if _slots_for(capacity) > self._slots:
                self._resize(_slots_for(capacity))

    def add(self, blob_id: bytes, pack: int, blob_type: int, offset: int, length: int) -> bool:
        """Add a location unless the blob has one; True if it was new."""
        return self.add_many(pack, [(blob_type, blob_id, offset, length)]) == 1

    def add_many(self, pack: int, records: Iterable[tuple[int, bytes, int, int]]) -> int:
        """Add (blob type, blob id, offset, length) records of one pack (the layout of index
        records, so ``INDEX_ENTRY.iter_unpack`` feeds it); returns how many blobs were new."""
        if not 0 <= pack < MAX_PACKS:
            raise OverflowError(f"pack number {pack} does not fit the blob table")
        base = pack << TYPE_BITS
        pack_into = SLOT.pack_into
        with self._lock:
            mem, used, start = self._mem, self._used, self._used
            limit = int(self._slots * MAX_LOAD)
            try:
                for blob_type, blob_id, offset, length in records:
                    if not 0 < blob_type <= MAX_TYPE or len(blob_id) != _KEY:
                        raise ValueError(f"blob type {blob_type}, id of {len(blob_id)} bytes: not for the blob table")
                    if used >= limit:
                        self._used = used
                        self._resize(self._slots * 2)
                        mem, limit = self._mem, int(self._slots * MAX_LOAD)
                    off = _probe(mem, blob_id)
                    if off < 0:
                        pack_into(mem, -1 - off, blob_id, base | blob_type, offset, length)
                        used += 1
            finally:
                self._used = used
        return used - start

    def items(self) -> Iterator[tuple[bytes, tuple[int, int, int, int]]]:
        """Every blob and its location, in no particular order."""
        for blob_id, pack_type, offset, length in SLOT.iter_unpack(self._mem):
            if pack_type:
                yield blob_id, (pack_type >> TYPE_BITS, pack_type & MAX_TYPE, offset, length)

    def _resize(self, slots: int) -> None:
        """Rebuild the table with ``slots`` slots (the lock held)."""
        old = self._mem
        mem = bytearray(slots * SLOT.size)
        size = SLOT.size
        for start in range(0, len(old), size):
            if old[start + _MARK]:
                off = -1 - _probe(mem, bytes(old[start : start + _KEY]))
                mem[off : off + size] = old[start : start + size]
        self._mem = mem  # (readers take the slot count from the buffer they hold)


def _probe(mem: bytearray, blob_id: bytes) -> int:
    """The byte offset of the blob's slot if it is in the table; if not, ``-1 - offset`` of the
    free slot where it would go (one function for both: a lookup is a few Python operations)."""
    end = len(mem)
    first: int = _first_word(blob_id)[0]
    off = (first * (end // _SIZE) >> 64) * _SIZE
    while mem[off + _MARK]:
        if mem.startswith(blob_id, off):
            return off
        off += _SIZE
        if off == end:
            off = 0
    return -1 - off


def _slots_for(capacity: int) -> int:
    return max(MIN_SLOTS, int(capacity / MAX_LOAD) + 1)
