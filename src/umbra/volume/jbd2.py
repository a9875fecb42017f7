"""Replay of an ext3/ext4 journal (jbd2) in memory, for reading a filesystem image as a mount would.

An image of a live filesystem (a crash-consistent snapshot, a CDP instant) often has metadata that
is committed in the journal but not yet written to its home location: a file created a minute ago
may exist only there.  The kernel replays the journal at mount; ``ls``/``extract`` do the same in
memory: the committed transactions are scanned (as jbd2's recovery does: scan, revoke, replay) and
reads of the image return the newest committed journal copy of each block instead of its home
location.  Nothing is written.  The journal is read through a reader callable (the journal inode's
data, as The Sleuth Kit reads it), so only its blocks are touched.

Not replayed: external journals, and fast-commit blocks (ext4 ``fast_commit``; the full commits
before them are).  Checksums are not verified: a transaction counts once its commit block is there
(jbd2 writes it after the transaction's blocks unless ``async_commit``).
"""

from __future__ import annotations

import bisect
import struct
from collections.abc import Callable
from dataclasses import dataclass

Reader = Callable[[int, int], bytes]

JBD2_MAGIC = 0xC03B3998
DESCRIPTOR, COMMIT, SUPERBLOCK_V1, SUPERBLOCK_V2, REVOKE = 1, 2, 3, 4, 5
INCOMPAT_REVOKE, INCOMPAT_64BIT, INCOMPAT_CSUM_V2, INCOMPAT_CSUM_V3 = 0x1, 0x2, 0x8, 0x10
FLAG_ESCAPE, FLAG_SAME_UUID, FLAG_LAST_TAG = 0x1, 0x2, 0x8
HEADER = struct.Struct(">III")  # magic, block type, sequence

EXT4_RECOVER = 0x4  # s_feature_incompat: the journal must be replayed before use
EXT4_HAS_JOURNAL = 0x4  # s_feature_compat


@dataclass(frozen=True)
class JournalInfo:
    inode: int  # the journal inode (0: external journal, not replayable here)
    needs_recovery: bool


def journal_of(superblock: bytes) -> JournalInfo:
    """What the ext2/3/4 superblock (1024 bytes) says about its journal."""
    compat, incompat = struct.unpack_from("<II", superblock, 92)
    (inum,) = struct.unpack_from("<I", superblock, 224)
    has = bool(compat & EXT4_HAS_JOURNAL)
    return JournalInfo(inum if has else 0, has and bool(incompat & EXT4_RECOVER))


@dataclass
class Replay:
    """The newest committed journal copy of each filesystem block: block -> (journal block, escaped)."""

    block_size: int
    copies: dict[int, tuple[int, bool]]
    transactions: int


