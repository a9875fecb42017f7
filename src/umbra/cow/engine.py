"""The copy-on-write engine: a volume that keeps snapshots of itself while it is written.

Every write goes through :meth:`CowVolume.write` (or ``zero``): before the first overwrite of a
chunk after a snapshot, the chunk's old contents go to the :class:`DifferenceStore`, shared by
every snapshot that still protects that chunk.  A snapshot reads its copies where they exist and
the live volume elsewhere; chunks it does not protect (unused by the filesystem when the snapshot
was taken, or released after a backup read them) read as zeros.

Durability: with a journal recording, a flush makes only the journal durable; the volume's own
writes are made durable at checkpoints (every CHECKPOINT_INTERVAL seconds, or after
CHECKPOINT_BYTES of writes, by a thread of the engine), and a crash in between is repaired by
replaying the journal from the last checkpoint (:mod:`umbra.cow.redo`), as a database does with
its write-ahead log.  So a synced write costs one device write, not two.

Concurrency: any number of threads may read and write.  Metadata changes happen under one lock;
data moves outside it.  Creating a snapshot raises a barrier: new writes wait and writes in flight
drain, so a snapshot is one instant.  A snapshot read checks for a copy again after reading the
live volume, because a write may have preserved and overwritten the chunk in between.
"""

from __future__ import annotations

import base64
import logging
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

from umbra.cow.bitmap import Bitmap
from umbra.cow.store import DifferenceStore
from umbra.cow.tracking import ChangeTracker
from umbra.errors import DifferenceStoreFull, SnapshotFailed, UsageError
from umbra.volume.backing import Backing
from umbra.volume.extents import Extent

MIN_CHUNK = 512
CHECKPOINT_INTERVAL = 30.0  # seconds: the kernel writes dirty pages back after 30 s anyway
CHECKPOINT_BYTES = 1 << 30  # written since the last checkpoint: bounds the redo after a crash
CHECKPOINT_POLL = 0.5
SNAPSHOT_NAME_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-")

log = logging.getLogger(__name__)


def _pack(bitmap: Bitmap) -> str:
    return base64.b64encode(zlib.compress(bytes(bitmap.bits))).decode()


def _unpack(text: str, nbits: int) -> Bitmap:
    return Bitmap(nbits, bits=zlib.decompress(base64.b64decode(text)))


class WriteLog(Protocol):
    """What the engine needs of a journal (see :mod:`umbra.cow.journal`)."""

    def append_write(self, offset: int, data: bytes | memoryview) -> int: ...
    def append_zero(self, offset: int, length: int) -> int: ...
    def wait_written(self, ticket: int) -> None: ...
    def append_mark(self, kind: str, name: str, **fields: object) -> int: ...
    def commit(self) -> None: ...
    def save_checkpoint(self, seq: int) -> None: ...
    def note_applied(self, seq: int) -> None: ...
    def covers_volume(self) -> bool: ...
    @property
    def last_seq(self) -> int: ...

    keeps_redo: bool
    before_gap: Callable[[], None] | None


@dataclass
class _Snap:
    name: str
    created_ns: int
    protected: Bitmap  # chunks whose original is still needed and not yet copied
    copies: dict[int, int] = field(default_factory=dict)  # chunk -> difference store slot
    generation: str | None = None
    changed_since: dict[str, Bitmap] = field(default_factory=dict)  # frozen tracking bitmaps
    journal_seq: int | None = None  # the sequence number of the snapshot's journal mark
    failed: str | None = None


@dataclass
class SnapshotInfo:
    name: str
    created_ns: int
    generation: str | None
    protected_chunks: int
    copied_chunks: int
    failed: str | None
    journal_seq: int | None = None


