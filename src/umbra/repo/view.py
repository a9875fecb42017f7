"""Random access to one point's volume: the tree is walked per block and blocks are fetched from
their packs on demand, so the first byte costs a few reads whatever the volume's size.

Decoded tree nodes and block data are kept in small LRU caches; one view may be read from many
threads at once (NBD workers, FUSE threads).  Blocks stored as ``ZERO_ID`` read as zeros and are
reported as holes by :meth:`PointView.allocation`.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Iterator

from umbra.repo.cdp import ExtentMap, Instant, extent_map, instant
from umbra.repo.format import ZERO_ID, BlobType
from umbra.repo.manifest import Point
from umbra.repo.pointref import PointRef, parse_point_ref
from umbra.repo.repository import Repository

DEFAULT_CACHE_BYTES = 64 * 1024 * 1024
NODE_CACHE_ENTRIES = 256

Run = tuple[int, int, bool]  # start, end, has data (False: reads as zeros)


class _Lru:
    """A byte-bounded LRU map; callers hold the view's lock."""

    def __init__(self, limit_bytes: int) -> None:
        self.limit = limit_bytes
        self.used = 0
        self.items: OrderedDict[bytes, bytes] = OrderedDict()

    def get(self, key: bytes) -> bytes | None:
        value = self.items.get(key)
        if value is not None:
            self.items.move_to_end(key)
        return value

    def put(self, key: bytes, value: bytes) -> None:
        if key in self.items or len(value) > self.limit:
            return
        self.items[key] = value
        self.used += len(value)
        while self.used > self.limit:
            _, old = self.items.popitem(last=False)
            self.used -= len(old)


