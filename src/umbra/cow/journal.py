"""The CDP journal: every write of a protected volume with its timestamp, in append-only segments.

Layout (``docs/FORMAT.md``, "CDP journal"): a directory of segment files ``seg-<first seq>.ucj``.
Each segment starts with a header carrying a random 16-byte salt; each record is a fixed header,
its data, and a 16-byte BLAKE3 checksum keyed by that salt over header and data.  Sequence numbers
grow by one and timestamps never decrease (``time_ns`` forced monotonic), across segments.

Durability: records are written (``writev``) before the write is acknowledged.  By default a
background thread makes them durable every ``commit_interval`` seconds (group commit); ``commit``
makes them durable at once (NBD FLUSH and FUA, and every write with ``--sync``).  For the cow
engine the journal is the volume's write-ahead log: while :meth:`Journal.covers_volume`, a flush
makes only the journal durable and the volume itself is made durable at checkpoints
(:meth:`Journal.save_checkpoint`); after a crash the records past the last checkpoint are replayed
onto it (:mod:`umbra.cow.redo`).  So segments holding such records are never dropped, and
``before_gap`` (the engine's checkpoint) runs before a gap is entered, while nothing unjournaled
has reached the volume yet.

With ``direct``, an append only queues the record (under the lock, no copy); the caller then
waits for it with :meth:`Journal.wait_written` *after* releasing its own locks, and the first
waiter to find the queue unwritten writes all of it in one O_DIRECT write, bypassing the page
cache: writes in flight together share one device write, and none waits for another's under the
cow engine's lock.

A journal that cannot be written (ENOSPC, EIO, a filesystem below ``min_free``) never fails the
volume's writes: it enters a *gap* (:class:`JournalGap`).  Whatever records are whole in the file
stay, the rest of the open segment is cut, and writes go on unjournaled while the journal retries
with backoff.  When it can write again it starts a new segment whose first record is a ``gap``
mark naming the instant from which writes are missing; ``VOLUME@TIME`` refuses instants that
would need them (:mod:`umbra.repo.cdp`).  The gap is also kept in the small preallocated file
``gap``, so a daemon stopped during one records it when it starts again.

Recovery on open: every segment but the last must be intact.  In the last, the records are read
up to the first one that does not check; if nothing valid follows, that is a torn tail (a write
cut short by a crash) and it is cut off; if a valid record follows, the damage is in the middle
and :class:`JournalCorrupt` is raised: history is never silently dropped.
"""

from __future__ import annotations

import ctypes
import errno
import json
import logging
import mmap
import os
import re
import secrets
import shutil
import struct
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import blake3
import crc32c

from umbra.errors import JournalCorrupt
from umbra.repo.pointref import format_ns
from umbra.volume.blockio import punch_hole, sync_path

SEGMENT_MAGIC = b"UMBRAJNL"
SEGMENT_VERSION = 2  # new segments; version 1 ones are still read
SEGMENT_HEADER = struct.Struct("<8sII16sQQQ")  # magic, version, reserved, salt, volume size, first seq, created ns
RECORD_MAGIC = 0x55524543  # "CERU" little-endian on disk: b"CERU"
RECORD_HEADER = struct.Struct("<IBBHQQQII")  # magic, kind, flags, reserved, seq, time ns, offset, length, data length
DIGEST = 16  # version 1 records: BLAKE3
DIGEST_V2 = 4  # version 2 records: CRC32C
FLAG_ALIGNED = 1  # version 2: the data starts at a 4 KiB boundary of the file
MAX_DIRECT_PARTS = 500  # aligned records written from their own buffers in one pwritev (IOV_MAX 1024)
ALIGN = 4096  # O_DIRECT granularity of the journal's appends
DIRECT_MIN = 256 << 10  # direct appends: smaller batches go through the page cache
SEGMENT_NAME = re.compile(r"^seg-(\d{16})\.ucj$")
CHECKPOINT_FILE_BYTES = 512  # rewritten in place, like the gap file
GAP_FILE_BYTES = 4096  # the gap file's fixed size: rewritten in place, so a full disk can still take it
RECYCLE_KEEP = 2  # dropped segment files kept for reuse (direct appends)
RECYCLE_NAME = re.compile(r"^recycle-(\d{16})\.ucj$")
RETRY_FIRST, RETRY_MAX = 1.0, 60.0  # seconds between attempts to end a gap
CLOCK_STEP_NS = 1_000_000_000  # the wall clock moving this much against boot time is a step
CHECKPOINT_EVERY = 1.0  # seconds between saves of the applied checkpoint (note_applied)

log = logging.getLogger(__name__)

WRITE, ZERO, MARK = 1, 2, 3
KINDS = {WRITE: "write", ZERO: "zero", MARK: "mark"}


@dataclass
class Record:
    seq: int
    time_ns: int
    kind: int
    offset: int
    length: int
    data: bytes

    @property
    def mark(self) -> dict[str, Any]:
        return dict(json.loads(self.data)) if self.kind == MARK else {}


class _Direct(NamedTuple):
    """The data of an aligned record: written with O_DIRECT from its own (page-aligned) buffer."""

    data: bytes | memoryview


_Part = bytes | memoryview | _Direct


@dataclass
class JournalGap:
    """Writes from ``since_ns`` on are missing from the journal (it could not be written)."""

    since_ns: int
    reason: str
    noticed_ns: int

    def to_dict(self) -> dict[str, Any]:
        return {"since_ns": self.since_ns, "reason": self.reason, "noticed_ns": self.noticed_ns}


@dataclass
class JournalStats:
    segments: int
    records: int
    bytes: int
    first_ns: int | None
    last_ns: int | None
    write_bytes: int
    recovered_tail_bytes: int


@dataclass
class _Segment:
    path: Path
    first_seq: int
    salt: bytes
    records: int = 0
    write_bytes: int = 0
    first_ns: int | None = None
    last_ns: int | None = None
    version: int = 2