class CowVolume:
    def __init__(
        self,
        backing: Backing,
        store: DifferenceStore,
        chunk_size: int = 64 * 1024,
        tracker: ChangeTracker | None = None,
        journal: WriteLog | None = None,
        name: str = "volume",
        sync: bool = False,
        checkpoint_interval: float = CHECKPOINT_INTERVAL,
        checkpoint_bytes: int = CHECKPOINT_BYTES,
        flush_marks: bool = False,
    ) -> None:
        if chunk_size < MIN_CHUNK or chunk_size & (chunk_size - 1):
            raise UsageError(f"chunk size must be a power of two of at least {MIN_CHUNK} bytes")
        self.backing = backing
        self.store = store
        self.chunk_size = chunk_size
        self.size = backing.size
        self.nchunks = -(-self.size // chunk_size)
        self.tracker = tracker
        self.journal = journal
        self.name = name
        self.sync = sync  # every write durable before it is acknowledged
        # a `flush` mark after each flush (tests model a disk cache that loses unflushed writes)
        self.flush_marks = flush_marks
        self._cond = threading.Condition()
        self._snaps: dict[str, _Snap] = {}
        self._ranges: list[tuple[int, int, int]] = []  # writes in flight: start, end, journal seq
        self._barrier = 0
        # every journal record through this one has reached the volume (the low watermark of the
        # writes in flight): a flush makes it the redo checkpoint
        self._quiet_seq = journal.last_seq if journal is not None else 0
        self.writes = 0
        self.bytes_written = 0
        self.checkpoint_interval = checkpoint_interval
        self.checkpoint_bytes = checkpoint_bytes
        self.checkpoints = 0
        self._checkpoint_lock = threading.Lock()
        self._checkpointed_bytes = 0  # bytes_written at the last checkpoint
        self._checkpoint_due = time.monotonic() + checkpoint_interval
        self._stopping = threading.Event()
        self._checkpointer: threading.Thread | None = None
        if journal is not None:
            journal.keeps_redo = True
            journal.before_gap = self._before_gap
            self._checkpointer = threading.Thread(target=self._checkpoint_loop, name="umbra-checkpoint", daemon=True)
            self._checkpointer.start()

    # --- live volume -------------------------------------------------------------------------

    def read(self, offset: int, length: int) -> bytes:
        self._check_range(offset, length)
        return self.backing.pread(length, offset)

    def write(self, offset: int, data: bytes | memoryview, fua: bool = False) -> None:
        self._apply(offset, len(data), data, lambda: self.backing.pwrite(data, offset), fua)

    def zero(self, offset: int, length: int, fua: bool = False) -> None:
        """Write zeros (NBD WRITE_ZEROES and TRIM both land here: trimmed ranges read as zeros)."""
        self._apply(offset, length, None, lambda: self.backing.zero(offset, length), fua)

    def _apply(
        self, offset: int, length: int, data: bytes | memoryview | None, io: Callable[[], None], fua: bool
    ) -> None:
        """Preserve, track and journal the range, then do ``io`` outside the lock."""
        self._check_range(offset, length)
        if not length:
            return
        span, ticket = self._begin_write(offset, length, data)
        try:
            if ticket is not None and self.journal is not None:
                # write-ahead: the record is in the journal file before the volume changes; waited
                # for outside the lock, so appends in flight together share one journal write
                self.journal.wait_written(ticket)
            io()
        finally:
            self._end_write(span)
        if fua or self.sync:
            self.flush()

    def flush(self) -> None:
        """Make every acknowledged write durable: the journal alone while a redo can replay it
        onto the volume (:meth:`WriteLog.covers_volume`), else a checkpoint."""
        self._flush()
        if self.flush_marks and self.journal is not None:
            self.journal.append_mark("flush", "")  # every record before it is durable now

    def _flush(self) -> None:
        if self.journal is not None and self.journal.covers_volume():
            self.journal.commit()
            if self.journal.covers_volume():  # (a failed commit enters a gap)
                return
        self.checkpoint()

    def checkpoint(self) -> None:
        """Make the volume durable: journal first, then the volume, then the journal's checkpoint
        (the redo after a crash starts there)."""
        with self._checkpoint_lock:
            seq, written = self._quiet_seq, self.bytes_written
            if self.journal is not None:
                self.journal.commit()
            self.backing.flush()
            if self.journal is not None:
                self.journal.save_checkpoint(seq)
            self._checkpointed_bytes = written
            self._checkpoint_due = time.monotonic() + self.checkpoint_interval
            self.checkpoints += 1

    def _before_gap(self) -> None:
        """The journal is about to stop recording (its lock held, so no journal calls here): make
        the volume durable before any unjournaled write reaches it, since a redo never replays
        across a gap."""
        seq = self._quiet_seq
        self.backing.flush()
        assert self.journal is not None
        self.journal.save_checkpoint(seq)

    def _checkpoint_loop(self) -> None:
        while not self._stopping.wait(CHECKPOINT_POLL):
            written = self.bytes_written - self._checkpointed_bytes
            if written >= self.checkpoint_bytes or (written and time.monotonic() >= self._checkpoint_due):
                try:
                    self.checkpoint()
                except Exception:  # the next flush or checkpoint tries again
                    log.exception("cow: checkpoint of %s failed", self.name)

    def stop(self) -> None:
        """Stop the background checkpoints and take a last one (before a clean shutdown)."""
        self._stopping.set()
        if self._checkpointer is not None:
            self._checkpointer.join()
            self._checkpointer = None
        self.checkpoint()

    def _begin_write(
        self, offset: int, length: int, data: bytes | memoryview | None
    ) -> tuple[tuple[int, int, int], int | None]:
        """Preserve, track and journal under the lock.  A write that overlaps one in flight waits
        for it, so overlapping writes reach the volume in their journal order (what CDP replays)."""
        first, end = offset // self.chunk_size, (offset + length - 1) // self.chunk_size + 1
        with self._cond:
            while self._barrier or any(s < offset + length and offset < e for s, e, _ in self._ranges):
                self._cond.wait()
            self._preserve(first, end)
            if self.tracker is not None:
                self.tracker.mark(first, end)
            ticket = None
            if self.journal is not None:
                if data is None:
                    ticket = self.journal.append_zero(offset, length)
                else:
                    ticket = self.journal.append_write(offset, data)
            span = (offset, offset + length, self.journal.last_seq if self.journal is not None else 0)
            self._ranges.append(span)
            self.writes += 1
            self.bytes_written += length
        return span, ticket

    def _end_write(self, span: tuple[int, int, int]) -> None:
        with self._cond:
            self._ranges.remove(span)
            if self.journal is not None:
                # writes finish out of order: everything before the oldest still in flight is done
                self._quiet_seq = min(r[2] for r in self._ranges) - 1 if self._ranges else self.journal.last_seq
                self.journal.note_applied(self._quiet_seq)
            self._cond.notify_all()  # the barrier and writes waiting for an overlapping range

    def _preserve(self, first: int, end: int) -> None:
        live = [s for s in self._snaps.values() if s.failed is None]
        if not live:
            return
        for c in range(first, end):
            needers = [s for s in live if s.failed is None and s.protected.test(c)]
            if not needers:
                continue
            old = self.backing.pread(self._chunk_len(c), c * self.chunk_size)
            try:
                slot = self.store.put(old, len(needers))
            except DifferenceStoreFull as exc:
                for s in needers:
                    self._fail(s, f"{exc} while preserving chunk {c}; the snapshot was dropped, writes go on")
                continue
            for s in needers:
                s.copies[c] = slot
                s.protected.clear(c)

    def _fail(self, snap: _Snap, reason: str) -> None:
        snap.failed = reason
        for slot in snap.copies.values():
            self.store.unref(slot)
        snap.copies.clear()
        snap.protected = Bitmap(0)

    # --- snapshots ---------------------------------------------------------------------------

    def create_snapshot(self, name: str, used: list[Extent] | None = None) -> SnapshotInfo:
        """Take a snapshot at this instant.  ``used``: byte extents worth protecting (None: all)."""
        if not name or set(name) - SNAPSHOT_NAME_CHARS or len(name) > 64:
            raise UsageError(f"invalid snapshot name {name!r} (letters, digits, '.', '_', '-')")
        with self._cond:
            if name in self._snaps:
                raise UsageError(f"snapshot {name!r} of {self.name} exists")
            self._barrier += 1
            try:
                while self._ranges:  # writes in flight drain first
                    self._cond.wait()
                protected = Bitmap(self.nchunks, fill=used is None)
                for start, end in used or []:
                    protected.set_range(start // self.chunk_size, -(-end // self.chunk_size))
                generation, frozen = self.tracker.start_generation() if self.tracker else (None, {})
                created = self.journal.append_mark("snapshot", name) if self.journal else time.time_ns()
                seq = self.journal.last_seq if self.journal else None  # appends happen under this lock
                snap = _Snap(name, created, protected, generation=generation, changed_since=frozen, journal_seq=seq)
                self._snaps[name] = snap
                return self._info(snap)
            finally:
                self._barrier -= 1
                self._cond.notify_all()

    def delete_snapshot(self, name: str) -> None:
        with self._cond:
            snap = self._snaps.pop(name, None)
            if snap is None:
                raise UsageError(f"no snapshot {name!r} of {self.name}")
            for slot in snap.copies.values():
                self.store.unref(slot)
            snap.copies.clear()
            snap.failed = "deleted"
            if self.journal is not None:
                self.journal.append_mark("snapshot-deleted", name)

    def snapshots(self) -> list[SnapshotInfo]:
        with self._cond:
            return [self._info(s) for s in self._snaps.values()]

    def snapshot(self, name: str) -> SnapshotInfo:
        with self._cond:
            return self._info(self._get(name, allow_failed=True))

    def changed_chunks(self, name: str, since_generation: str) -> Bitmap | None:
        """Chunks written between the snapshot that started ``since_generation`` and ``name``, or
        None if that is not known (tracking lost, or the generation is too old)."""
        with self._cond:
            return self._get(name).changed_since.get(since_generation)

    def read_snapshot(self, name: str, offset: int, length: int) -> bytes:
        self._check_range(offset, length)
        out = bytearray(length)
        for c, start, end in self._pieces(offset, length):
            with self._cond:
                snap = self._get(name)
                slot = snap.copies.get(c)
                protected = slot is None and snap.protected.test(c)
            if slot is None and not protected:
                continue  # not protected: reads as zeros
            base = c * self.chunk_size
            if slot is None:
                data = self.backing.pread(end - start, start)
                with self._cond:  # a write may have preserved and overwritten it meanwhile
                    slot = self._get(name).copies.get(c)
                if slot is None:
                    out[start - offset : end - offset] = data
                    continue
            chunk = self._store_get(name, slot, self._chunk_len(c))
            out[start - offset : end - offset] = chunk[start - base : end - base]
        with self._cond:
            self._get(name)  # failed while we read: the data may be torn
        return bytes(out)

    def _store_get(self, name: str, slot: int, length: int) -> bytes:
        try:
            return self.store.get(slot, length)
        except KeyError:  # released or deleted while we read
            with self._cond:
                self._get(name)
            raise SnapshotFailed(name=name, volume=self.name, reason="released while being read") from None

    def release(self, name: str, offset: int, length: int) -> int:
        """Stop protecting the chunks wholly inside the range (a backup has read them); returns
        how many chunks were released.  They read as zeros afterwards."""
        self._check_range(offset, length)
        first = -(-offset // self.chunk_size)
        end = (offset + length) // self.chunk_size
        if offset + length == self.size:
            end = self.nchunks
        released = 0
        with self._cond:
            snap = self._get(name)
            for c in range(first, end):
                slot = snap.copies.pop(c, None)
                if slot is not None:
                    self.store.unref(slot)
                    released += 1
                elif snap.protected.test(c):
                    snap.protected.clear(c)
                    released += 1
        return released

    def snapshot_allocation(self, name: str, offset: int, length: int) -> Iterator[tuple[int, int, bool]]:
        """(start, end, has_data) runs of a snapshot: unprotected chunks read as zeros."""
        with self._cond:
            snap = self._get(name)
            run_start, run_data = offset, None
            for c, start, _end in self._pieces(offset, length):
                data = c in snap.copies or snap.protected.test(c)
                if run_data is not None and data != run_data:
                    yield run_start, start, run_data
                    run_start = start
                run_data = data
            if run_data is not None:
                yield run_start, offset + length, run_data

    # --- helpers -----------------------------------------------------------------------------

    def _get(self, name: str, allow_failed: bool = False) -> _Snap:
        snap = self._snaps.get(name)
        if snap is None:
            raise SnapshotFailed(name=name, volume=self.name, reason="no such snapshot")
        if snap.failed is not None and not allow_failed:
            raise SnapshotFailed(name=name, volume=self.name, reason=snap.failed)
        return snap

    def _info(self, snap: _Snap) -> SnapshotInfo:
        return SnapshotInfo(
            snap.name,
            snap.created_ns,
            snap.generation,
            snap.protected.count(),
            len(snap.copies),
            snap.failed,
            snap.journal_seq,
        )

    def _chunk_len(self, c: int) -> int:
        return min(self.chunk_size, self.size - c * self.chunk_size)

    def _pieces(self, offset: int, length: int) -> Iterator[tuple[int, int, int]]:
        pos, end = offset, offset + length
        while pos < end:
            c = pos // self.chunk_size
            piece_end = min(end, (c + 1) * self.chunk_size)
            yield c, pos, piece_end
            pos = piece_end

    def _check_range(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0 or offset + length > self.size:
            raise UsageError(f"range {offset}+{length} is outside the volume ({self.size} bytes)")

    # --- keeping snapshots across a clean restart ------------------------------------------------

    def export_snapshots(self) -> list[dict[str, Any]]:
        """Every usable snapshot's metadata (copies are slots of the store, which persists itself)."""
        with self._cond:
            return [
                {
                    "name": s.name,
                    "created_ns": s.created_ns,
                    "generation": s.generation,
                    "protected": _pack(s.protected),
                    "copies": [[c, slot] for c, slot in s.copies.items()],
                    "changed_since": {g: _pack(b) for g, b in s.changed_since.items()},
                    "journal_seq": s.journal_seq,
                }
                for s in self._snaps.values()
                if s.failed is None
            ]

    def import_snapshots(self, docs: list[dict[str, Any]]) -> None:
        with self._cond:
            for d in docs:
                snap = _Snap(
                    d["name"],
                    int(d["created_ns"]),
                    _unpack(d["protected"], self.nchunks),
                    {int(c): int(slot) for c, slot in d["copies"]},
                    d["generation"],
                    {g: _unpack(b, self.nchunks) for g, b in d["changed_since"].items()},
                    journal_seq=d.get("journal_seq"),
                )
                self._snaps[snap.name] = snap

    def close(self, keep_store: bool = False) -> None:
        self._stopping.set()
        self.store.close(keep=keep_store)
