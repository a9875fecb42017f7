"""Continuous data protection in the repository: shipped journal batches, and the state of a
volume at any instant (a point plus the journal records after it).

A batch is one immutable object ``cdp/<journal id>-<first seq>-<last seq>`` (sealed, zstd-compressed
JSON; ``docs/FORMAT.md``) listing records in sequence order.  The data of a write is cut at the
repository's block boundaries and stored as ordinary DATA blobs, so a whole aligned block written
to the volume and later backed up is stored once.  Batch names carry the sequence range, so the
records needed for an instant are found without opening every batch.  Shipping the same range
twice (after a crash) is harmless: records are identified by their sequence number.
"""

from __future__ import annotations

import bisect
import json
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import zstandard

from umbra.errors import InstantInGap, IntegrityError
from umbra.repo.format import AAD_CDP, ZERO_ID
from umbra.repo.manifest import Point
from umbra.repo.pointref import PointRef, format_ns
from umbra.repo.repository import Repository

CDP_DIR = "cdp"
BATCH_NAME = re.compile(r"^cdp/([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{16})$")
WRITE, ZERO, MARK = "write", "zero", "mark"
MAX_BATCH_PLAIN = 256 << 20


@dataclass
class CdpRecord:
    """One journal record as stored: ``pieces`` are (blob id or ZERO_ID, length) covering a write."""

    seq: int
    time_ns: int
    kind: str
    offset: int = 0
    length: int = 0
    pieces: list[tuple[bytes, int]] = field(default_factory=list)
    mark: dict[str, Any] = field(default_factory=dict)

    def encode(self) -> list[Any]:
        if self.kind == MARK:
            return [self.seq, self.time_ns, MARK, self.mark]
        if self.kind == ZERO:
            return [self.seq, self.time_ns, ZERO, self.offset, self.length]
        return [self.seq, self.time_ns, WRITE, self.offset, self.length, [[b.hex(), n] for b, n in self.pieces]]

    @classmethod
    def decode(cls, item: list[Any]) -> CdpRecord:
        seq, time_ns, kind = int(item[0]), int(item[1]), item[2]
        if kind == MARK:
            return cls(seq, time_ns, MARK, mark=dict(item[3]))
        if kind == ZERO:
            return cls(seq, time_ns, ZERO, int(item[3]), int(item[4]))
        if kind != WRITE:
            raise ValueError(f"unknown record kind {kind!r}")
        pieces = [(bytes.fromhex(b), int(n)) for b, n in item[5]]
        if sum(n for _, n in pieces) != int(item[4]) or any(len(b) != 32 for b, _ in pieces):
            raise ValueError(f"record {seq}: pieces do not cover the write")
        return cls(seq, time_ns, WRITE, int(item[3]), int(item[4]), pieces)


@dataclass(frozen=True)
class BatchRef:
    name: str
    journal: str
    first_seq: int
    last_seq: int


@dataclass
class Batch:
    ref: BatchRef
    volume: str
    volume_size: int
    records: list[CdpRecord]


def batch_name(journal: str, first_seq: int, last_seq: int) -> str:
    return f"{CDP_DIR}/{journal}-{first_seq:016x}-{last_seq:016x}"


def split_write(repo: Repository, offset: int, data: bytes | memoryview) -> Iterator[tuple[bytes, bytes | None, int]]:
    """(blob id, piece, length) for a write cut at block boundaries; all-zero pieces are
    (ZERO_ID, None, length)."""
    bs = repo.config.block_size
    view = memoryview(data)
    pos = 0
    while pos < len(view):
        n = min(len(view) - pos, bs - (offset + pos) % bs)
        piece = bytes(view[pos : pos + n])
        if piece.count(0) == n:
            yield ZERO_ID, None, n
        else:
            yield repo.crypto.blob_id(piece), piece, n
        pos += n


def encode_batch(repo: Repository, ref: BatchRef, volume: str, volume_size: int, records: list[CdpRecord]) -> bytes:
    doc = {
        "format": 1,
        "journal": ref.journal,
        "volume": volume,
        "volume_size": volume_size,
        "records": [r.encode() for r in records],
    }
    body = zstandard.ZstdCompressor(level=3).compress(json.dumps(doc, separators=(",", ":")).encode())
    return repo.crypto.seal(body, AAD_CDP + ref.name.encode())


def list_batches(repo: Repository, journal: str | None = None) -> list[BatchRef]:
    out = []
    for name in repo.backend.list(CDP_DIR):
        m = BATCH_NAME.match(name)
        if m is None:
            continue  # a temporary or foreign file: not a batch
        if journal is None or m.group(1) == journal:
            out.append(BatchRef(name, m.group(1), int(m.group(2), 16), int(m.group(3), 16)))
    out.sort(key=lambda r: (r.journal, r.first_seq, r.last_seq))
    return out


