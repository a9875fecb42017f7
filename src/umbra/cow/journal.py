"""The CDP journal: every write of a protected volume with its timestamp, in append-only segments.

Layout (``docs/FORMAT.md``, "CDP journal"): a directory of segment files ``seg-<first seq>.ucj``.
Each segment starts with a header carrying a random 16-byte salt; each record is a fixed header,
its data, and a 16-byte BLAKE3 checksum keyed by that salt over header and data.  Sequence numbers
grow by one and timestamps never decrease (``time_ns`` forced monotonic), across segments.

Durability: records are written (``writev``) before the write is acknowledged.  By default a
background thread makes them durable every ``commit_interval`` seconds (group commit); ``commit``
makes them durable at once (NBD FLUSH and FUA, and every write with ``--sync``).

With ``direct``, an append only queues the record (under the lock, no copy); the caller then
waits for it with :meth:`Journal.wait_written` *after* releasing its own locks, and the first
waiter to find the queue unwritten writes all of it in one O_DIRECT write, bypassing the page
cache: writes in flight together share one device write, and none waits for another's under the
cow engine's lock.

Recovery on open: every segment but the last must be intact.  In the last, the records are read
up to the first one that does not check; if nothing valid follows, that is a torn tail (a write
cut short by a crash) and it is cut off; if a valid record follows, the damage is in the middle
and :class:`JournalCorrupt` is raised: history is never silently dropped.
"""

from __future__ import annotations

import json
import mmap
import os
import re
import secrets
import struct
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import blake3

from umbra.errors import JournalCorrupt

