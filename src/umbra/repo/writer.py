"""Writes new blobs into packs, stores full packs in the background, and indexes them.

Ordering: a pack is stored before any index file names it, and :meth:`BlobWriter.finish` writes the
index of every pack this writer stored before it returns; only then may a manifest refer to them.
An index file is also written every ``index_every`` packs, so an interrupted backup's work is
reused (deduplicated) by the next one.
"""

from __future__ import annotations

import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import blake3

from umbra.errors import IntegrityError, PackNotVerified
from umbra.repo.format import PACK_MAGIC, BlobType
from umbra.repo.index import Index, encode_index
from umbra.repo.pack import PackBuilder, PackEntry, pack_name, parse_trailer
from umbra.repo.repository import Repository
from umbra.testing_knobs import testonly_int


@dataclass
class WriterStats:
    blobs_new: int = 0  # new data blobs
    bytes_new: int = 0  # plaintext bytes of new data blobs
    tree_nodes_new: int = 0
    bytes_stored: int = 0  # pack bytes written
    packs: int = 0


class BlobWriter:
    """Not thread-safe for ``add``: one pipeline thread feeds it; uploads run on another thread."""

    def __init__(self, repo: Repository, index_every: int = 64, index: Index | None = None) -> None:
        """``index`` is what counts as already stored (default: the repository's whole index)."""
        self.repo = repo
        self.index = repo.index if index is None else index
        self.target = testonly_int("PACK_TARGET") or repo.config.pack_target
        self.index_every = index_every
        self.stats = WriterStats()
        self._pending: set[bytes] = set()
        self._pack = PackBuilder()
        self._uploader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="umbra-upload")
        self._inflight: list[Future[None]] = []
        self._unindexed: dict[str, list[PackEntry]] = {}
        self._lock = threading.Lock()
        self.index_files: list[str] = []
        self.packs_indexed: dict[str, list[PackEntry]] = {}  # what this writer's index files list

    def known(self, blob_id: bytes) -> bool:
        return blob_id in self._pending or blob_id in self.index

    def add(self, blob_type: BlobType, blob_id: bytes, envelope: bytes, plain_size: int) -> bool:
        """Queue a sealed blob unless it is already stored or queued; returns whether it was new."""
        if self.known(blob_id):
            return False
        self._pending.add(blob_id)
        self._pack.add(blob_type, blob_id, envelope)
        if blob_type == BlobType.DATA:
            self.stats.blobs_new += 1
            self.stats.bytes_new += plain_size
        else:
            self.stats.tree_nodes_new += 1
        if self._pack.size >= self.target:
            self._flush_pack()
        return True

    def _flush_pack(self) -> None:
        if not len(self._pack):
            return
        pack, self._pack = self._pack, PackBuilder()
        self._wait(max_inflight=1)  # bounded memory: at most two packs in flight
        self._inflight.append(self._uploader.submit(self._store_pack, pack))

    def _store_pack(self, pack: PackBuilder) -> None:
        pack_id, data = pack.finish(self.repo.crypto)
        self._verify(pack_id, data, pack.entries)
        self.repo.store_content_addressed(pack_name(pack_id), data)
        with self._lock:
            self.stats.bytes_stored += len(data)
            self.stats.packs += 1
            self._unindexed[pack_id] = pack.entries
            ready = len(self._unindexed) >= self.index_every
        if ready:
            self._write_index()

    def _verify(self, pack_id: str, data: bytes, entries: list[PackEntry]) -> None:
        """Read the pack back as a restore would before storing it: its name (the hash of its
        bytes), its trailer, and every blob decrypted, decompressed and hashed against its id.
        A fault of memory, CPU or compressor between sealing and storing then fails the backup
        instead of storing a pack that can never be read (RELIABILITY B6; restic verifies the
        same way).  Runs on the upload thread, beside the sealing workers."""
        crypto = self.repo.crypto
        try:
            if not data.startswith(PACK_MAGIC) or blake3.blake3(data, max_threads=1).hexdigest() != pack_id:
                raise IntegrityError("its bytes changed after it was named")
            if parse_trailer(crypto, data, len(data), "the new pack") != entries:
                raise IntegrityError("its trailer does not list the blobs added")
            view = memoryview(data)
            for e in entries:
                envelope = view[e.offset : e.offset + e.length]
                what = f"{e.blob_type.name.lower()} blob {e.blob_id.hex()[:16]}"
                crypto.open_blob(e.blob_type, e.blob_id, envelope, self.repo.max_blob_size(e.blob_type), what)
        except IntegrityError as exc:
            raise PackNotVerified(reason=exc.message) from None

    def _wait(self, max_inflight: int) -> None:
        while len(self._inflight) > max_inflight:
            self._inflight.pop(0).result()  # re-raises the upload's error here

    def _write_index(self) -> None:
        with self._lock:
            packs, self._unindexed = self._unindexed, {}
        if not packs:
            return
        index_id, data = encode_index(self.repo.crypto, packs)
        self.repo.store_content_addressed(f"index/{index_id}", data)
        for pack_id, entries in packs.items():
            self.index.add_pack(pack_id, entries)
        self.index_files.append(index_id)
        self.packs_indexed.update(packs)

    def finish(self) -> WriterStats:
        """Store the last pack and index everything; afterwards every added blob is loadable."""
        self._flush_pack()
        self._wait(max_inflight=0)
        self._uploader.shutdown()
        self._write_index()
        self._pending.clear()
        return self.stats

    def abort(self) -> None:
        """Stop without indexing; stored packs stay as garbage for prune."""
        for fut in self._inflight:
            fut.cancel()
        self._uploader.shutdown(wait=True, cancel_futures=True)
