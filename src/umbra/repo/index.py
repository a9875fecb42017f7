"""The index: blob id → (pack, offset, length, type), loaded from all ``index/`` files.

Index files are immutable and sealed; a file's name is the BLAKE3 of its bytes.  Several files may
list the same blob (after an interrupted prune, for example): any copy is valid.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Iterator
from typing import NamedTuple

import blake3

from umbra.errors import IntegrityError
from umbra.repo.blobtable import BlobTable
from umbra.repo.crypto import Crypto
from umbra.repo.format import AAD_INDEX, INDEX_ENTRY, INDEX_MAGIC, INDEX_PACK, BlobType
from umbra.repo.pack import PackEntry


class Location(NamedTuple):
    """Where a blob is stored (a tuple, cheap to make by the million)."""

    pack_id: str
    blob_type: BlobType
    offset: int
    length: int


class Index:
    """Every blob's chosen location (the first one seen) and, when asked for, every pack's full
    entry list (which may repeat blobs stored elsewhere too, e.g. by two concurrent backups).

    Kept compact, since a large repository lists millions of blobs: locations live in a
    :class:`BlobTable` (about 60 bytes a blob), and the pack lists, which only prune needs
    (``pack_lists=True``), are the raw bytes of their index records, made into :class:`PackEntry`
    tuples only when asked.
    """

    def __init__(self, pack_lists: bool = True) -> None:
        self.pack_lists = pack_lists
        self._blobs = BlobTable()
        self._pack_ids: list[str] = []
        self._pack_numbers: dict[str, int] = {}
        self._packs: dict[str, bytearray] = {}  # pack id -> its INDEX_ENTRY records (with pack_lists)

    @classmethod
    def from_table(cls, blobs: BlobTable, pack_ids: list[str]) -> Index:
        """An index (without pack lists) over a table whose pack numbers stand for ``pack_ids``."""
        index = cls(pack_lists=False)
        index._blobs, index._pack_ids = blobs, list(pack_ids)
        index._pack_numbers = {pack_id: number for number, pack_id in enumerate(pack_ids)}
        return index

    def table_state(self) -> tuple[bytearray, int, list[str]]:
        """(the table's slots, how many blobs they hold, the pack ids of its pack numbers)."""
        return self._blobs.buffer, len(self._blobs), list(self._pack_ids)

    def __contains__(self, blob_id: bytes) -> bool:
        return blob_id in self._blobs

    def __len__(self) -> int:
        return len(self._blobs)

    @property
    def nbytes(self) -> int:
        """Memory held by the locations and pack lists."""
        return self._blobs.nbytes + sum(len(raw) for raw in self._packs.values())

    def get(self, blob_id: bytes) -> Location | None:
        found = self._blobs.get(blob_id)
        return None if found is None else self._location(found)

    def reserve(self, blobs: int) -> None:
        """Make room for ``blobs`` locations in all before adding them (one table build)."""
        self._blobs.reserve(blobs)

    def add_pack(self, pack_id: str, entries: Iterable[PackEntry]) -> None:
        self.add_pack_records(pack_id, b"".join(INDEX_ENTRY.pack(*e) for e in entries))

    def add_pack_records(self, pack_id: str, records: bytes) -> None:
        """A pack's raw index records (as :func:`decode_index_records` checked them)."""
        number = self._pack_numbers.get(pack_id)
        if number is None:
            number = self._pack_numbers[pack_id] = len(self._pack_ids)
            self._pack_ids.append(pack_id)
        if self.pack_lists:
            raw = self._packs.get(pack_id)
            if raw is None:
                self._packs[pack_id] = bytearray(records)
            else:  # a pack listed by several index files: its entries once
                known = {(blob_id, offset) for _, blob_id, offset, _ in INDEX_ENTRY.iter_unpack(raw)}
                for record in INDEX_ENTRY.iter_unpack(records):
                    if (record[1], record[2]) not in known:
                        raw += INDEX_ENTRY.pack(*record)
        self._blobs.add_many(number, INDEX_ENTRY.iter_unpack(records))

    def items(self) -> Iterator[tuple[bytes, Location]]:
        for blob_id, found in self._blobs.items():
            yield blob_id, self._location(found)

    def pack_ids(self) -> list[str]:
        return list(self._pack_ids)

    def packs(self) -> dict[str, list[PackEntry]]:
        """Every pack's entries, duplicates included, as index files list them (made on each call)."""
        if not self.pack_lists:
            raise RuntimeError("this index was loaded without pack lists")
        return {pack_id: list(_entries(raw)) for pack_id, raw in self._packs.items()}

    def _location(self, found: tuple[int, int, int, int]) -> Location:
        pack, blob_type, offset, length = found
        return Location(self._pack_ids[pack], _BLOB_TYPES[blob_type], offset, length)


def _entries(raw: bytes | bytearray) -> Iterator[PackEntry]:
    for t, blob_id, offset, length in INDEX_ENTRY.iter_unpack(raw):
        yield PackEntry(_BLOB_TYPES[t], blob_id, offset, length)


_BLOB_TYPES = {int(t): t for t in BlobType}  # a dict lookup instead of an Enum call per entry


def encode_index(crypto: Crypto, packs: dict[str, list[PackEntry]]) -> tuple[str, bytes]:
    """Seal an index file listing ``packs``; returns (index id, bytes)."""
    body = bytearray(INDEX_MAGIC)
    body += len(packs).to_bytes(4, "little")
    for pack_id, entries in sorted(packs.items()):
        body += INDEX_PACK.pack(bytes.fromhex(pack_id), len(entries))
        for e in entries:
            body += INDEX_ENTRY.pack(e.blob_type, e.blob_id, e.offset, e.length)
    data = crypto.seal(bytes(body), AAD_INDEX)
    return blake3.blake3(data).hexdigest(), data


def decode_index(crypto: Crypto, data: bytes, what: str) -> dict[str, list[PackEntry]]:
    """Open and parse an index file.

    Raises:
        IntegrityError: the file does not authenticate or is malformed.
    """
    return {pack_id: list(_entries(raw)) for pack_id, raw in decode_index_records(crypto, data, what).items()}


def decode_index_records(crypto: Crypto, data: bytes, what: str) -> dict[str, bytes]:
    """Open and parse an index file into each pack's raw entry records (every blob type checked).

    Raises:
        IntegrityError: the file does not authenticate or is malformed.
    """
    body = crypto.open(data, AAD_INDEX, what)
    try:
        if body[:8] != INDEX_MAGIC:
            raise ValueError("bad magic")
        count = int.from_bytes(body[8:12], "little")
        pos = 12
        packs: dict[str, bytes] = {}
        for _ in range(count):
            raw_id, n = INDEX_PACK.unpack_from(body, pos)
            pos += INDEX_PACK.size
            end = pos + n * INDEX_ENTRY.size
            if end > len(body):
                raise ValueError("entries past the end")
            records = body[pos:end]
            unknown = set(records[:: INDEX_ENTRY.size]) - _BLOB_TYPES.keys()  # each record starts with its type
            if unknown:
                raise ValueError(f"unknown blob type {min(unknown)}")
            packs[raw_id.hex()] = records
            pos = end
        if pos != len(body):
            raise ValueError("trailing bytes")
        return packs
    except (ValueError, IndexError, struct.error) as exc:
        raise IntegrityError(f"{what}: malformed index ({exc!r})") from None