def scan(read_journal: Reader, journal_size: int, fs_blocks: int) -> Replay | None:
    """Find the committed transactions of a journal and what they replay; None if there is nothing
    to replay (a clean journal, or one umbra cannot read)."""
    if journal_size < 1024:
        return None
    sb = read_journal(0, 1024)
    magic, btype, _ = HEADER.unpack_from(sb, 0)
    if magic != JBD2_MAGIC or btype not in (SUPERBLOCK_V1, SUPERBLOCK_V2):
        return None
    block_size, maxlen, first, sequence, start = struct.unpack_from(">IIIII", sb, 12)
    incompat = struct.unpack_from(">I", sb, 40)[0] if btype == SUPERBLOCK_V2 else 0
    if start == 0 or block_size < 1024 or block_size & (block_size - 1) or not first < maxlen:
        return None
    maxlen = min(maxlen, journal_size // block_size)
    if not first <= start < maxlen:
        return None
    tag_size, tail = _tag_layout(incompat)
    is64 = bool(incompat & INCOMPAT_64BIT)

    def advance(block: int) -> int:
        block += 1
        return first if block >= maxlen else block

    copies: dict[int, tuple[int, bool]] = {}
    revoked: dict[int, int] = {}  # fs block -> newest transaction that revoked it
    committed: list[tuple[int, list[tuple[int, int, bool]]]] = []
    pending: list[tuple[int, int, bool]] = []
    pending_revokes: list[int] = []
    block = start
    for _ in range(maxlen):  # each journal block is visited at most once
        data = read_journal(block * block_size, block_size)
        if len(data) < block_size:
            break
        magic, btype, seq = HEADER.unpack_from(data, 0)
        if magic != JBD2_MAGIC or seq != sequence:
            break  # the end of the log
        if btype == DESCRIPTOR:
            tags = _tags(data, tag_size, tail, is64)
            for fs_block, escaped in tags:
                block = advance(block)
                if fs_block < fs_blocks:
                    pending.append((fs_block, block, escaped))
            block = advance(block)
        elif btype == REVOKE:
            pending_revokes += _revokes(data, is64)
            block = advance(block)
        elif btype == COMMIT:
            committed.append((sequence, pending))
            for fs_block in pending_revokes:
                revoked[fs_block] = sequence
            pending, pending_revokes = [], []
            sequence = (sequence + 1) & 0xFFFFFFFF
            block = advance(block)
        else:
            break
    for txn, blocks in committed:
        for fs_block, journal_block, escaped in blocks:
            if revoked.get(fs_block, -1) >= txn:  # revoked by this transaction or a later one
                continue
            copies[fs_block] = (journal_block, escaped)
    if not copies:
        return None
    return Replay(block_size, copies, len(committed))


def _tag_layout(incompat: int) -> tuple[int, int]:
    """(bytes per tag, bytes of block tail) for these journal features."""
    if incompat & INCOMPAT_CSUM_V3:
        return 16, 4
    size = 8 + (4 if incompat & INCOMPAT_64BIT else 0) + (2 if incompat & INCOMPAT_CSUM_V2 else 0)
    return size, 4 if incompat & INCOMPAT_CSUM_V2 else 0


def _tags(data: bytes, tag_size: int, tail: int, is64: bool) -> list[tuple[int, bool]]:
    """(filesystem block, escaped) of each tag of a descriptor block, in order."""
    out: list[tuple[int, bool]] = []
    pos, end = HEADER.size, len(data) - tail
    while pos + tag_size <= end:
        if tag_size == 16:  # journal_block_tag3_t: blocknr, flags, blocknr_high, checksum
            low, flags, high = struct.unpack_from(">III", data, pos)
        else:  # journal_block_tag_t: blocknr, checksum (16 bits), flags (16 bits), [blocknr_high]
            low, _, flags = struct.unpack_from(">IHH", data, pos)
            high = struct.unpack_from(">I", data, pos + 8)[0] if is64 else 0
        out.append(((high << 32 | low) if is64 else low, bool(flags & FLAG_ESCAPE)))
        pos += tag_size + (0 if flags & FLAG_SAME_UUID else 16)
        if flags & FLAG_LAST_TAG:
            break
    return out


def _revokes(data: bytes, is64: bool) -> list[int]:
    (count,) = struct.unpack_from(">I", data, HEADER.size)
    size = 8 if is64 else 4
    end = min(count, len(data))
    fmt = ">Q" if is64 else ">I"
    return [struct.unpack_from(fmt, data, pos)[0] for pos in range(HEADER.size + 4, end - size + 1, size)]


class ReplayedReader:
    """Reads of the image with the journal's committed copies laid over their home blocks."""

    def __init__(self, read: Reader, read_journal: Reader, replay: Replay) -> None:
        self._read, self._journal, self.replay = read, read_journal, replay
        self._blocks = sorted(replay.copies)

    def __call__(self, offset: int, length: int) -> bytes:
        data = self._read(offset, length)
        bs = self.replay.block_size
        lo = bisect.bisect_left(self._blocks, offset // bs)
        hi = bisect.bisect_left(self._blocks, -(-(offset + len(data)) // bs))
        if lo == hi:
            return data
        out = bytearray(data)
        for fs_block in self._blocks[lo:hi]:
            journal_block, escaped = self.replay.copies[fs_block]
            copy = self._journal(journal_block * bs, bs)
            if escaped:  # jbd2 zeroed the magic at the start of a block that began with it
                copy = struct.pack(">I", JBD2_MAGIC) + copy[4:]
            start = fs_block * bs
            a, b = max(start, offset), min(start + bs, offset + len(data))
            out[a - offset : b - offset] = copy[a - start : b - start]
        return bytes(out)