SEGMENT_MAGIC = b"UMBRAJNL"
SEGMENT_VERSION = 1
SEGMENT_HEADER = struct.Struct("<8sII16sQQQ")  # magic, version, reserved, salt, volume size, first seq, created ns
RECORD_MAGIC = 0x55524543  # "CERU" little-endian on disk: b"CERU"
RECORD_HEADER = struct.Struct("<IBBHQQQII")  # magic, kind, flags, reserved, seq, time ns, offset, length, data length
DIGEST = 16
ALIGN = 4096  # O_DIRECT granularity of the journal's appends
DIRECT_MIN = 256 << 10  # direct appends: smaller batches go through the page cache
SEGMENT_NAME = re.compile(r"^seg-(\d{16})\.ucj$")

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
    ) -> None:
        self.directory = directory
        self.volume_size = volume_size
        self.sync = sync
        self.commit_interval = commit_interval
        self.segment_bytes = segment_bytes
        self.max_bytes = max_bytes
        self._lock = threading.Lock()  # appends
        self._sync_lock = threading.Lock()  # fdatasync calls
        self._segments: list[_Segment] = []
        self._fd: int | None = None
        self._key = b""
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
        self._queued: list[bytes | memoryview] = []  # direct: record parts the writer thread has not written
        self._on_file = 0  # bytes appended (counted like _written) that are in the segment file
        self._writing = False  # direct: a waiter is writing the queue
        self._write_error: OSError | None = None

    # --- opening and recovery ----------------------------------------------------------------

    @classmethod
    def open(cls, directory: Path, volume_size: int, **options: object) -> Journal:
        directory.mkdir(parents=True, exist_ok=True)
        journal = cls(directory, volume_size, **options)  # type: ignore[arg-type]
        journal._recover()
        journal._load_id()
        journal._start_segment()
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
        names = sorted(p for p in self.directory.iterdir() if SEGMENT_NAME.match(p.name))
        for i, path in enumerate(names):
            last = i == len(names) - 1
            seg, valid_end, size = self._scan(path, last)
            if seg is None:
                if last and size < SEGMENT_HEADER.size + 32:  # created but header never written out
                    path.unlink()
                    continue
                raise JournalCorrupt(path=str(path), offset=0, reason="bad segment header")
            if valid_end < size:
                self._stats.recovered_tail_bytes += size - valid_end
                os.truncate(path, valid_end)
            if last and valid_end == SEGMENT_HEADER.size + 32:  # no records: the new segment replaces it
                path.unlink()
                continue
            self._segments.append(seg)
            self._stats.bytes += valid_end

    def _scan(self, path: Path, last: bool) -> tuple[_Segment | None, int, int]:
        size = path.stat().st_size
        if size < SEGMENT_HEADER.size + 32:
            return None, 0, size
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
            seg = self._parse_header(path, m)
            if seg is None:
                return None, 0, size
            key = _key(seg.salt)
            pos = SEGMENT_HEADER.size + 32
            expected = seg.first_seq
            while pos < size:
                rec_end = _check_record(m, pos, key)
                if rec_end is None:
                    break
                rec = _parse(m, pos)
                if rec.seq != expected or rec.time_ns < self._last_ns:
                    raise JournalCorrupt(path=str(path), offset=pos, reason="records out of order")
                self._account(seg, rec)
                expected += 1
                pos = rec_end
            if pos < size:
                if not last:
                    raise JournalCorrupt(path=str(path), offset=pos, reason="damaged record in a sealed segment")
                following = _find_valid_after(m, pos + 1, key)
                if following is not None:
                    raise JournalCorrupt(
                        path=str(path),
                        offset=pos,
                        reason=f"damaged record followed by valid records (at {following}); not truncating",
                    )
            return seg, pos, size

    def _parse_header(self, path: Path, m: mmap.mmap) -> _Segment | None:
        raw = m[: SEGMENT_HEADER.size]
        if blake3.blake3(raw).digest() != m[SEGMENT_HEADER.size : SEGMENT_HEADER.size + 32]:
            return None
        magic, version, _r, salt, vsize, first_seq, _created = SEGMENT_HEADER.unpack(raw)
        if magic != SEGMENT_MAGIC or version != SEGMENT_VERSION:
            return None
        if vsize != self.volume_size:
            raise JournalCorrupt(path=str(path), offset=0, reason=f"written for a volume of {vsize} bytes")
        if first_seq != self._next_seq and self._segments:
            raise JournalCorrupt(path=str(path), offset=0, reason="segments out of sequence (one is missing)")
        self._next_seq = first_seq
        return _Segment(path, first_seq, salt)

    def _account(self, seg: _Segment, rec: Record) -> None:
        seg.records += 1
        if seg.first_ns is None:
            seg.first_ns = rec.time_ns
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
        os.close(self._fd)
        self._fd = None
        if self._buffered_fd is not None:
            os.close(self._buffered_fd)
            self._buffered_fd = None

    def _start_segment(self) -> None:
        if self._fd is not None:
            self._seal_fd()
        salt = secrets.token_bytes(16)
        path = self.directory / f"seg-{self._next_seq:016d}.ucj"
        header = SEGMENT_HEADER.pack(
            SEGMENT_MAGIC, SEGMENT_VERSION, 0, salt, self.volume_size, self._next_seq, time.time_ns()
        )
        head = header + blake3.blake3(header).digest()
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND | os.O_CLOEXEC, 0o600)
        os.write(fd, head)
        os.fdatasync(fd)
        dfd = os.open(self.directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
        if self.direct:
            try:
                direct_fd = os.open(path, os.O_WRONLY | os.O_DIRECT | os.O_CLOEXEC)
            except OSError:
                self.direct = False  # a filesystem without O_DIRECT (tmpfs): buffered appends
            else:
                os.close(fd)
                fd, self._tail, self._tail_off = direct_fd, head, 0
                self._buffered_fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)  # small batches (no O_APPEND)
        self._fd, self._key, self._pos = fd, _key(salt), SEGMENT_HEADER.size + 32
        self._segments.append(_Segment(path, self._next_seq, salt))
        self._stats.bytes += self._pos
        self._enforce_limit()

    def _enforce_limit(self) -> None:
        if self.max_bytes is None:
            return
        while len(self._segments) > 1 and self._stats.bytes > self.max_bytes:
            if self.keep_after is not None and self._segments[1].first_seq - 1 > self.keep_after:
                return  # the oldest segment holds records not shipped yet
            oldest = self._segments.pop(0)
            self._stats.bytes -= oldest.path.stat().st_size
            oldest.path.unlink()

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
        with self._lock:
            assert self._fd is not None, "journal is closed"
            now = max(time.time_ns(), self._last_ns + 1)
            header = RECORD_HEADER.pack(RECORD_MAGIC, kind, 0, 0, self._next_seq, now, offset, length, len(data))
            h = blake3.blake3(header, key=self._key)
            h.update(data)
            digest = h.digest(DIGEST)
            total = len(header) + len(data) + DIGEST
            in_file = True
            if self.direct:
                self._queued += (header, data, digest)
                # a small record with nothing queued before it and no write under way is written
                # at once through the page cache (cheaper than any wait); others wait for a batch
                in_file = total < DIRECT_MIN and len(self._queued) == 3 and self._io_lock.acquire(blocking=False)
                if in_file:
                    try:
                        self._write_queued()
                    finally:
                        self._io_lock.release()
            else:
                n = os.writev(self._fd, [header, data, digest])
                if n != total:
                    raise OSError(f"short journal write ({n} of {total} bytes)")
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
            ticket = self._written
        if self.sync:
            self.commit()
        return now, ticket

    def wait_written(self, ticket: int) -> None:
        """Return once the records appended up to ``ticket`` are in the segment file (at once for
        buffered appends).  Direct appends are written by whichever waiter finds them queued and no
        write under way: it writes everything queued so far in one go, for all the waiters (a
        dedicated writer thread would wait for the GIL behind the request threads, milliseconds).

        Raises:
            OSError: a direct write failed (the journal cannot go on).
        """
        while True:
            with self._cond:
                while self._on_file < ticket and self._writing:
                    self._cond.wait()
                if self._on_file >= ticket:
                    return
                if self._write_error is not None:
                    raise OSError(self._write_error.errno, f"journal write failed: {self._write_error}")
                # our record is queued and nobody is writing: write the queue
                self._writing = True
                self._io_lock.acquire()  # a segment switch (lock held, then this) waits for the write
                end = self._written
                parts, self._queued = self._queued, []
            error: OSError | None = None
            try:
                self._write_direct(parts)
            except OSError as exc:
                error = exc
            finally:
                self._io_lock.release()
            with self._cond:
                self._writing = False
                if error is None:
                    self._on_file = max(self._on_file, end)
                else:
                    self._write_error = error
                self._cond.notify_all()

    def _write_queued(self) -> None:
        """Write what is queued now (the lock and the io lock held); ``_on_file`` is then brought
        up to date by the caller (everything appended is in the file)."""
        if self._queued:
            parts, self._queued = self._queued, []
            self._write_direct(parts)

    def _write_direct(self, parts: list[bytes | memoryview]) -> None:
        """Append a batch of record parts.  A batch of DIRECT_MIN bytes or more goes through O_DIRECT:
        the partial last block and the records, padded to whole blocks, in one aligned write that
        bypasses the page cache.  A smaller one is written through the page cache, where it costs
        less than a device round trip; the kernel writes such cached pages back before a later
        O_DIRECT write over them, and the partial last block is kept in memory either way."""
        assert self._fd is not None and self._buffered_fd is not None
        size = sum(len(p) for p in parts)
        if size < DIRECT_MIN:
            end = self._tail_off + len(self._tail)
            written = os.pwritev(self._buffered_fd, parts, end)
            if written != size:
                raise OSError(f"short journal write ({written} of {size} bytes)")
            tail = self._tail + b"".join(parts)
            whole = len(tail) // ALIGN * ALIGN
            self._tail, self._tail_off = tail[whole:], self._tail_off + whole
            return
        need = len(self._tail) + size
        padded = -(-need // ALIGN) * ALIGN
        if self._staging is None or len(self._staging) < padded:
            if self._staging is not None:
                self._staging.close()
            self._staging = mmap.mmap(-1, max(padded, 1 << 20))  # page-aligned, as O_DIRECT needs
        buf = self._staging
        pos = 0
        for part in (self._tail, *parts):
            buf[pos : pos + len(part)] = part
            pos += len(part)
        buf[need:padded] = bytes(padded - need)
        written = os.pwrite(self._fd, memoryview(buf)[:padded], self._tail_off)
        if written != padded:
            raise OSError(f"short journal write ({written} of {padded} bytes)")
        whole = need // ALIGN * ALIGN
        self._tail = bytes(buf[whole:need])
        self._tail_off += whole

    def commit(self) -> None:
        """Make every record appended so far durable (one fdatasync for any number of records)."""
        with self._sync_lock:
            with self._lock:
                target = self._written
                if target <= self._durable or self._fd is None:
                    return
            self.wait_written(target)
            with self._lock:
                if self._fd is None:
                    return
                fd = os.dup(self._fd)  # stays valid if a segment switch closes the original
            try:
                os.fdatasync(fd)
            finally:
                os.close(fd)
            self._durable = max(self._durable, target)

    def _commit_loop(self) -> None:
        while not self._stop.wait(self.commit_interval):
            try:
                self.commit()
            except OSError:
                continue  # the journal is being closed; close() commits itself

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
        """The sequence number of the newest record (0 if none)."""
        with self._lock:
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


def _segment_records(seg: _Segment, with_data: bool, start: int | None = None) -> Iterator[tuple[Record, int]]:
    """(record, offset where it ends) from ``start`` (default: the first record)."""
    with open(seg.path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
        key = _key(seg.salt)
        pos = SEGMENT_HEADER.size + 32 if start is None else start
        while pos < len(m):
            end = _check_record(m, pos, key)
            if end is None:
                return  # the tail being appended right now
            yield _parse(m, pos, with_data), end
            pos = end


def _key(salt: bytes) -> bytes:
    return blake3.blake3(salt, derive_key_context="umbra 2026 cdp journal record checksum").digest()


def _check_record(m: mmap.mmap, pos: int, key: bytes) -> int | None:
    """End offset of a valid record at ``pos``, or None."""
    if pos + RECORD_HEADER.size + DIGEST > len(m):
        return None
    header = m[pos : pos + RECORD_HEADER.size]
    magic, kind, _f, _r, _seq, _t, _off, _len, dlen = RECORD_HEADER.unpack(header)
    end = pos + RECORD_HEADER.size + dlen + DIGEST
    if magic != RECORD_MAGIC or kind not in KINDS or end > len(m):
        return None
    h = blake3.blake3(header, key=key)
    h.update(m[pos + RECORD_HEADER.size : end - DIGEST])
    return end if h.digest(DIGEST) == m[end - DIGEST : end] else None


def _parse(m: mmap.mmap, pos: int, with_data: bool = True) -> Record:
    _magic, kind, _f, _r, seq, t, off, length, dlen = RECORD_HEADER.unpack_from(m, pos)
    start = pos + RECORD_HEADER.size
    return Record(seq, t, kind, off, length, m[start : start + dlen] if with_data else b"")


def _find_valid_after(m: mmap.mmap, pos: int, key: bytes) -> int | None:
    magic = struct.pack("<I", RECORD_MAGIC)
    while True:
        pos = m.find(magic, pos)
        if pos < 0:
            return None
        if _check_record(m, pos, key) is not None:
            return pos
        pos += 1