def load_batch(repo: Repository, ref: BatchRef) -> Batch:
    what = f"journal batch {ref.name}"
    body = repo.crypto.open(repo.backend.load(ref.name), AAD_CDP + ref.name.encode(), what)
    try:
        doc = json.loads(zstandard.ZstdDecompressor().decompress(body, max_output_size=MAX_BATCH_PLAIN))
        if not isinstance(doc, dict) or doc.get("format") != 1 or doc["journal"] != ref.journal:
            raise ValueError("names another journal or format")
        volume, volume_size = doc["volume"], doc["volume_size"]
        if not isinstance(volume, str) or type(volume_size) is not int or volume_size < 0:
            raise ValueError("bad volume or size")
        records = [CdpRecord.decode(item) for item in doc["records"]]
    except (ValueError, KeyError, TypeError, IndexError, OverflowError, RecursionError, zstandard.ZstdError) as exc:
        raise IntegrityError(f"{what}: malformed ({exc})") from None
    if not records or records[0].seq != ref.first_seq or records[-1].seq != ref.last_seq:
        raise IntegrityError(f"{what}: records do not match its name")
    return Batch(ref, volume, volume_size, records)


def gap_of(record: CdpRecord) -> dict[str, Any] | None:
    """The mark of a gap record (writes from ``since_ns`` up to the record's time are missing)."""
    if record.kind == MARK and record.mark.get("kind") == "gap" and record.mark.get("since_ns"):
        return record.mark
    return None


def bookmark_of(record: CdpRecord) -> dict[str, Any] | None:
    """The mark of a bookmark record (with the instant it names in ``time_ns``), else None."""
    if record.kind == MARK and record.mark.get("kind") == "bookmark" and record.mark.get("time_ns"):
        return record.mark
    return None


def clock_step_of(record: CdpRecord) -> dict[str, Any] | None:
    """The mark of a clock step (``step_ns``: how far the wall clock moved, ``raw_ns``: the wall
    clock then; the record's own time is the journal's, which never goes back), else None."""
    if record.kind == MARK and record.mark.get("kind") == "clock" and "step_ns" in record.mark:
        return record.mark
    return None


def referenced_blobs(batch: Batch) -> Iterator[bytes]:
    for record in batch.records:
        for blob_id, _ in record.pieces:
            if blob_id != ZERO_ID:
                yield blob_id


# --- the state at an instant ------------------------------------------------------------------


@dataclass
class Instant:
    """A volume at ``time_ns``: ``point`` plus ``records`` (sequence order) applied on top."""

    point: Point
    time_ns: int
    records: list[CdpRecord]
    journal_through_ns: int | None  # the newest shipped record of the point's journal
    compacted: bool = False  # the writes after the point up to TIME were compacted away


@dataclass
class Gap:
    """Writes of a journal from ``since_ns`` to ``until_ns`` (when it wrote again) are missing."""

    since_ns: int
    until_ns: int
    reason: str


def records_between(
    repo: Repository, journal: str, after_seq: int, until_ns: int
) -> tuple[list[CdpRecord], int | None, bool, Gap | None]:
    """Records of ``journal`` with seq > ``after_seq`` and time <= ``until_ns``, checked to be
    contiguous; the time of the newest shipped record; whether the records right after
    ``after_seq`` were compacted away (then the list is empty: the state is the point's); and the
    first gap that starts after ``after_seq`` at or before ``until_ns`` (its mark may follow
    ``until_ns``: an instant inside a gap has it as the next record)."""
    every = list_batches(repo, journal)
    earliest = min((r.first_seq for r in every), default=None)
    refs = [r for r in every if r.last_seq > after_seq]
    by_seq: dict[int, CdpRecord] = {}
    newest_ns: int | None = None
    following: CdpRecord | None = None  # the first record after until_ns
    for ref in refs:
        batch = load_batch(repo, ref)
        newest_ns = max(newest_ns or 0, batch.records[-1].time_ns)
        for record in batch.records:
            if record.seq <= after_seq:
                continue
            if record.time_ns <= until_ns:
                by_seq[record.seq] = record
            elif following is None or record.seq < following.seq:
                following = record
        if batch.records[0].time_ns > until_ns:
            break  # batches are in sequence order and time never goes back
    records = [by_seq[s] for s in sorted(by_seq)]
    gap, prev = None, None
    for record in [*records, *([following] if following is not None else [])]:
        mark = gap_of(record)
        # writes are missing from the mark's since_ns on, but not before the record preceding it
        # here (the repository may hold records the local journal lost before it cut them off)
        since = max(int(mark["since_ns"]), prev.time_ns + 1 if prev is not None else 0) if mark else 0
        if mark is not None and since <= until_ns:
            gap = Gap(since, record.time_ns, str(mark.get("reason", "")))
            break
        prev = record
    if (not records or records[0].seq != after_seq + 1) and earliest is not None and earliest > after_seq + 1:
        return [], newest_ns, True, None  # outside the retention window: only the points are kept
    expected = after_seq + 1
    for record in records:
        mark = gap_of(record)
        if record.seq != expected and not (mark and mark.get("first_missing_seq") == expected):
            raise IntegrityError(f"journal {journal[:8]} has a gap: record {expected} is missing")
        expected = record.seq + 1  # a gap mark may skip numbers (a damaged part cut off locally)
    return records, newest_ns, False, gap