class Journal:
    def __init__(
        self,
        directory: Path,
        volume_size: int,
        sync: bool = False,
        commit_interval: float = 0.05,
        segment_bytes: int = 64 << 20,
        max_bytes: int | None = None,
        direct: bool = False,
        min_free: int = 0,
        resume_free: int = 4 << 20,
        cut_damaged: bool = False,
    ) -> None:
        self.directory = directory
        self.volume_size = volume_size
        self.sync = sync
        self.commit_interval = commit_interval
        self.segment_bytes = segment_bytes
        self.max_bytes = max_bytes
        self.min_free = min_free  # bytes to leave free on the journal's filesystem
        self.resume_free = resume_free  # and free on top of that to end a gap (no flapping)
        self.cut_damaged = cut_damaged  # cut damage in the middle off (a recorded gap) instead of refusing
        self._skip: tuple[int, int] | None = None  # (first missing seq, next seq): the gap mark jumps
        self._lock = threading.Lock()  # appends
        self._sync_lock = threading.Lock()  # fdatasync calls
        self._segments: list[_Segment] = []
        self._fd: int | None = None
        self._codec = _Codec.of(SEGMENT_VERSION, bytes(16))
        self._pos = 0
        self._written = 0  # bytes appended (all segments), for group commit bookkeeping
        self._durable = 0
        self._next_seq = 1
        self._last_ns = 0
        self._stats = JournalStats(0, 0, 0, None, None, 0, 0)
        self._stop = threading.Event()
        self._committer: threading.Thread | None = None
        self.id = ""
        self.keep_after: int | None = None  # records after this seq are not shipped yet: never drop them
        # O_DIRECT appends (page-cache-free; faster for large writes, much slower for small ones,
        # which then wait for the device one by one): the segment's last partial block is kept
        # here and rewritten with each append, padded with zeros to the block size
        self.direct = direct
        self._tail = b""
        self._tail_off = 0
        self._staging: mmap.mmap | None = None
        self._buffered_fd: int | None = None  # direct: the same segment, for batches under DIRECT_MIN
        self._cond = threading.Condition(self._lock)  # records reaching the file (wait_written)
        self._io_lock = threading.Lock()  # direct: one batch write at a time, in append order
        self._queued: list[_Part] = []  # direct: record parts the writer thread has not written
        self._on_file = 0  # bytes appended (counted like _written) that are in the segment file
        self._writing = False  # direct: a waiter is writing the queue
        self._file_end = 0  # where the records known to be written end in the open segment
        self.gap: JournalGap | None = None
        self._retry_at = 0.0  # monotonic time of the next attempt to end the gap
        self._retry_delay = RETRY_FIRST
        self.gaps_recorded = 0  # gap marks written by this process
        self.durable_seq = 0  # records through this one are on stable storage (shipped only then)
        self._broken = False  # a direct write failed: nothing more goes into the open segment
        self._checkpoint_lock = threading.Lock()
        self._checkpoint = 0  # the newest durable checkpoint saved by this process
        self._applied = 0  # records through this one are in the volume (page cache), note_applied
        self._checkpoint_applied = 0  # the applied seq last saved
        self._applied_due = 0.0  # monotonic time after which the commit thread saves it again
        self._recycled: list[Path] = []  # dropped segment files to overwrite instead of extending new ones
        self._cut: tuple[Path, int] | None = None  # a tail the failed segment still needs cleared
        self._clock_offset: int | None = None  # wall clock minus boot-time clock at the last record
        self._boot_id = boot_id()  # for the applied checkpoint
        # a volume relies on the journal for its durability between checkpoints (the cow engine
        # sets these): segments with records past the durable checkpoint are kept, and a durable
        # checkpoint must have passed this seq (the last gap mark) before the journal alone covers
        self.keeps_redo = False
        self.before_gap: Callable[[], None] | None = None
        self._redo_floor = 0

    # --- opening and recovery ----------------------------------------------------------------

    @classmethod
    def open(cls, directory: Path, volume_size: int, **options: object) -> Journal:
        directory.mkdir(parents=True, exist_ok=True)
        journal = cls(directory, volume_size, **options)  # type: ignore[arg-type]
        journal._recover()
        journal._load_id()
        journal._checkpoint = journal._saved_checkpoint()
        journal._redo_floor = journal.last_seq  # what a crash before now left: a checkpoint covers it first
        with journal._lock:
            journal._load_gap()
            if journal.gap is None:
                try:
                    journal._start_segment()
                except OSError as exc:
                    journal._enter_gap(exc)
            else:
                journal._resume()
        if not journal.sync:
            journal._committer = threading.Thread(target=journal._commit_loop, name="umbra-journal", daemon=True)
            journal._committer.start()
        return journal

    def _load_id(self) -> None:
        """The journal's id names one unbroken sequence space: a journal that starts again from
        sequence 1 (no segments left) gets a new one, so shipped records are never confused."""
        path = self.directory / "id"
        if self._segments and path.exists():
            self.id = path.read_text().strip()
            return
        self.id = secrets.token_hex(16)
        tmp = self.directory / "id.tmp"
        tmp.write_text(self.id + "\n")
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)

    def _recover(self) -> None:
        self._recycled = sorted(p for p in self.directory.iterdir() if RECYCLE_NAME.match(p.name))
        names = sorted(p for p in self.directory.iterdir() if SEGMENT_NAME.match(p.name))
        for i, path in enumerate(names):
            last = i == len(names) - 1
            seg, valid_end, size, damage = self._scan(path, last)
            if damage is not None:
                if not self.cut_damaged:
                    raise JournalCorrupt(path=str(path), offset=valid_end, reason=damage)
                self._cut_damage(names[i:], seg, valid_end, damage)
                return
            if seg is None:  # the last segment, created but its header never written out
                path.unlink()
                continue
            if valid_end < size:
                self._stats.recovered_tail_bytes += size - valid_end
                os.truncate(path, valid_end)
            if last and valid_end == SEGMENT_HEADER.size + 32:  # no records: the new segment replaces it
                path.unlink()
                continue
            if last:  # after a kill -9 its records may be in the page cache only
                sync_path(path, data_only=True)
            self._segments.append(seg)
            self._stats.bytes += valid_end
        self.durable_seq = self._next_seq - 1

    def _scan(self, path: Path, last: bool) -> tuple[_Segment | None, int, int, str | None]:
        """(segment, end of its valid records, file size, damage or None).  A torn tail of the
        last segment and a zero tail of any segment are not damage; the caller cuts them."""
        size = path.stat().st_size
        if size < SEGMENT_HEADER.size + 32:
            return None, 0, size, None if last else "bad segment header"
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
            seg = self._parse_header(path, m)
            if seg is None:
                return None, 0, size, "bad segment header"
            codec = _Codec.of(seg.version, seg.salt)
            pos = SEGMENT_HEADER.size + 32
            if (
                self._segments
                and seg.first_seq != self._next_seq
                and not _starts_with_skip(m, pos, codec, self._next_seq)
            ):
                return None, 0, size, "segments out of sequence (one is missing)"
            self._next_seq = expected = seg.first_seq
            while pos < size:
                rec_end = codec.check(m, pos)
                if rec_end is None:
                    break
                rec = codec.parse(m, pos)
                if rec.seq != expected or rec.time_ns < self._last_ns:
                    return seg, pos, size, "records out of order"
                self._account(seg, rec)
                expected += 1
                pos = rec_end
            if pos < size:
                if not last and not _all_zero(m, pos):
                    return seg, pos, size, "damaged record in a sealed segment"
                following = _find_valid_after(m, pos + 1, codec)
                if following is not None:
                    return seg, pos, size, f"damaged record followed by valid records (at {following}); not truncating"
            return seg, pos, size, None

    def _parse_header(self, path: Path, m: mmap.mmap) -> _Segment | None:
        raw = m[: SEGMENT_HEADER.size]
        if blake3.blake3(raw).digest() != m[SEGMENT_HEADER.size : SEGMENT_HEADER.size + 32]:
            return None
        magic, version, _r, salt, vsize, first_seq, _created = SEGMENT_HEADER.unpack(raw)
        if magic != SEGMENT_MAGIC or version not in (1, SEGMENT_VERSION):
            return None
        if vsize != self.volume_size:
            raise JournalCorrupt(path=str(path), offset=0, reason=f"written for a volume of {vsize} bytes")
        return _Segment(path, first_seq, salt, version=version)

    def _cut_damage(self, rest: list[Path], seg: _Segment | None, valid_end: int, damage: str) -> None:
        """``--journal-cut-damaged``: keep the valid records before the damage, move the damaged
        segment (a copy) and every later one aside into ``damaged-<ns>/``, and record a gap whose
        mark skips every sequence number those files may hold (shipped ones are never reused)."""
        aside = self.directory / f"damaged-{time.time_ns()}"
        aside.mkdir()
        highest = max([self._next_seq - 1, *(_highest_seq(p) for p in rest)])
        shutil.copy2(rest[0], aside / rest[0].name)
        for later in rest[1:]:
            os.replace(later, aside / later.name)
        if seg is not None and seg.records:
            os.truncate(rest[0], valid_end)
            sync_path(rest[0], data_only=True)
            self._segments.append(seg)
            self._stats.bytes += valid_end
        else:
            rest[0].unlink()
            self._next_seq = self._segments[-1].first_seq + self._segments[-1].records if self._segments else 1
        sync_path(self.directory)
        self.durable_seq = self._next_seq - 1
        kept = self._newest_record_ns() or 0
        reason = (
            f"journal damaged in {rest[0].name} at offset {valid_end} ({damage}); cut by --journal-cut-damaged, "
            f"the damaged files are kept in {aside.name}"
        )
        log.error("journal: %s", reason)
        self.gap = JournalGap(kept + 1, reason, time.time_ns())
        self._skip = (self._next_seq, highest + 1)
        self._retry_at = 0.0
        self._save_gap()

    def _account(self, seg: _Segment, rec: Record) -> None:
        seg.records += 1
        if seg.first_ns is None:
            seg.first_ns = rec.time_ns
        seg.last_ns = rec.time_ns
        if rec.kind == WRITE:
            seg.write_bytes += rec.length
        self._stats.last_ns = rec.time_ns
        self._next_seq = rec.seq + 1
        self._last_ns = rec.time_ns

    def _seal_fd(self) -> None:
        """Close the current segment's file: durable, without the zero padding of direct appends."""
        assert self._fd is not None
        if self.direct:
            os.ftruncate(self._fd, self._pos)
        os.fdatasync(self._fd)
        self._close_fds()

    def _close_fds(self) -> None:
        for fd in (self._fd, self._buffered_fd):
            if fd is not None:
                try:
                    os.close(fd)
                except OSError as exc:  # a failed device: the descriptor is gone all the same
                    log.debug("journal: close failed: %s", exc)
        self._fd = self._buffered_fd = None
        self._tail, self._tail_off = b"", 0

    def _start_segment(self) -> None:
        """Seal the open segment (if any) and start the next.  On failure nothing half-made is left
        behind: the new file is removed."""
        if self._fd is not None:
            self._seal_fd()
        self._make_room()
        salt = secrets.token_bytes(16)
        path = self.directory / f"seg-{self._next_seq:016d}.ucj"
        header = SEGMENT_HEADER.pack(
            SEGMENT_MAGIC, SEGMENT_VERSION, 0, salt, self.volume_size, self._next_seq, time.time_ns()
        )
        head = header + blake3.blake3(header).digest()
        recycled = self._reuse_recycled(path)
        flags = os.O_WRONLY | os.O_CLOEXEC | (0 if recycled else os.O_CREAT | os.O_EXCL | os.O_APPEND)
        fds = [os.open(path, flags, 0o600)]
        try:
            written = os.pwrite(fds[0], head, 0) if recycled else os.write(fds[0], head)
            if written != len(head):
                raise OSError(errno.ENOSPC, "short write of a journal segment header")
            os.fdatasync(fds[0])
            sync_path(self.directory)
            if self.direct:
                try:
                    fds.append(os.open(path, os.O_WRONLY | os.O_DIRECT | os.O_CLOEXEC))
                except OSError:
                    self.direct = False  # a filesystem without O_DIRECT (tmpfs): buffered appends
                    if recycled:  # appends go to the end of the file: drop the stale records
                        os.ftruncate(fds[0], len(head))
                        os.lseek(fds[0], len(head), os.SEEK_SET)
                else:
                    fds.append(os.open(path, os.O_WRONLY | os.O_CLOEXEC))  # small batches (no O_APPEND)
        except BaseException:
            for fd in fds:
                os.close(fd)
            path.unlink(missing_ok=True)
            raise
        if len(fds) == 3:
            os.close(fds[0])
            self._fd, self._buffered_fd = fds[1], fds[2]
            self._tail, self._tail_off = head, 0
        else:
            self._fd = fds[0]
        self._codec, self._pos = _Codec.of(SEGMENT_VERSION, salt), SEGMENT_HEADER.size + 32
        self._file_end = self._pos
        self._segments.append(_Segment(path, self._next_seq, salt))
        self._stats.bytes += self._pos
        self._enforce_limit()

    def _drop_oldest(self) -> bool:
        """Drop the oldest segment unless it is the only one or holds records not shipped yet."""
        if len(self._segments) < 2:
            return False
        if self.keep_after is not None and self._segments[1].first_seq - 1 > self.keep_after:
            return False
        if self.keeps_redo and self._segments[1].first_seq - 1 > self._checkpoint:
            return False  # the volume may not hold its records durably yet (redo needs them)
        oldest = self._segments.pop(0)
        size = oldest.path.stat().st_size
        self._stats.bytes -= size
        if self.direct and len(self._recycled) < RECYCLE_KEEP and size >= self.segment_bytes:
            # kept for a later segment: overwriting written blocks with O_DIRECT is about 1.6x
            # faster than extending a file (bench/RESULTS.md), as PostgreSQL recycles WAL segments
            spare = self.directory / f"recycle-{oldest.first_seq:016d}.ucj"
            os.replace(oldest.path, spare)
            self._recycled.append(spare)
        else:
            oldest.path.unlink()
        return True

    def _reuse_recycled(self, path: Path) -> bool:
        """Rename a recycled segment file to ``path`` for the new segment (direct appends only:
        they write at explicit offsets over the stale records, which no longer check)."""
        if path.exists():
            raise FileExistsError(errno.EEXIST, f"journal segment {path.name} exists")
        if not self.direct or not self._recycled:
            return False
        os.replace(self._recycled.pop(0), path)
        return True

    def _drop_recycled(self) -> bool:
        if not self._recycled:
            return False
        self._recycled.pop(0).unlink(missing_ok=True)
        return True

    def _enforce_limit(self) -> None:
        if self.max_bytes is None:
            return
        while self._stats.bytes > self.max_bytes and self._drop_oldest():
            continue

    def _make_room(self) -> None:
        """Before a new segment: drop the oldest segments (never unshipped ones) while the
        filesystem has less than ``min_free`` bytes free.

        Raises:
            OSError: ENOSPC, when that is not enough (the journal then enters a gap).
        """
        if not self.min_free:
            return
        while True:
            free = _free_bytes(self.directory)
            if free >= self.min_free:
                return
            if self._drop_recycled():
                continue
            oldest = self._segments[0] if self._segments else None
            if oldest is None or not self._drop_oldest():
                raise OSError(errno.ENOSPC, f"only {free} bytes free on the journal's filesystem (--journal-min-free)")
            log.warning("journal: dropped segment %s to keep %d bytes free", oldest.path.name, self.min_free)

    # --- appending ---------------------------------------------------------------------------

    def append_write(self, offset: int, data: bytes | memoryview) -> int:
        """Append a write; returns a ticket for :meth:`wait_written`.  ``data`` must stay unchanged
        until then (direct appends queue it without a copy)."""
        return self._append(WRITE, offset, len(data), data)[1]

    def append_zero(self, offset: int, length: int) -> int:
        """Append a zeroed (or trimmed) range; returns a ticket for :meth:`wait_written`."""
        return self._append(ZERO, offset, length, b"")[1]

    def append_mark(self, kind: str, name: str, **fields: object) -> int:
        """Append a mark and wait until it is in the file; returns its time (ns)."""
        now, ticket = self._append(MARK, 0, 0, json.dumps({"kind": kind, "name": name, **fields}).encode())
        self.wait_written(ticket)
        return now

    def _append(self, kind: int, offset: int, length: int, data: bytes | memoryview) -> tuple[int, int]:
        """(time, ticket).  During a gap nothing is recorded and the ticket (0) is already written."""
        with self._lock:
            if self.gap is not None and not self._resume():
                return self._tick(), 0
            try:
                step = self._clock_step()
                if step is not None:
                    self._append_locked(MARK, 0, 0, json.dumps(step).encode())
                now, ticket = self._append_locked(kind, offset, length, data)
            except OSError as exc:
                self._enter_gap(exc)
                return self._tick(), 0
        if self.sync:
            self.commit()
        return now, ticket

    def _clock_step(self) -> dict[str, Any] | None:
        """A ``clock`` mark if the wall clock moved against the boot-time clock (which only moves
        forward, through suspends too) by more than CLOCK_STEP_NS since the last record: someone set
        the clock, or NTP stepped it.  Records keep growing times (``_tick``); the mark keeps the
        raw clock, so the journal says why its times and the wall clock disagree."""
        raw, boot = time.time_ns(), time.clock_gettime_ns(time.CLOCK_BOOTTIME)
        offset, previous = raw - boot, self._clock_offset
        self._clock_offset = offset
        if previous is None or abs(offset - previous) <= CLOCK_STEP_NS:
            return None
        step = offset - previous
        log.warning("journal: the wall clock stepped %+.3f s; record times stay in order", step / 1e9)
        return {"kind": "clock", "name": "step", "raw_ns": raw, "step_ns": step}

    def _tick(self) -> int:
        """The next timestamp: wall-clock nanoseconds, forced to grow."""
        self._last_ns = max(time.time_ns(), self._last_ns + 1)
        return self._last_ns

    def _append_locked(self, kind: int, offset: int, length: int, data: bytes | memoryview) -> tuple[int, int]:
        assert self._fd is not None, "journal is closed"
        now = self._tick()
        codec = self._codec
        aligned = self.direct and kind == WRITE and len(data) >= DIRECT_MIN and _page_aligned(data)
        flags = FLAG_ALIGNED if aligned else 0
        header = RECORD_HEADER.pack(RECORD_MAGIC, kind, flags, 0, self._next_seq, now, offset, length, len(data))
        digest = codec.digest(header, data)
        pad = codec.data_start(self._pos, flags) - self._pos - codec.head
        head = header + digest + bytes(pad)
        parts: list[_Part] = [head, _Direct(data) if aligned else data]
        total = len(head) + len(data)
        in_file = True
        if self.direct:
            # a small record with nothing queued before it and no write under way is written
            # at once through the page cache (cheaper than any wait); others wait for a batch
            alone = not self._queued
            self._queued += parts
            in_file = total < DIRECT_MIN and alone and self._io_lock.acquire(blocking=False)
            if in_file:
                try:
                    self._write_queued()
                finally:
                    self._io_lock.release()
        else:
            n = os.writev(self._fd, [head, data])
            if n != total:
                raise _short_write(n, total)
            self._file_end = self._pos + total
        self._account(self._segments[-1], Record(self._next_seq, now, kind, offset, length, b""))
        self._pos += total
        self._written += total
        self._stats.bytes += total
        if in_file:  # and everything before it
            self._on_file = self._written
        if self._pos >= self.segment_bytes:
            with self._io_lock:  # the old segment gets everything queued for it first
                self._write_queued()
                self._on_file = self._written
                self._cond.notify_all()
                self._start_segment()
            self._durable = self._written
            self.durable_seq = self._next_seq - 1
        return now, self._written

    def wait_written(self, ticket: int) -> None:
        """Return once the records appended up to ``ticket`` are in the segment file (at once for
        buffered appends).  Direct appends are written by whichever waiter finds them queued and no
        write under way: it writes everything queued so far in one go, for all the waiters (a
        dedicated writer thread would wait for the GIL behind the request threads, milliseconds).
        If that write fails the journal enters a gap and every waiter returns: the volume's writes
        go on, unjournaled.
        """
        while True:
            with self._cond:
                while self._on_file < ticket and self._writing:
                    self._cond.wait()
                if self._on_file >= ticket:
                    return
                # our record is queued and nobody is writing: write the queue
                self._writing = True
                self._io_lock.acquire()  # a segment switch (lock held, then this) waits for the write
                end = self._written
                parts, self._queued = self._queued, []
            error: OSError | None = None
            try:
                self._write_direct(parts)
            except BaseException as exc:  # whatever it was, the volume's writes go on
                self._broken = True  # set before the io lock goes: nothing may follow a failed batch
                if not isinstance(exc, OSError):
                    log.exception("journal: a batch write failed")
                    exc = OSError(errno.EIO, f"{type(exc).__name__}: {exc}")
                error = exc.with_traceback(None)  # frames of the write hold its buffers
            finally:
                self._io_lock.release()
            with self._cond:
                self._writing = False
                if error is None:
                    self._on_file = max(self._on_file, end)
                else:
                    self._enter_gap(error)
                self._cond.notify_all()

    def _write_queued(self) -> None:
        """Write what is queued now (the lock and the io lock held); ``_on_file`` is then brought
        up to date by the caller (everything appended is in the file)."""
        if self._queued:
            parts, self._queued = self._queued, []
            self._write_direct(parts)

    def _write_direct(self, parts: list[_Part]) -> None:
        """Append a batch of record parts.  A batch of DIRECT_MIN bytes or more goes through O_DIRECT:
        the partial last block and the records, padded to whole blocks, in one aligned ``pwritev``
        that bypasses the page cache; the data of aligned records (``_Direct``) goes from its own
        buffer, everything else through a staging buffer.  A smaller batch is written through the
        page cache, where it costs less than a device round trip; the kernel writes such cached
        pages back before a later O_DIRECT write over them, and the partial last block is kept in
        memory either way."""
        if self._broken:
            raise OSError(errno.EIO, "an earlier journal write failed")
        assert self._fd is not None and self._buffered_fd is not None
        flat = [p.data if isinstance(p, _Direct) else p for p in parts]
        size = sum(len(p) for p in flat)
        if size < DIRECT_MIN:
            end = self._tail_off + len(self._tail)
            written = os.pwritev(self._buffered_fd, flat, end)
            if written != size:
                raise _short_write(written, size)
            tail = self._tail + b"".join(flat)
            whole = len(tail) // ALIGN * ALIGN
            self._tail, self._tail_off = tail[whole:], self._tail_off + whole
            self._file_end = end + size
            return
        direct = [isinstance(p, _Direct) for p in parts]
        for i in [i for i, d in enumerate(direct) if d][MAX_DIRECT_PARTS:]:
            direct[i] = False  # pwritev takes at most IOV_MAX buffers: stage the rest
        staged = len(self._tail) + sum(len(p) for p, d in zip(flat, direct, strict=True) if not d) + ALIGN
        if self._staging is None or len(self._staging) < staged:
            if self._staging is not None:
                self._staging.close()
            self._staging = mmap.mmap(-1, max(staged, 1 << 20))  # page-aligned, as O_DIRECT needs
        buf = self._staging
        with memoryview(buf) as view:
            iov: list[bytes | memoryview] = []
            pos = start = 0  # staging: filled up to pos; the open run of it starts at start
            for part, is_direct in ((self._tail, False), *zip(flat, direct, strict=True)):
                if is_direct:  # the run so far ends on a block boundary of the file
                    if pos > start:
                        iov.append(view[start:pos])
                    iov.append(part)
                    start = pos
                    continue
                buf[pos : pos + len(part)] = part
                pos += len(part)
            need = len(self._tail) + size
            last = pos - start  # the last run: its partial block is the new tail
            padded_last = -(-last // ALIGN) * ALIGN
            buf[pos : start + padded_last] = bytes(start + padded_last - pos)
            if padded_last:
                iov.append(view[start : start + padded_last])
            padded = need - last + padded_last
            written = os.pwritev(self._fd, iov, self._tail_off)
            whole = last // ALIGN * ALIGN
            tail = bytes(view[start + whole : pos])
            del iov
        if written != padded:
            raise _short_write(written, padded)
        self._file_end = self._tail_off + need
        self._tail_off += need - last + whole
        self._tail = tail

    def commit(self) -> None:
        """Make every record appended so far durable (one fdatasync for any number of records).
        A failure puts the journal in a gap (the volume's flush goes on)."""
        with self._sync_lock:
            with self._lock:
                target, seq = self._written, self._next_seq - 1
                if target <= self._durable or self._fd is None:
                    return
            self.wait_written(target)
            with self._lock:
                if self._fd is None:
                    return
                fd = os.dup(self._fd)  # stays valid if a segment switch closes the original
                segment = self._segments[-1].path
            try:
                os.fdatasync(fd)
            except OSError as exc:
                with self._cond:
                    while self._writing:
                        self._cond.wait()
                    if self._fd is not None and self._segments[-1].path == segment:
                        self._enter_gap(exc)
                return
            finally:
                os.close(fd)
            self._durable = max(self._durable, target)
            self.durable_seq = max(self.durable_seq, seq)

    def _commit_loop(self) -> None:
        while not self._stop.wait(self.commit_interval):
            try:
                self.commit()
            except OSError:
                continue  # the journal is being closed; close() commits itself
            if self._applied > self._checkpoint_applied and time.monotonic() >= self._applied_due:
                with self._checkpoint_lock:
                    self._write_checkpoint_locked()
            if self.gap is not None:
                with self._lock:
                    if self.gap is not None and self._fd is None and not self._stop.is_set():
                        self._resume()

    # --- the volume's checkpoint (crash redo, umbra.cow.redo) ------------------------------------

    def save_checkpoint(self, seq: int) -> None:
        """Note that the volume durably holds every record through ``seq`` (called after a volume
        flush).  Not synced: a checkpoint lost in a crash only makes the redo replay more."""
        with self._checkpoint_lock:
            if seq > self._checkpoint:
                self._checkpoint = seq
                self._write_checkpoint_locked()

    def note_applied(self, seq: int) -> None:
        """Note that every record through ``seq`` has been written to the volume (its page cache
        at least: what a killed process leaves behind).  Saved by the commit thread about once a
        second, so a daemon whose clients never flush still has a recent redo checkpoint; it
        counts only while the machine has not restarted since (the boot id)."""
        if seq > self._applied:
            self._applied = seq

    def _write_checkpoint_locked(self) -> None:
        durable, applied = self._checkpoint, max(self._applied, self._checkpoint)
        doc = {"journal": self.id, "seq": durable, "applied": applied, "boot_id": self._boot_id}
        body = json.dumps(doc).encode().ljust(CHECKPOINT_FILE_BYTES, b"\0")
        try:
            fd = os.open(self.directory / "checkpoint", os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                os.pwrite(fd, body, 0)
            finally:
                os.close(fd)
        except OSError as exc:  # a full disk: the redo after a crash replays more
            log.debug("journal: checkpoint not saved: %s", exc)
            return
        self._checkpoint_applied = applied
        self._applied_due = time.monotonic() + CHECKPOINT_EVERY

    def load_checkpoint(self) -> int:
        """The newest record of this journal known to be on the volume (0: none, replay everything
        kept): the durable checkpoint, or the applied one if the machine has not restarted since."""
        doc = self._checkpoint_doc()
        if doc is None:
            return 0
        try:
            durable = int(doc["seq"])
            if doc.get("boot_id") and doc["boot_id"] == boot_id():
                return max(durable, int(doc.get("applied", 0)))
            return durable
        except (ValueError, KeyError, TypeError, OverflowError):  # JSON's Infinity is a float too
            return 0

    def _saved_checkpoint(self) -> int:
        """The durable checkpoint saved for this journal (0: none)."""
        try:
            return int((self._checkpoint_doc() or {}).get("seq", 0))
        except (ValueError, TypeError):
            return 0

    def _checkpoint_doc(self) -> dict[str, Any] | None:
        try:
            doc = json.loads((self.directory / "checkpoint").read_bytes().rstrip(b"\0"))
        except (OSError, ValueError):
            return None
        return doc if isinstance(doc, dict) and doc.get("journal") == self.id else None

    def covers_volume(self) -> bool:
        """Whether the volume's acknowledged writes are durable once the journal is (a flush then
        needs only :meth:`commit`): the journal is recording, and no gap lies between the durable
        checkpoint and now, so a redo after a crash can replay every record since."""
        return self.gap is None and self._checkpoint >= self._redo_floor

    @property
    def checkpoint_seq(self) -> int:
        """The durable checkpoint: every record through it is durable in the volume."""
        return self._checkpoint

    # --- gaps ----------------------------------------------------------------------------------

    def _enter_gap(self, error: OSError) -> None:
        """Stop journaling after a failed write.  Called with the lock held and no direct write
        under way (by the writer whose write failed, or holding the io lock).  The records that
        are whole in the file stay (their writes go on, so they are true); the rest of the open
        segment is cut, every waiter is released, and :meth:`_resume` is tried later."""
        if self.gap is None and self.before_gap is not None:
            try:  # the volume durable now: a redo will not replay across the gap
                self.before_gap()
            except Exception:
                log.exception("journal: the volume's checkpoint before a gap failed")
        self._queued = []
        self._on_file = self._durable = self._written
        self._cond.notify_all()
        if self._fd is not None or self.gap is None:  # a segment was being written: clean it up
            self._close_fds()
            self._recount_open_segment()
            self._stats.last_ns = self._newest_record_ns()
        reason = f"journal write failed: {error.strerror or error}"
        if self.gap is None:  # (the records were just recounted)
            self.gap = JournalGap((self._stats.last_ns or 0) + 1, reason, time.time_ns())
            self._retry_delay = RETRY_FIRST
            log.error("journal: %s; writes go on unjournaled (a gap), retrying", reason)
        else:  # a retry failed: the first failure stays the gap's reason
            log.debug("journal: still in a gap: %s", reason)
            self._retry_delay = min(RETRY_MAX, self._retry_delay * 2)
        self._retry_at = time.monotonic() + self._retry_delay
        self._broken = False
        self._save_gap()

    def _newest_record_ns(self) -> int | None:
        """The time of the newest record kept (None: the journal holds none)."""
        return next((s.last_ns for s in reversed(self._segments) if s.last_ns is not None), None)

    def _recount_open_segment(self) -> None:
        """Account the last segment's records from its file again (its valid prefix) and cut what
        follows; a segment left with no records is removed (the next one takes its name)."""
        if not self._segments:
            return
        old = self._segments.pop()
        seg = _Segment(old.path, old.first_seq, old.salt, version=old.version)
        self._next_seq, saved_ns, end = old.first_seq, self._last_ns, SEGMENT_HEADER.size + 32
        try:
            for rec, rec_end in _segment_records(seg, with_data=False):
                if rec.seq != self._next_seq:
                    break
                self._account(seg, rec)
                end = rec_end
            if seg.records == 0:
                old.path.unlink()
            else:
                _zero_tail(old.path, end)
        except OSError as exc:
            log.error("journal: could not clear the tail of %s after a failed write: %s", old.path.name, exc)
            self._cut = (old.path, end)
        self._last_ns = max(saved_ns, self._last_ns)
        if seg.records:
            self._segments.append(seg)
        self._stats.bytes = sum(s.path.stat().st_size for s in self._segments[:-1]) + (end if seg.records else 0)

    def _resume(self) -> bool:
        """Try to end the gap (the lock held): a new segment whose first record is the gap's mark,
        durable before any later write is recorded.  Returns whether the journal is writing again."""
        gap = self.gap
        assert gap is not None
        if time.monotonic() < self._retry_at or self._writing:
            return False
        try:
            if self._cut is not None:
                _zero_tail(*self._cut)
                self._cut = None
            if self._fd is not None:  # the gap came from outside (mark_gap): end the open segment
                with self._io_lock:  # what is queued for it goes there first
                    self._write_queued()
                self._on_file = self._written
                self._cond.notify_all()
                if self._segments[-1].records:
                    self._seal_fd()
                else:  # nothing in it yet: the new one takes its name
                    self._close_fds()
                    empty = self._segments.pop()
                    empty.path.unlink()
                    self._stats.bytes -= SEGMENT_HEADER.size + 32
            need, free = self.min_free + self.resume_free, _free_bytes(self.directory)
            if free < need:
                raise OSError(errno.ENOSPC, f"waiting for {need} bytes free on the journal's filesystem ({free} now)")
            mark: dict[str, object] = {"kind": "gap", "name": "journal", "since_ns": gap.since_ns, "reason": gap.reason}
            if self._skip is not None:  # sequence numbers that may exist elsewhere are never used again
                mark["first_missing_seq"] = self._skip[0]
                self._next_seq = max(self._next_seq, self._skip[1])
            self._start_segment()
            self._append_locked(MARK, 0, 0, json.dumps(mark).encode())
            with self._io_lock:
                self._write_queued()
            self._on_file = self._written
            assert self._fd is not None
            os.fdatasync(self._fd)
            self._durable = self._written
            self.durable_seq = self._next_seq - 1
            self._redo_floor = self.durable_seq  # a redo cannot replay across the mark
        except OSError as exc:
            self._enter_gap(exc)
            return False
        self.gap, self._skip = None, None
        self.gaps_recorded += 1
        self._save_gap()
        log.warning(
            "journal: writing again; writes from %s to %s are missing from it (recorded as a gap)",
            format_ns(gap.since_ns),
            format_ns(self._last_ns),
        )
        return True

    def mark_gap(self, reason: str, next_seq: int | None = None) -> None:
        """Record that writes after the newest record may be missing although the journal did not
        fail (the source was changed while nobody protected it).  With ``next_seq`` the journal
        goes on from that sequence number (records up to it exist elsewhere: never reuse them)."""
        with self._lock:
            if not any(s.records for s in self._segments):
                return
            if next_seq is not None and next_seq > self._next_seq:
                first = self._skip[0] if self._skip else self._next_seq
                self._skip = (first, max(next_seq, self._skip[1] if self._skip else 0))
            if self.gap is None:
                self.gap = JournalGap((self._newest_record_ns() or 0) + 1, reason, time.time_ns())
            self._retry_at = 0.0
            self._resume()

    def _load_gap(self) -> None:
        """Read the gap file (a gap this journal could not record before it was stopped), or
        create it: it is rewritten in place later, so recording a gap needs no free space."""
        path = self.directory / "gap"
        try:
            body = path.read_bytes().rstrip(b"\0")
        except FileNotFoundError:
            body = b""
            try:
                with open(path, "wb") as f:
                    f.write(bytes(GAP_FILE_BYTES))
                    f.flush()
                    os.fsync(f.fileno())
            except OSError as exc:
                log.error("journal: could not create %s: %s", path, exc)
        if not body:
            return
        if any(s.records for s in self._segments):
            doc = json.loads(body)
            stored = JournalGap(int(doc["since_ns"]), str(doc["reason"]), int(doc["noticed_ns"]))
            if self.gap is None or stored.since_ns < self.gap.since_ns:
                self.gap = stored
            if doc.get("skip"):
                first, nxt = (int(x) for x in doc["skip"])
                self._skip = (min(first, self._skip[0]), max(nxt, self._skip[1])) if self._skip else (first, nxt)
            self._retry_at = 0.0
        else:
            self._save_gap()  # a journal starting afresh (a new id) has nothing to mark

    def _save_gap(self) -> None:
        """Keep the gap (or that there is none) in the gap file; best effort."""
        body = json.dumps({**self.gap.to_dict(), "skip": self._skip}).encode() if self.gap else b""
        try:
            fd = os.open(self.directory / "gap", os.O_WRONLY | os.O_CLOEXEC)
            try:
                os.pwrite(fd, body.ljust(GAP_FILE_BYTES, b"\0"), 0)
                os.fdatasync(fd)
            finally:
                os.close(fd)
        except OSError as exc:
            log.error("journal: could not record the gap in its file: %s", exc)

    # --- reading -----------------------------------------------------------------------------

    def records(
        self, with_data: bool = True, after_seq: int = 0, hint: dict[str, int] | None = None
    ) -> Iterator[Record]:
        """Every record (with seq > ``after_seq``), oldest first; reads the segment files and is
        safe while appending.  Segments that end at or before ``after_seq`` are not read.

        ``hint`` (a dict the caller keeps between calls) remembers where the last record read
        ends, so a reader that follows the journal (the shipper) starts there instead of checking
        the segment from its start again; it is used only while it lies at or before ``after_seq``.
        """
        with self._lock:
            segments = list(self._segments)
        for i, seg in enumerate(segments):
            if i + 1 < len(segments) and segments[i + 1].first_seq - 1 <= after_seq:
                continue
            start = None
            if hint and hint.get("segment") == seg.first_seq and hint["seq"] <= after_seq:
                start = hint["pos"]
            try:
                for record, end in _segment_records(seg, with_data, start):
                    if hint is not None:
                        hint.update(segment=seg.first_seq, pos=end, seq=record.seq)
                    if record.seq > after_seq:
                        yield record
            except FileNotFoundError:
                continue  # dropped by the size limit meanwhile

    @property
    def last_seq(self) -> int:
        """The sequence number of the newest record (0 if none).  Read without the lock (the cow
        engine reads it after every write): while a failed segment is recounted it may read low."""
        return self._next_seq - 1

    def enforce_limit(self) -> None:
        """Apply ``max_bytes`` now (after ``keep_after`` moved)."""
        with self._lock:
            self._enforce_limit()

    def stats(self) -> JournalStats:
        with self._lock:
            st, segs = self._stats, self._segments
            first = next((s.first_ns for s in segs if s.first_ns is not None), None)
            return JournalStats(
                len(segs),
                sum(s.records for s in segs),
                st.bytes,
                first,
                st.last_ns,
                sum(s.write_bytes for s in segs),
                st.recovered_tail_bytes,
            )

    def close(self) -> None:
        self._stop.set()
        if self._committer is not None:
            self._committer.join()
        self.commit()  # direct: also writes what is queued
        with self._lock:
            if self._fd is not None:
                self._seal_fd()
            if self._staging is not None:
                self._staging.close()
                self._staging = None


def boot_id() -> str:
    """This boot of the machine ('' if unknown): what survives a killed process (the page cache)
    does not survive a new one."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def _zero_tail(path: Path, end: int) -> None:
    """Make what follows ``end`` read as zeros (a hole), keeping the file's size: a reader that
    mapped the file meanwhile must not touch pages past its end (SIGBUS).  Recovery cuts a tail
    of zeros off any segment (the sequence check of the next one finds a lost record)."""
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        punch_hole(fd, end, os.fstat(fd).st_size - end)
        os.fdatasync(fd)
    finally:
        os.close(fd)


def _short_write(written: int, size: int) -> OSError:
    """A write that stopped early: the filesystem ran out of room."""
    return OSError(errno.ENOSPC, f"{os.strerror(errno.ENOSPC)} (a short journal write: {written} of {size} bytes)")


def _starts_with_skip(m: mmap.mmap, pos: int, codec: _Codec, first_missing: int) -> bool:
    """Whether the segment's first record is a gap mark that skips sequence numbers from
    ``first_missing`` on (the jump after a damaged part was cut)."""
    if codec.check(m, pos) is None:
        return False
    rec = codec.parse(m, pos)
    return rec.kind == MARK and rec.mark.get("kind") == "gap" and rec.mark.get("first_missing_seq") == first_missing


def _highest_seq(path: Path) -> int:
    """The highest sequence number a (possibly damaged) segment may hold: its valid records'
    highest, or, with an unreadable header, as many records as could fit after its named first."""
    named = int(SEGMENT_NAME.match(path.name).group(1))  # type: ignore[union-attr]
    size = path.stat().st_size
    bound = named + size // (RECORD_HEADER.size + DIGEST_V2)
    if size < SEGMENT_HEADER.size + 32:
        return named
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
        raw = m[: SEGMENT_HEADER.size]
        if blake3.blake3(raw).digest() != m[SEGMENT_HEADER.size : SEGMENT_HEADER.size + 32]:
            return bound
        _magic, version, _r, salt, *_rest = SEGMENT_HEADER.unpack(raw)
        codec = _Codec.of(version, salt)
        highest, pos = named - 1, SEGMENT_HEADER.size + 32
        while (found := _find_valid_after(m, pos, codec)) is not None:
            highest = max(highest, codec.parse(m, found, with_data=False).seq)
            pos = found + 1
        return highest


def _page_aligned(data: bytes | memoryview) -> bool:
    """Whether ``data`` can go to the disk with O_DIRECT as it is: whole blocks in a writable buffer
    starting on a page boundary (the NBD server receives large payloads into such buffers)."""
    if len(data) % ALIGN:
        return False
    try:
        address = ctypes.addressof(ctypes.c_char.from_buffer(data))
    except (TypeError, ValueError):
        return False  # read-only (bytes) or not contiguous
    return address % ALIGN == 0


def _free_bytes(directory: Path) -> int:
    st = os.statvfs(directory)
    return st.f_bavail * st.f_frsize


def _segment_records(seg: _Segment, with_data: bool, start: int | None = None) -> Iterator[tuple[Record, int]]:
    """(record, offset where it ends) from ``start`` (default: the first record)."""
    codec = _Codec.of(seg.version, seg.salt)
    with open(seg.path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
        pos = SEGMENT_HEADER.size + 32 if start is None else start
        while pos < len(m):
            end = codec.check(m, pos)
            if end is None:
                return  # the tail being appended right now
            yield codec.parse(m, pos, with_data), end
            pos = end


def _key(salt: bytes) -> bytes:
    return blake3.blake3(salt, derive_key_context="umbra 2026 cdp journal record checksum").digest()


@dataclass(frozen=True)
class _Codec:
    """How the records of one segment are laid out and checked, by the segment's version.

    Version 1: header, data, then a 16-byte BLAKE3 keyed with a key derived from the salt.
    Version 2: header, a 4-byte CRC32C (seeded with the CRC32C of the salt) over header and data,
    then the data; with ``FLAG_ALIGNED`` zero padding first brings the data to a 4 KiB boundary of
    the file, so a large write goes to the disk with O_DIRECT straight from its own buffer.
    """

    version: int
    key: bytes  # version 1
    seed: int  # version 2

    @classmethod
    def of(cls, version: int, salt: bytes) -> _Codec:
        return cls(version, _key(salt), 0) if version == 1 else cls(version, b"", crc32c.crc32c(salt))

    @property
    def head(self) -> int:
        """Bytes before the data (and its padding)."""
        return RECORD_HEADER.size + (0 if self.version == 1 else DIGEST_V2)

    def digest(self, header: bytes, data: bytes | memoryview) -> bytes:
        if self.version == 1:
            h = blake3.blake3(header, key=self.key)
            h.update(data)
            return h.digest(DIGEST)
        return struct.pack("<I", crc32c.crc32c(data, crc32c.crc32c(header, self.seed)))

    def data_start(self, pos: int, flags: int) -> int:
        start = pos + self.head
        return -(-start // ALIGN) * ALIGN if flags & FLAG_ALIGNED else start

    def check(self, m: mmap.mmap, pos: int) -> int | None:
        """End offset of a valid record at ``pos``, or None."""
        tail = DIGEST if self.version == 1 else 0
        if pos + self.head + tail > len(m):
            return None
        header = m[pos : pos + RECORD_HEADER.size]
        magic, kind, flags, _r, _seq, _t, _off, _len, dlen = RECORD_HEADER.unpack(header)
        if magic != RECORD_MAGIC or kind not in KINDS:
            return None
        if self.version == 1:
            end = pos + RECORD_HEADER.size + dlen + DIGEST
            if end > len(m):
                return None
            h = blake3.blake3(header, key=self.key)
            h.update(m[pos + RECORD_HEADER.size : end - DIGEST])
            return end if h.digest(DIGEST) == m[end - DIGEST : end] else None
        start = self.data_start(pos, flags)
        end = start + dlen
        if end > len(m):
            return None
        with memoryview(m) as view:
            crc = crc32c.crc32c(view[start:end], crc32c.crc32c(header, self.seed))
        return end if struct.pack("<I", crc) == m[pos + RECORD_HEADER.size : pos + self.head] else None

    def parse(self, m: mmap.mmap, pos: int, with_data: bool = True) -> Record:
        """The record at ``pos`` (checked); a mark always comes with its (small) data."""
        _magic, kind, flags, _r, seq, t, off, length, dlen = RECORD_HEADER.unpack_from(m, pos)
        start = pos + RECORD_HEADER.size if self.version == 1 else self.data_start(pos, flags)
        return Record(seq, t, kind, off, length, m[start : start + dlen] if with_data or kind == MARK else b"")


def _all_zero(m: mmap.mmap, pos: int) -> bool:
    step = 1 << 20
    return all((chunk := m[at : at + step]).count(0) == len(chunk) for at in range(pos, len(m), step))


def _find_valid_after(m: mmap.mmap, pos: int, codec: _Codec) -> int | None:
    magic = struct.pack("<I", RECORD_MAGIC)
    while True:
        pos = m.find(magic, pos)
        if pos < 0:
            return None
        if codec.check(m, pos) is not None:
            return pos
        pos += 1
