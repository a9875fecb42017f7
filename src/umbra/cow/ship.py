"""Journal shipping: a protected volume's CDP journal streamed into the repository.

A thread tails the local journal and stores its records as batches (:mod:`umbra.repo.cdp`): data
blobs into packs, the packs' index, then the batch object last, all under a shared repository
lock taken per batch (so prune can run between batches and never removes what a batch is
writing).  Where it got to is read back from the repository itself when the daemon starts, so a
crash or kill loses nothing: records not yet shipped are still in the local journal, which keeps
them (``Journal.keep_after``) however small its size limit.  A repository that cannot be written
(outage, full disk) is retried with backoff; the lag grows and shrinks again once it is back.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from umbra.cow.journal import MARK, WRITE, ZERO, Journal, Record
from umbra.errors import ObjectMissing, UmbraError
from umbra.repo import cdp
from umbra.repo.cdp import BatchRef, CdpRecord
from umbra.repo.format import BlobType
from umbra.repo.index import encode_index
from umbra.repo.pack import PackEntry
from umbra.repo.repository import Repository
from umbra.repo.writer import BlobWriter

log = logging.getLogger(__name__)
KIND_NAMES = {WRITE: cdp.WRITE, ZERO: cdp.ZERO, MARK: cdp.MARK}
MERGE_INDEX_FILES = 32  # batches whose index files are merged into one


@dataclass
class ShippingStatus:
    journal: str
    shipped_seq: int
    shipped_through: int | None  # time (ns) of the newest shipped record
    pending_records: int
    lag_s: float  # age of the oldest record not yet shipped (0: nothing pending)
    batches: int
    bytes_shipped: int
    last_error: str | None
    last_batch_s: float | None


class Shipper:
    def __init__(
        self,
        journal: Journal,
        repo: Repository,
        volume: str,
        interval: float = 0.25,
        max_batch_bytes: int = 32 << 20,
    ) -> None:
        self.journal = journal
        self.repo = repo
        self.volume = volume
        self.interval = interval
        self.max_batch_bytes = max_batch_bytes
        self.shipped_seq: int | None = None  # read from the repository by the first batch
        journal.keep_after = 0  # until then, keep every record
        self._index_names: set[str] = set()
        self._hint: dict[str, int] = {}  # where the journal was last read (Journal.records)
        self._own_index_files: list[str] = []  # index files of our batches since the last merge
        self._own_packs: dict[str, list[PackEntry]] = {}
        self._pool = ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2), thread_name_prefix="umbra-seal")
        self._shipped_ns: int | None = None
        self._oldest_pending_ns: int | None = None
        self._batches = 0
        self._bytes = 0
        self._error: str | None = None
        self._last_batch_s: float | None = None
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._loop, name="umbra-ship", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, drain: bool = True) -> None:
        """Stop the thread; with ``drain``, ship what is pending first (one last try)."""
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join()
        if drain:
            try:
                while self.ship_once():  # until a batch is not full: nothing more waits
                    continue
            except (UmbraError, OSError) as exc:
                log.warning("journal shipping: %s (records stay in the local journal)", exc)
        self._pool.shutdown()

    def kick(self) -> None:
        self._wake.set()

    def _loop(self) -> None:
        backoff = self.interval
        while not self._stop.is_set():
            try:
                more = self.ship_once()
                backoff = self.interval
                with self._lock:
                    self._error = None
                if more:
                    continue
            except (UmbraError, OSError) as exc:
                with self._lock:
                    if self._error is None:
                        log.warning("journal shipping paused: %s (retrying)", exc)
                    self._error = str(exc)
                backoff = min(10.0, backoff * 2)
            self._wake.wait(backoff)
            self._wake.clear()

    # --- one batch -----------------------------------------------------------------------------

    def _pending(self, after_seq: int) -> list[Record]:
        batch: list[Record] = []
        size = 0
        self.journal.commit()  # only durable records go: one lost locally in a power cut never ships
        durable = self.journal.durable_seq
        for record in self.journal.records(with_data=True, after_seq=after_seq, hint=self._hint):
            if record.seq > durable:
                break
            batch.append(record)
            size += len(record.data)
            if size >= self.max_batch_bytes:
                break
        return batch

    def ship_once(self) -> bool:
        """Ship one batch of pending records; returns whether a full batch was shipped (more may wait)."""
        if self.shipped_seq is None:
            self.shipped_seq = max((r.last_seq for r in cdp.list_batches(self.repo, self.journal.id)), default=0)
        records = self._pending(self.shipped_seq)
        with self._lock:
            self._oldest_pending_ns = records[0].time_ns if records else None
        if not records:
            return False
        started = time.monotonic()
        ref = BatchRef(
            cdp.batch_name(self.journal.id, records[0].seq, records[-1].seq),
            self.journal.id,
            records[0].seq,
            records[-1].seq,
        )
        with self.repo.lock(exclusive=False):
            names = set(self.repo.backend.list("index"))
            if names != self._index_names:  # a backup or prune ran since the last batch
                self.repo.invalidate_index()
                self._index_names = names
                if not {f"index/{n}" for n in self._own_index_files} <= names:
                    self._own_index_files, self._own_packs = [], {}  # prune rewrote them: nothing to merge
            writer = BlobWriter(self.repo)
            try:
                new: dict[bytes, bytes] = {}
                stored = [self._convert(record, writer, new) for record in records]
                seal = self.repo.crypto.seal_blob  # compression and encryption release the GIL
                sealed = self._pool.map(lambda item: (item[0], seal(BlobType.DATA, *item), len(item[1])), new.items())
                for blob_id, envelope, n in sealed:
                    writer.add(BlobType.DATA, blob_id, envelope, n)
                stats = writer.finish()
            except BaseException:
                writer.abort()
                raise
            data = cdp.encode_batch(self.repo, ref, self.volume, self.journal.volume_size, stored)
            self.repo.store_content_addressed(ref.name, data)
            self._own_index_files += writer.index_files
            self._own_packs.update(writer.packs_indexed)
            self._index_names |= {f"index/{n}" for n in writer.index_files}  # ours: no reload for them
            if len(self._own_index_files) >= MERGE_INDEX_FILES:
                self._merge_own_index_files()
        with self._lock:
            self.shipped_seq = ref.last_seq
            self._shipped_ns = records[-1].time_ns
            self._oldest_pending_ns = None
            self._batches += 1
            self._bytes += stats.bytes_stored + len(data)
            self._last_batch_s = time.monotonic() - started
        self.journal.keep_after = ref.last_seq
        self.journal.enforce_limit()
        return sum(len(r.data) for r in records) >= self.max_batch_bytes

    def _merge_own_index_files(self) -> None:
        """One index file for the packs of the last batches instead of one per batch (the merged
        file is stored before the ones it replaces are deleted; they list only our own packs)."""
        index_id, data = encode_index(self.repo.crypto, self._own_packs)
        self.repo.store_content_addressed(f"index/{index_id}", data)
        for name in self._own_index_files:
            if name != index_id:
                with contextlib.suppress(ObjectMissing):
                    self.repo.backend.delete(f"index/{name}")
        self._own_index_files, self._own_packs = [], {}
        self._index_names = set(self.repo.backend.list("index"))

    def _convert(self, record: Record, writer: BlobWriter, new: dict[bytes, bytes]) -> CdpRecord:
        """The record as stored; the pieces of data the repository lacks go into ``new``."""
        kind = KIND_NAMES[record.kind]
        if record.kind == MARK:
            return CdpRecord(record.seq, record.time_ns, kind, mark=record.mark)
        if record.kind == ZERO:
            return CdpRecord(record.seq, record.time_ns, kind, record.offset, record.length)
        pieces: list[tuple[bytes, int]] = []
        for blob_id, piece, n in cdp.split_write(self.repo, record.offset, record.data):
            if piece is not None and blob_id not in new and not writer.known(blob_id):
                new[blob_id] = piece
            pieces.append((blob_id, n))
        return CdpRecord(record.seq, record.time_ns, kind, record.offset, record.length, pieces)

    def status(self) -> ShippingStatus:
        shipped = self.shipped_seq or 0
        pending = self.journal.last_seq - shipped
        with self._lock:
            oldest = self._oldest_pending_ns
            if pending and oldest is None:
                oldest = next((r.time_ns for r in self.journal.records(False, shipped)), None)
            lag = max(0.0, (time.time_ns() - oldest) / 1e9) if pending and oldest else 0.0
            return ShippingStatus(
                self.journal.id,
                shipped,
                self._shipped_ns,
                pending,
                round(lag, 3),
                self._batches,
                self._bytes,
                self._error,
                None if self._last_batch_s is None else round(self._last_batch_s, 3),
            )