def instant(repo: Repository, ref: PointRef) -> Instant:
    """The state that ``ref`` names.  For ``VOLUME@TIME``: the point that
    :meth:`Repository.resolve` picks (the newest whose data is from at or before TIME), plus every
    shipped journal record after that point's snapshot mark, up to and including TIME.

    Raises:
        InstantInGap: the journal lacks writes between the point and TIME.
    """
    point = repo.resolve(ref)
    if ref.time_ns is None or not point.cdp.get("journal"):
        return Instant(point, ref.time_ns or point.state_time_ns, [], None)
    records, newest, compacted, gap = records_between(
        repo, str(point.cdp["journal"]), int(point.cdp["seq"]), ref.time_ns
    )
    if gap is not None and max(gap.since_ns, point.state_time_ns + 1) <= ref.time_ns:
        raise InstantInGap(
            volume=point.volume,
            time=format_ns(ref.time_ns),
            since=format_ns(gap.since_ns),
            until=format_ns(gap.until_ns),
            reason=gap.reason or "the journal could not be written",
            hint=f"pick an instant before {format_ns(gap.since_ns)}, or one after a point taken after "
            f"{format_ns(gap.until_ns)}",
        )
    return Instant(point, ref.time_ns, records, newest, compacted)


def anchor_points(repo: Repository, points: list[Point]) -> set[str]:
    """Points that prune must keep: for each journal with shipped batches, the earliest point from
    which the batches apply without a gap (forgetting it would lose every write after it)."""
    first_seq: dict[str, int] = {}
    for ref in list_batches(repo):
        first_seq[ref.journal] = min(first_seq.get(ref.journal, ref.first_seq), ref.first_seq)
    anchors: dict[str, Point] = {}
    for p in points:
        journal = str(p.cdp.get("journal", ""))
        usable = journal in first_seq and int(p.cdp["seq"]) >= first_seq[journal] - 1
        if usable and (journal not in anchors or int(p.cdp["seq"]) < int(anchors[journal].cdp["seq"])):
            anchors[journal] = p
    return {p.id for p in anchors.values()}


# --- the extents that records leave behind -----------------------------------------------------


class ExtentMap:
    """Non-overlapping byte extents, each either a piece of a blob or zeros; later writes win."""

    def __init__(self) -> None:
        self.starts: list[int] = []
        self.ends: list[int] = []
        self.sources: list[tuple[bytes, int]] = []  # (blob id or ZERO_ID, volume offset of the blob's start)

    def __len__(self) -> int:
        return len(self.starts)

    def put(self, start: int, end: int, source: tuple[bytes, int]) -> None:
        if end <= start:
            return
        i = bisect.bisect_right(self.ends, start)  # first extent ending after start
        j = bisect.bisect_left(self.starts, end, lo=i)  # first extent starting at or after end
        pieces = [(start, end, source)]
        if i < j and self.starts[i] < start:  # only the first overlapped extent can stick out left
            pieces.insert(0, (self.starts[i], start, self.sources[i]))
        if i < j and self.ends[j - 1] > end:  # and only the last one right
            pieces.append((end, self.ends[j - 1], self.sources[j - 1]))
        self.starts[i:j] = [s for s, _, _ in pieces]
        self.ends[i:j] = [e for _, e, _ in pieces]
        self.sources[i:j] = [src for _, _, src in pieces]

    def overlapping(self, start: int, end: int) -> Iterator[tuple[int, int, tuple[bytes, int]]]:
        i = bisect.bisect_right(self.ends, start)
        while i < len(self.starts) and self.starts[i] < end:
            yield max(start, self.starts[i]), min(end, self.ends[i]), self.sources[i]
            i += 1

    def __iter__(self) -> Iterator[tuple[int, int, tuple[bytes, int]]]:
        return zip(self.starts, self.ends, self.sources, strict=True)


def extent_map(records: Iterable[CdpRecord], volume_size: int) -> ExtentMap:
    """Apply records in order.  Writes past the volume's end (never acknowledged) are clipped."""
    m = ExtentMap()
    for record in records:
        if record.kind == ZERO:
            m.put(record.offset, min(volume_size, record.offset + record.length), (ZERO_ID, record.offset))
        elif record.kind == WRITE:
            pos = record.offset
            for blob_id, n in record.pieces:
                m.put(pos, min(volume_size, pos + n), (blob_id, pos))
                pos += n
    return m
