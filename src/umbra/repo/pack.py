"""Pack files: many sealed blobs in one immutable file, with a sealed trailer listing them.

Layout: ``PACK_MAGIC | blob envelope … | sealed trailer | trailer length (u32) | PACK_MAGIC``.
A pack's name is the BLAKE3 of its bytes, so ``check --read-data`` can verify a whole pack without
keys, and a pack can never be silently replaced by a different one of the same name.
"""

from __future__ import annotations

from typing import NamedTuple

import blake3

from umbra.errors import IntegrityError
from umbra.repo.crypto import Crypto
from umbra.repo.format import AAD_TRAILER, PACK_COUNT, PACK_ENTRY, PACK_FOOTER, PACK_MAGIC, BlobType


class PackEntry(NamedTuple):
    """One blob in a pack (a tuple: millions of them are made when an index loads)."""

    blob_type: BlobType
    blob_id: bytes
    offset: int
    length: int


def pack_name(pack_id: str) -> str:
    return f"data/{pack_id[:2]}/{pack_id}"


class PackBuilder:
    """Accumulates blob envelopes in memory until the pack is finished."""

    def __init__(self) -> None:
        self._parts: list[bytes] = [PACK_MAGIC]
        self.size = len(PACK_MAGIC)
        self.entries: list[PackEntry] = []

    def add(self, blob_type: BlobType, blob_id: bytes, envelope: bytes) -> None:
        self.entries.append(PackEntry(blob_type, blob_id, self.size, len(envelope)))
        self._parts.append(envelope)
        self.size += len(envelope)

    def __len__(self) -> int:
        return len(self.entries)

    def finish(self, crypto: Crypto) -> tuple[str, bytes]:
        """Returns (pack id, pack bytes)."""
        table = bytearray(PACK_COUNT.pack(len(self.entries)))
        for e in self.entries:
            table += PACK_ENTRY.pack(e.blob_type, e.blob_id, e.offset, e.length)
        trailer = crypto.seal(bytes(table), AAD_TRAILER)
        data = b"".join([*self._parts, trailer, PACK_FOOTER.pack(len(trailer), PACK_MAGIC)])
        return blake3.blake3(data).hexdigest(), data


def parse_trailer(crypto: Crypto, tail: bytes, pack_size: int, what: str) -> list[PackEntry]:
    """Parse a pack's trailer from the last bytes of the pack (at least footer + trailer).

    Raises:
        IntegrityError: bad magic, lengths out of range, or a trailer that does not authenticate.
    """
    if len(tail) < PACK_FOOTER.size or pack_size < len(PACK_MAGIC) + PACK_FOOTER.size:
        raise IntegrityError(f"{what}: too short to be a pack ({pack_size} bytes)")
    trailer_len, magic = PACK_FOOTER.unpack_from(tail, len(tail) - PACK_FOOTER.size)
    if magic != PACK_MAGIC:
        raise IntegrityError(f"{what}: bad pack footer magic")
    data_end = pack_size - PACK_FOOTER.size - trailer_len
    if trailer_len > len(tail) - PACK_FOOTER.size or data_end < len(PACK_MAGIC):
        raise IntegrityError(f"{what}: trailer length {trailer_len} out of range")
    start = len(tail) - PACK_FOOTER.size - trailer_len
    table = crypto.open(tail[start : start + trailer_len], AAD_TRAILER, f"{what} trailer")
    if len(table) < PACK_COUNT.size:
        raise IntegrityError(f"{what}: trailer too short")
    (count,) = PACK_COUNT.unpack_from(table)
    if len(table) != PACK_COUNT.size + count * PACK_ENTRY.size:
        raise IntegrityError(f"{what}: trailer length does not match its count")
    entries = []
    for i in range(count):
        t, bid, off, length = PACK_ENTRY.unpack_from(table, PACK_COUNT.size + i * PACK_ENTRY.size)
        if t not in (BlobType.DATA, BlobType.TREE) or off < len(PACK_MAGIC) or off + length > data_end:
            raise IntegrityError(f"{what}: trailer entry {i} out of range")
        entries.append(PackEntry(BlobType(t), bid, off, length))
    return entries
