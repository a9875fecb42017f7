"""The backup pipeline: read used blocks → hash → compress + seal → pack → tree → manifest.

Threads: one reader (``pread`` in large runs), a pool of workers that zero-check, hash, compress
and encrypt (blake3, zstandard and cryptography release the GIL), and the calling thread, which
keeps block order, feeds the :class:`BlobWriter` and builds the volume tree.  Memory is bounded by
the queue depths (a few runs of ``READ_RUN`` bytes plus two packs), never by the volume size.
"""

from __future__ import annotations

import bisect
import contextlib
import functools
import os
import queue
import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from umbra import __version__
from umbra.engine.diff import changed_blocks
from umbra.engine.progress import NoProgress, Progress
from umbra.errors import UsageError
from umbra.frontends.nbd.client import is_nbd_uri, open_nbd
from umbra.repo.format import ZERO_ID, BlobType
from umbra.repo.locks import Lock
from umbra.repo.manifest import BACKUP_TYPES, VOLUME_NAME, Point, new_point_id
from umbra.repo.repository import Repository, utc_now
from umbra.repo.tree import TreeBuilder, TreeReader
from umbra.repo.writer import BlobWriter, WriterStats
from umbra.volume import btrfs_send
from umbra.volume.extents import Extent, intersect, merge
from umbra.volume.source import Source, open_source
from umbra.volume.usedmap import UsedMap, build_used_map

READ_RUN = 4 * 1024 * 1024
RELEASE_EXTENTS, RELEASE_BYTES = 256, 64 << 20  # what is read, told to ``on_read`` in batches of this
_DONE = object()


@dataclass
class BackupOptions:
    source: str
    volume: str
    type: str = "full"
    tags: list[str] = field(default_factory=list)
    all_blocks: bool = False
    workers: int = max(2, os.cpu_count() or 2)
    display_source: str | None = None  # what the user named, when ``source`` is a snapshot of it
    annotations: dict[str, Any] = field(default_factory=dict)  # extra manifest fields (snapshot sets)
    exclude_extents: list[Extent] = field(default_factory=list)  # device ranges of excluded files
    # changed-block tracking (protected volumes): read only what changed since the parent point's
    # generation, take the rest from the parent; release what was read (in batches, see _reader)
    tracking_generation: str | None = None
    changed_since: Callable[[str], list[Extent] | None] | None = None
    on_read: Callable[[list[Extent]], None] | None = None
    # called once everything is read, before the manifest (a held filesystem is thawed there; it
    # raises if the hold did not last); returns manifest fields to update
    finish_read: Callable[[], dict[str, Any]] | None = None
    content: str = "image"  # or "btrfs-send": ``source`` is a read-only subvolume, stored as its send stream


@dataclass
class BackupResult:
    point: Point
    stats: dict[str, Any]


Batch = list[tuple[int, bytes | bytearray | memoryview]]
Processed = list[tuple[int, bytes, bytes | None, int]]  # block, id, envelope or None, plain size


