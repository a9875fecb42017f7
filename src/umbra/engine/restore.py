"""The restore pipeline: walk the point's tree in order, fetch blocks in parallel (reads within a
pack coalesced), verify every blob against its id, and ``pwrite`` it in place.

Zero and unused blocks are never written to a file target (it starts as holes, so the result is
sparse); on a block device they are zeroed explicitly (BLKZEROOUT, or zeros written).
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from umbra.engine.diff import tree_reader
from umbra.engine.progress import NoProgress, Progress
from umbra.errors import IntegrityError, UsageError
from umbra.repo.cdp import ExtentMap
from umbra.repo.format import ZERO_ID, BlobType
from umbra.repo.manifest import Point
from umbra.repo.repository import Repository
from umbra.repo.tree import DAMAGED_ID
from umbra.volume import btrfs_send
from umbra.volume.sink import Target, open_target

GROUP_BLOCKS = 64

log = logging.getLogger(__name__)


@dataclass
class RestoreResult:
    point: Point
    stats: dict[str, Any]


def _groups(blocks: Iterator[tuple[int, bytes]], size: int) -> Iterator[list[tuple[int, bytes]]]:
    group: list[tuple[int, bytes]] = []
    for item in blocks:
        group.append(item)
        if len(group) >= size:
            yield group
            group = []
    if group:
        yield group


def fetch_blocks(repo: Repository, group: list[tuple[int, bytes]]) -> list[tuple[int, bytes]]:
    """Load and verify the blocks of one group: (block number, data).

    Raises:
        IntegrityError: naming the pack and offset of anything damaged or missing.
    """
    blobs = repo.load_blobs(BlobType.DATA, (bid for _, bid in group))
    return [(b, blobs[bid]) for b, bid in group]


def _fetch_or_zeros(repo: Repository, point: Point, group: list[tuple[int, bytes]]) -> list[tuple[int, bytes]]:
    """``--allow-damaged``: a block that is missing or damaged comes back as zeros, and an empty
    ``bytes`` marks it (the caller writes the zeros and lists the block)."""
    try:
        return fetch_blocks(repo, group)
    except IntegrityError:
        out = []
        for b, bid in group:
            if bid == DAMAGED_ID:  # below a tree node that cannot be read
                out.append((b, b""))
                continue
            try:
                out.append((b, repo.load_blob(BlobType.DATA, bid)))
            except IntegrityError as exc:
                log.warning("block %d of point %s is damaged, restored as zeros: %s", b, point.short_id, exc)
                out.append((b, b""))
        return out


def _apply_extents(repo: Repository, extents: ExtentMap, target: Target) -> int:
    """Write the journal's extents over the restored point, loading their blobs a group at a time."""
    written = 0
    group: list[tuple[int, int, tuple[bytes, int]]] = []

    def flush() -> None:
        nonlocal written
        blobs = repo.load_blobs(BlobType.DATA, [bid for _, _, (bid, _) in group if bid != ZERO_ID])
        for start, end, (bid, blob_start) in group:
            if bid == ZERO_ID:
                target.write_zeros(start, end - start)  # the point may have data here: really write
            else:
                target.write_at(start, memoryview(blobs[bid])[start - blob_start : end - blob_start])
            written += end - start
        group.clear()

    for item in extents:
        group.append(item)
        if len(group) >= GROUP_BLOCKS:
            flush()
    if group:
        flush()
    return written


def run(
    repo: Repository,
    point: Point,
    target_path: str,
    force: bool = False,
    progress: Progress | None = None,
    workers: int = 4,
    extents: ExtentMap | None = None,
    allow_damaged: bool = False,
) -> RestoreResult:
    """Restore ``point`` to a file or block device in one pass; then, for a state between points
    (``VOLUME@TIME`` with a shipped journal), write what the journal records left in ``extents``.
    A btrfs subvolume point is received into ``target_path``, a directory on btrfs.  With
    ``allow_damaged`` blocks that are missing or damaged are written as zeros and listed in
    ``stats["damaged_blocks"]`` instead of failing the restore (after ``check --repair``).

    Raises:
        TargetError (TargetTooSmall, TargetBusy), IntegrityError, RepositoryError.
    """
    progress = progress or NoProgress()
    started = time.monotonic()
    bs = point.block_size
    if point.content == btrfs_send.CONTENT:  # a subvolume: its stream, in order, to btrfs receive
        if extents is not None:
            raise UsageError("a btrfs subvolume point has no journal to replay")
        target: Target = btrfs_send.ReceiveTarget(target_path)
    else:
        target = open_target(target_path, point.size, force)
    written = 0
    damaged: list[int] = []

    def fetch(group: list[tuple[int, bytes]]) -> list[tuple[int, bytes]]:
        return _fetch_or_zeros(repo, point, group) if allow_damaged else fetch_blocks(repo, group)

    def write(blocks: list[tuple[int, bytes]]) -> tuple[int, list[int]]:
        """Write one group's blocks; (bytes of data written, damaged block numbers written as zeros)."""
        target.write_many(((b * bs, data) for b, data in blocks if data), bs)
        bad = [b for b, data in blocks if not data]  # --allow-damaged: zeros (the target may hold data there)
        for b in bad:
            target.write_zeros(b * bs, min(bs, point.size - b * bs))
        return sum(len(data) for _, data in blocks), bad

    def fetch_and_write(group: list[tuple[int, bytes]]) -> tuple[int, list[int]]:
        return write(fetch(group))

    try:
        reader = tree_reader(repo, point, tolerate_damage=allow_damaged)
        progress.start(f"restore {point.volume}", point.size)
        next_block = 0
        inflight: deque[Future[Any]] = deque()
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="umbra-fetch") as pool:

            def drain(limit: int) -> None:
                nonlocal written
                while len(inflight) > limit:
                    # a stream (ordered) is written here, in order; anything else by the workers
                    n, bad = write(inflight.popleft().result()) if target.ordered else inflight.popleft().result()
                    written += n
                    damaged.extend(bad)
                    progress.advance(n + sum(min(bs, point.size - b * bs) for b in bad))

            for group in _groups(reader.blocks(), GROUP_BLOCKS):
                for b, _ in group:  # explicit zeros between data blocks (devices only)
                    if b > next_block:
                        target.zero_range(next_block * bs, (b - next_block) * bs)
                    next_block = b + 1
                inflight.append(pool.submit(fetch if target.ordered else fetch_and_write, group))
                drain(workers * 2)
            drain(0)
        target.zero_range(next_block * bs, point.size - next_block * bs)
        if extents is not None:
            written += _apply_extents(repo, extents, target)
        target.finish()
    except BaseException:
        target.abort()
        raise
    progress.finish()
    stats: dict[str, Any] = {
        "bytes_written": written,
        "size": point.size,
        "duration_s": round(time.monotonic() - started, 3),
    }
    if allow_damaged:
        stats["damaged_blocks"] = sorted(damaged)
    return RestoreResult(point, stats)