class PointView:
    """Read-only byte view of ``point``'s volume."""

    def __init__(self, repo: Repository, point: Point, cache_bytes: int = DEFAULT_CACHE_BYTES) -> None:
        self.repo = repo
        self.point = point
        self.size = point.size
        self.block_size = point.block_size
        self._reader = repo.tree_reader(point)
        self._lock = threading.Lock()
        self._blocks = _Lru(cache_bytes)
        self._nodes: OrderedDict[tuple[bytes, int, int], list[bytes]] = OrderedDict()
        self.bytes_fetched = 0  # plaintext bytes of blocks loaded from packs (cache misses)
        self.blocks_fetched = 0
        self.extents = ExtentMap()  # what journal records change on top of the point: nothing here

    # --- tree --------------------------------------------------------------------------------

    def _node(self, node_id: bytes, level: int, first: int) -> list[bytes]:
        fanout = self._reader.fanout
        key = (node_id, level, min(fanout, -(-(self.point.nblocks - first) // fanout**level)))  # validated shape
        with self._lock:
            entries = self._nodes.get(key)
            if entries is not None:
                self._nodes.move_to_end(key)
                return entries
        entries = self._reader.entries(node_id, level, first)
        with self._lock:
            self._nodes[key] = entries
            while len(self._nodes) > NODE_CACHE_ENTRIES:
                self._nodes.popitem(last=False)
        return entries

    def block_ids(self, first: int, stop: int) -> list[bytes]:
        """Ids of blocks ``first`` .. ``stop - 1`` (``ZERO_ID`` for zero blocks)."""
        out: list[bytes] = []
        fanout = self._reader.fanout
        b = first
        while b < stop:
            leaf_first = b - b % fanout
            leaf_id = self._leaf_id(leaf_first)
            count = min(stop, leaf_first + fanout, self.point.nblocks) - b
            if leaf_id == ZERO_ID:
                out += [ZERO_ID] * count
            else:
                entries = self._node(leaf_id, 0, leaf_first)
                out += entries[b - leaf_first : b - leaf_first + count]
            b += count
        return out

    def _leaf_id(self, leaf_first: int) -> bytes:
        node, level, first = self._reader.root, self._reader.height, 0
        fanout = self._reader.fanout
        while level > 0:
            if node == ZERO_ID:
                return ZERO_ID
            span = fanout**level
            k = (leaf_first - first) // span
            node = self._node(node, level, first)[k]
            first += k * span
            level -= 1
        return node

    # --- data --------------------------------------------------------------------------------

    def blobs(self, ids: list[bytes]) -> dict[bytes, bytes]:
        """The data of these (non-zero) data blob ids, from the cache or loaded together."""
        found: dict[bytes, bytes] = {}
        missing: list[bytes] = []
        with self._lock:
            for bid in ids:
                data = self._blocks.get(bid)
                if data is None:
                    missing.append(bid)
                else:
                    found[bid] = data
        if missing:
            loaded = self.repo.load_blobs(BlobType.DATA, missing)
            with self._lock:
                for bid, data in loaded.items():
                    self._blocks.put(bid, data)
                    self.bytes_fetched += len(data)
                    self.blocks_fetched += 1
            found.update(loaded)
        return found

    def read(self, offset: int, length: int) -> bytes:
        """``length`` bytes at ``offset`` (clipped to the volume's end)."""
        length = max(0, min(length, self.size - offset))
        if length == 0:
            return b""
        bs = self.block_size
        first, stop = offset // bs, -(-(offset + length) // bs)
        ids = self.block_ids(first, stop)
        data = self.blobs([bid for bid in ids if bid != ZERO_ID])
        out = bytearray(length)
        for k, bid in enumerate(ids):
            if bid == ZERO_ID:
                continue
            block_start = (first + k) * bs
            lo, hi = max(offset, block_start), min(offset + length, block_start + bs)
            chunk = data[bid][lo - block_start : hi - block_start]
            out[lo - offset : lo - offset + len(chunk)] = chunk
        return bytes(out)

    def allocation(self, offset: int, length: int) -> Iterator[Run]:
        """Runs of data and of zero blocks covering ``offset`` .. ``offset + length``."""
        end = min(self.size, offset + length)
        if end <= offset:
            return
        bs = self.block_size
        first = offset // bs
        ids = self.block_ids(first, -(-end // bs))
        run_start, run_data = offset, ids[0] != ZERO_ID
        for k, bid in enumerate(ids[1:], start=1):
            has_data = bid != ZERO_ID
            if has_data != run_data:
                boundary = (first + k) * bs
                yield run_start, boundary, run_data
                run_start, run_data = boundary, has_data
        yield run_start, end, run_data


class InstantView:
    """A point with journal records applied on top: the volume at an instant (CDP).

    Reads start from the point and overlay the extents the records left behind; the records' data
    blocks are loaded (and cached) through the point's view.
    """

    def __init__(self, base: PointView, extents: ExtentMap) -> None:
        self.base = base
        self.extents = extents
        self.point = base.point
        self.size = base.size
        self.block_size = base.block_size

    @property
    def bytes_fetched(self) -> int:
        return self.base.bytes_fetched

    def read(self, offset: int, length: int) -> bytes:
        length = max(0, min(length, self.size - offset))
        if length == 0:
            return b""
        end = offset + length
        parts = list(self.extents.overlapping(offset, end))
        if not parts:
            return self.base.read(offset, length)
        out = bytearray(self.base.read(offset, length))
        blobs = self.base.blobs([bid for _, _, (bid, _) in parts if bid != ZERO_ID])
        for start, stop, (bid, blob_start) in parts:
            if bid == ZERO_ID:
                out[start - offset : stop - offset] = bytes(stop - start)
            else:
                out[start - offset : stop - offset] = blobs[bid][start - blob_start : stop - blob_start]
        return bytes(out)

    def allocation(self, offset: int, length: int) -> Iterator[Run]:
        end = min(self.size, offset + length)
        if any(True for _ in self.extents.overlapping(offset, end)):
            yield offset, end, True  # written since the point: report data (reading tells the truth)
            return
        yield from self.base.allocation(offset, length)


BlockView = PointView | InstantView


def open_state(
    repo: Repository, ref: str | PointRef, cache_bytes: int = DEFAULT_CACHE_BYTES
) -> tuple[Instant, BlockView]:
    """The state a reference names (a point, or a point plus journal records) and a view of it."""
    inst = instant(repo, parse_point_ref(ref) if isinstance(ref, str) else ref)
    base = PointView(repo, inst.point, cache_bytes)
    if not inst.records:
        return inst, base
    return inst, InstantView(base, extent_map(inst.records, inst.point.size))