def _runs(used: UsedMap, block_size: int) -> Iterator[list[tuple[int, list[Extent] | None]]]:
    """Group used blocks into runs of consecutive blocks, at most READ_RUN bytes each."""
    run: list[tuple[int, list[Extent] | None]] = []
    per_run = max(1, READ_RUN // block_size)
    for b, ranges in used.blocks(block_size):
        if run and (b != run[-1][0] + 1 or len(run) >= per_run):
            yield run
            run = []
        run.append((b, ranges))
    if run:
        yield run


def _split_run(data: bytes, run: list[tuple[int, list[Extent] | None]], block_size: int) -> Batch:
    """The blocks of a run read in one piece, their unused parts zeroed."""
    view = memoryview(data)
    batch: Batch = []
    for k, (b, ranges) in enumerate(run):
        block: bytes | bytearray | memoryview = view[k * block_size : (k + 1) * block_size]
        if ranges is not None:  # zero the unused parts: free space is not backed up
            keep = bytearray(len(block))
            for start, end in ranges:
                keep[start:end] = block[start:end]
            block = keep
        batch.append((b, block))
    return batch


class _Pipeline:
    def __init__(self, repo: Repository, writer: BlobWriter) -> None:
        self.repo = repo
        self.writer = writer
        self.zero = bytes(repo.config.block_size)

    def process(self, batch: Batch) -> Processed:
        crypto = self.repo.crypto
        out: Processed = []
        for b, block in batch:
            if block == self.zero[: len(block)]:
                out.append((b, ZERO_ID, None, len(block)))
                continue
            bid = crypto.blob_id(block)
            env = None if self.writer.known(bid) else crypto.seal_blob(BlobType.DATA, bid, block)
            out.append((b, bid, env, len(block)))
        return out


def _reader(
    source: Source,
    used: UsedMap,
    block_size: int,
    out: queue.Queue[Any],
    stop: threading.Event,
    on_read: Callable[[list[Extent]], None] | None = None,
) -> None:
    """Queue the used blocks in runs, read with several reads under way (``Source.read_many``);
    ``on_read`` hears of what was read in batches (each call to it may be a round trip)."""
    try:
        taken: deque[list[tuple[int, list[Extent] | None]]] = deque()

        def ranges() -> Iterator[tuple[int, int]]:
            for run in _runs(used, block_size):
                taken.append(run)
                yield run[0][0] * block_size, len(run) * block_size

        read: list[Extent] = []
        read_bytes = 0
        for data in source.read_many(ranges()):
            if stop.is_set():
                return
            run = taken.popleft()
            out.put(_split_run(data, run, block_size))
            start = run[0][0] * block_size
            read.append((start, start + len(data)))
            read_bytes += len(data)
            if on_read is not None and (len(read) >= RELEASE_EXTENTS or read_bytes >= RELEASE_BYTES):
                on_read(merge(read))
                read, read_bytes = [], 0
        if on_read is not None and read:
            on_read(merge(read))
        out.put(_DONE)
    except BaseException as exc:  # noqa: BLE001 - handed to the consuming thread
        out.put(exc)


def _stream_reader(
    stream: btrfs_send.SendStream, block_size: int, out: queue.Queue[Any], stop: threading.Event
) -> None:
    """Cut a stream into blocks, numbered in order; only the last may be short."""
    try:
        block = 0
        per_run = max(1, READ_RUN // block_size)
        while not stop.is_set():
            data = stream.read(per_run * block_size)
            if not data:
                break
            view = memoryview(data)
            offsets = range(0, len(data), block_size)
            batch: Batch = [(block + k, view[off : off + block_size]) for k, off in enumerate(offsets)]
            block += len(batch)
            out.put(batch)
            if len(data) < per_run * block_size:
                break
        if not stop.is_set():
            stream.close()  # raises if btrfs send failed: the stream would be incomplete
        out.put(_DONE)
    except BaseException as exc:  # noqa: BLE001 - handed to the consuming thread
        out.put(exc)


def run(repo: Repository, opts: BackupOptions, progress: Progress | None = None) -> BackupResult:
    """Back up ``opts.source`` as a new point of ``opts.volume``.

    Takes a shared lock for the whole run; the manifest is written only after every pack and index
    it needs, and only while the lock is provably held.

    Raises:
        SourceError, RepositoryError (LockLost, RepositoryFull, …), UsageError.
    """
    if not VOLUME_NAME.match(opts.volume):
        raise UsageError(f"invalid volume name {opts.volume!r} (letters, digits, '.', '_', '-')")
    if opts.type not in BACKUP_TYPES:
        raise UsageError(f"backup type must be one of {', '.join(BACKUP_TYPES)}")
    if opts.content == btrfs_send.CONTENT:
        return _run_stream(repo, opts, progress or NoProgress())
    progress = progress or NoProgress()
    started = time.monotonic()
    source = open_nbd(opts.source) if is_nbd_uri(opts.source) else open_source(opts.source)
    with contextlib.closing(source), repo.lock(exclusive=False) as lock:
        repo.invalidate_index()
        parent = _choose_parent(repo, opts)
        used = build_used_map(source, opts.all_blocks, opts.exclude_extents)
        bs = repo.config.block_size
        nblocks = -(-source.size // bs)
        fill = _Fill(repo, parent, source.size, bs)
        tracked = _tracked_changes(opts, parent, source.size)
        if tracked is not None:
            used = fill.track(used, tracked)
        counts = {"blocks_read": 0, "blocks_zero": 0, "bytes_read": 0}
        progress.start(f"backup {opts.volume}", sum(1 for _ in used.blocks(bs)) * bs)
        reader = functools.partial(_reader, source, used, bs, on_read=opts.on_read)
        root, height, wstats, late = _store(repo, opts, reader, nblocks, counts, progress, fill)
        progress.finish()
        read = _Read(source.size, used.used_bytes, nblocks, used.kind, root, height, counts, wstats, tracked, late)
        return _save_point(repo, lock, opts, parent, read, started)


def _run_stream(repo: Repository, opts: BackupOptions, progress: Progress) -> BackupResult:
    """Back up a btrfs subvolume as its send stream: read in order, size known at the end."""
    started = time.monotonic()
    with repo.lock(exclusive=False) as lock:
        repo.invalidate_index()
        parent = _choose_parent(repo, opts)
        counts = {"blocks_read": 0, "blocks_zero": 0, "bytes_read": 0}
        progress.start(f"backup {opts.volume} (btrfs send)", 0)
        stream = btrfs_send.SendStream(opts.source)
        try:
            reader = functools.partial(_stream_reader, stream, repo.config.block_size)
            root, height, wstats, late = _store(repo, opts, reader, 0, counts, progress, _Fill(repo, None, 0, 1))
        finally:
            stream.kill()  # nothing to do once btrfs send has ended
        progress.finish()
        size, nblocks = counts["bytes_read"], counts["blocks_read"]
        read = _Read(size, size, nblocks, "all", root, height, counts, wstats, None, late)
        return _save_point(repo, lock, opts, parent, read, started)


def _store(
    repo: Repository,
    opts: BackupOptions,
    read: Callable[[queue.Queue[Any], threading.Event], None],
    nblocks: int,
    counts: dict[str, int],
    progress: Progress,
    fill: _Fill,
) -> tuple[bytes, int, WriterStats, dict[str, Any]]:
    """Store the blocks ``read`` queues (packs and tree), then call ``opts.finish_read``; returns
    the tree's root and height, the writer's stats and finish_read's manifest fields.  On any
    failure the packs written so far are abandoned."""
    writer = BlobWriter(repo)
    tree = TreeBuilder(repo.config.fanout, lambda node: _store_node(repo, writer, node))
    try:
        _pump(repo, writer, tree, read, nblocks, opts.workers, counts, progress, fill)
        late = opts.finish_read() if opts.finish_read is not None else {}
        root, height = tree.finish()
        return root, height, writer.finish(), late
    except BaseException:
        writer.abort()
        raise


@dataclass
class _Read:
    """What a backup read and stored, for its manifest."""

    size: int
    used_bytes: int
    nblocks: int
    used_map: str
    root: bytes
    height: int
    counts: dict[str, int]
    wstats: WriterStats
    tracked: list[Extent] | None
    late: dict[str, Any]  # manifest fields from finish_read


def _save_point(
    repo: Repository, lock: Lock, opts: BackupOptions, parent: Point | None, read: _Read, started: float
) -> BackupResult:
    """Write the point's manifest, last, while the lock is provably held."""
    counts, wstats = read.counts, read.wstats
    point = Point(
        id=new_point_id(),
        volume=opts.volume,
        time=utc_now(),
        type=opts.type,
        size=read.size,
        block_size=repo.config.block_size,
        fanout=repo.config.fanout,
        root=read.root.hex(),
        height=read.height,
        parent=parent.id if parent else None,
        base=(parent.base if opts.type == "incremental" and parent else parent.id if parent else None),
        tags=list(opts.tags),
        host=socket.gethostname(),
        source=opts.display_source or os.path.abspath(opts.source),
        used_map=read.used_map,
        content=opts.content,
        umbra_version=__version__,
        tracking={"generation": opts.tracking_generation} if opts.tracking_generation else {},
        **{**opts.annotations, **read.late},
    )
    if opts.type == "full":
        point.base = point.id
    changed = sum(1 for _ in changed_blocks(repo, parent, point)) if parent else counts["blocks_read"]
    duration = time.monotonic() - started
    point.stats = {
        "bytes_scanned": read.size,
        "bytes_used": read.used_bytes,
        "bytes_read": counts["bytes_read"],
        "bytes_new": wstats.bytes_new,
        "bytes_stored": wstats.bytes_stored,
        "blocks_total": read.nblocks,
        "blocks_read": counts["blocks_read"],
        "blocks_zero": counts["blocks_zero"],
        "blocks_new": wstats.blobs_new,
        "blocks_changed": changed,
        "tree_nodes_new": wstats.tree_nodes_new,
        "packs": wstats.packs,
        "dedup_ratio": round(counts["bytes_read"] / wstats.bytes_new, 3) if wstats.bytes_new else None,
        "compression_ratio": round(wstats.bytes_new / wstats.bytes_stored, 3) if wstats.bytes_stored else None,
        "duration_s": round(duration, 3),
        "tracked": read.tracked is not None,
    }
    lock.check()
    repo.save_point(point)
    try:
        lock.check()
    except BaseException:
        # published under a lock we no longer hold: withdraw it
        repo.delete_point(point.id, "withdrawn: the backup lost its lock")
        raise
    return BackupResult(point, point.stats)


def _choose_parent(repo: Repository, opts: BackupOptions) -> Point | None:
    if opts.type == "full":
        return None
    points = [p for p in repo.list_points(opts.volume) if p.type in BACKUP_TYPES]  # not synthetic ones
    if opts.type == "differential":
        points = [p for p in points if p.type == "full"]
    if not points:
        raise UsageError(
            f"no earlier {'full ' if opts.type == 'differential' else ''}point of volume "
            f"{opts.volume!r}: run a full backup first"
        )
    return points[-1]


def _store_node(repo: Repository, writer: BlobWriter, node: bytes) -> bytes:
    nid = repo.crypto.blob_id(node)
    if not writer.known(nid):
        writer.add(BlobType.TREE, nid, repo.crypto.seal_blob(BlobType.TREE, nid, node), len(node))
    return nid


def _pump(
    repo: Repository,
    writer: BlobWriter,
    tree: TreeBuilder,
    read: Callable[[queue.Queue[Any], threading.Event], None],
    nblocks: int,
    workers: int,
    counts: dict[str, int],
    progress: Progress,
    fill: _Fill,
) -> None:
    """Run ``read`` (it queues batches of numbered blocks, then _DONE) in a thread; seal batches in
    a pool; add every block to the tree in order, blocks not read taking ``fill``'s id."""
    pipeline = _Pipeline(repo, writer)
    batches: queue.Queue[Any] = queue.Queue(maxsize=workers * 2)
    stop = threading.Event()
    reader = threading.Thread(target=read, args=(batches, stop), name="umbra-read", daemon=True)
    reader.start()
    next_block = 0
    inflight: deque[Future[Processed]] = deque()
    try:
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="umbra-seal") as pool:
            finished = False
            while not finished or inflight:
                while not finished and len(inflight) < workers * 2:
                    item = batches.get()
                    if item is _DONE:
                        finished = True
                    elif isinstance(item, BaseException):
                        raise item
                    else:
                        inflight.append(pool.submit(pipeline.process, item))
                if inflight:
                    done_bytes = 0
                    for b, bid, env, size in inflight.popleft().result():
                        if next_block < b:
                            tree.extend(fill.ids(next_block, b))
                        tree.add(bid)
                        next_block = b + 1
                        counts["blocks_read"] += 1
                        done_bytes += size
                        if bid == ZERO_ID:
                            counts["blocks_zero"] += 1
                        elif env is not None:
                            writer.add(BlobType.DATA, bid, env, size)
                    counts["bytes_read"] += done_bytes
                    progress.advance(done_bytes)
    finally:
        stop.set()
        while reader.is_alive():  # unblock a reader waiting on a full queue
            try:
                batches.get_nowait()
            except queue.Empty:
                reader.join(0.05)
    if next_block < nblocks:
        tree.extend(fill.ids(next_block, nblocks))


def _tracked_changes(opts: BackupOptions, parent: Point | None, size: int) -> list[Extent] | None:
    """Byte extents written since the parent point, when tracking knows them exactly, else None."""
    if parent is None or opts.changed_since is None or opts.all_blocks or parent.size != size:
        return None
    generation = parent.tracking.get("generation")
    if not generation:
        return None
    return opts.changed_since(generation)


class _Fill:
    """The ids of blocks the pipeline does not read: zero, or (tracked backups) the parent's."""

    def __init__(self, repo: Repository, parent: Point | None, size: int, block_size: int) -> None:
        self.repo, self.parent, self.size, self.block_size = repo, parent, size, block_size
        self.changed: list[int] | None = None  # sorted
        self._reader: TreeReader | None = None
        self._leaves: Iterator[tuple[int, bytes]] | None = None
        self._leaf_first = -1
        self._leaf_ids: list[bytes] = []

    def track(self, used: UsedMap, changed: list[Extent]) -> UsedMap:
        """Restrict ``used`` to the changed blocks; every other block keeps the parent's id."""
        bs = self.block_size
        changed = merge((s // bs * bs, min(self.size, -(-e // bs) * bs)) for s, e in changed)
        self.changed = [b for s, e in changed for b in range(s // bs, -(-e // bs))]
        assert self.parent is not None
        self._reader = self.repo.tree_reader(self.parent)
        self._leaves = iter(self._reader.leaves())
        return UsedMap(used.kind + "+tracked", intersect(used.extents, changed), used.size)

    def ids(self, start: int, stop: int) -> list[bytes]:
        """The ids of blocks ``start`` to ``stop`` (asked for in increasing order)."""
        if self.changed is None:
            return [ZERO_ID] * (stop - start)  # not used: free space is zeros
        assert self.parent is not None and self._reader is not None and self._leaves is not None
        fanout = self.parent.fanout
        out: list[bytes] = []
        block = start
        while block < stop:
            first = block // fanout * fanout
            while self._leaf_first != first:
                self._leaf_first, leaf = next(self._leaves)
                if self._leaf_first == first:
                    self._leaf_ids = self._reader.leaf_blocks(leaf, first)
            end = min(stop, first + fanout)
            out += self._leaf_ids[block - first : end - first]
            block = end
        # changed blocks not read (no longer used) are zeros
        for b in self.changed[bisect.bisect_left(self.changed, start) : bisect.bisect_left(self.changed, stop)]:
            out[b - start] = ZERO_ID
        return out
