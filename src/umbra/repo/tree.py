"""Volume trees: a Merkle tree of block ids with a fixed fan-out.

A volume of N blocks has leaves (level 0) holding up to ``fanout`` block ids each; a node at level
``l`` covers ``fanout ** (l + 1)`` blocks; the root's level is the tree's height, the smallest ``h``
with ``fanout ** (h + 1) >= N``.  Nodes are blobs of type TREE, so unchanged subtrees have unchanged
ids and are shared between points for free.  ``ZERO_ID`` stands for an all-zero (or unused) block
and for any node whose entries are all ``ZERO_ID``: such nodes are never stored.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from umbra.errors import IntegrityError
from umbra.repo.format import ID_SIZE, TREE_HEADER, TREE_MAGIC, ZERO_ID

DAMAGED_ID = b"\xff" * ID_SIZE  # what lies below a tree node that cannot be read (tolerate_damage)


def height_for(nblocks: int, fanout: int) -> int:
    h, span = 0, fanout
    while span < nblocks:
        h += 1
        span *= fanout
    return h


def encode_node(level: int, ids: list[bytes]) -> bytes:
    return TREE_HEADER.pack(TREE_MAGIC, level, len(ids)) + b"".join(ids)


def decode_node(data: bytes, what: str) -> tuple[int, list[bytes]]:
    if len(data) < TREE_HEADER.size:
        raise IntegrityError(f"{what}: tree node too short")
    magic, level, count = TREE_HEADER.unpack_from(data)
    if magic != TREE_MAGIC or len(data) != TREE_HEADER.size + count * ID_SIZE:
        raise IntegrityError(f"{what}: malformed tree node")
    body = memoryview(data)[TREE_HEADER.size :]
    return level, [bytes(body[i : i + ID_SIZE]) for i in range(0, len(body), ID_SIZE)]


StoreNode = Callable[[bytes], bytes]
"""Stores an encoded node if it is new; returns its id."""


class TreeBuilder:
    """Builds a tree from block ids given in block order."""

    def __init__(self, fanout: int, store_node: StoreNode) -> None:
        self.fanout = fanout
        self._store = store_node
        self._levels: list[list[bytes]] = [[]]
        self.count = 0

    def _make(self, level: int, ids: list[bytes]) -> bytes:
        if ids.count(ZERO_ID) == len(ids):
            return ZERO_ID
        return self._store(encode_node(level, ids))

    def _push(self, level: int, node_id: bytes) -> None:
        while len(self._levels) <= level:
            self._levels.append([])
        entries = self._levels[level]
        entries.append(node_id)
        if len(entries) == self.fanout:
            self._levels[level] = []
            self._push(level + 1, self._make(level, entries))

    def add(self, block_id: bytes) -> None:
        self.count += 1
        self._push(0, block_id)

    def extend(self, block_ids: list[bytes]) -> None:
        """``add`` each of ``block_ids``, a leaf's worth at a time."""
        pos = 0
        while pos < len(block_ids):
            entries = self._levels[0]
            take = min(self.fanout - len(entries), len(block_ids) - pos)
            entries.extend(block_ids[pos : pos + take])
            self.count += take
            pos += take
            if len(entries) == self.fanout:
                self._levels[0] = []
                self._push(1, self._make(0, entries))

    def finish(self) -> tuple[bytes, int]:
        """Returns (root id, height)."""
        if self.count == 0:
            return ZERO_ID, 0
        h = height_for(self.count, self.fanout)
        for level in range(h):
            if level < len(self._levels) and self._levels[level]:
                entries, self._levels[level] = self._levels[level], []
                self._push(level + 1, self._make(level, entries))
        if len(self._levels) > h + 1 and self._levels[h + 1]:
            return self._levels[h + 1][0], h
        return self._make(h, self._levels[h]), h


LoadNode = Callable[[bytes], bytes]
"""Loads the encoded node with this id."""


class TreeReader:
    """Reads a stored tree, checking every node's level and entry count against the geometry.

    With ``tolerate_damage`` a node that cannot be loaded reads as a node of ``DAMAGED_ID``
    entries, so every block below it comes out as ``DAMAGED_ID`` (``restore --allow-damaged``
    writes zeros there) instead of ending the walk."""

    def __init__(
        self, load_node: LoadNode, root: bytes, height: int, fanout: int, nblocks: int, tolerate_damage: bool = False
    ) -> None:
        self._load = load_node
        self.root, self.height, self.fanout, self.nblocks = root, height, fanout, nblocks
        self.tolerate_damage = tolerate_damage

    def entries(self, node_id: bytes, level: int, first: int) -> list[bytes]:
        """The entries of the node at ``level`` whose first block is ``first``, checked against the geometry."""
        what = f"tree node {node_id.hex()[:16]}"
        span = self.fanout**level
        expected = min(self.fanout, -(-(self.nblocks - first) // span))
        if node_id == DAMAGED_ID:
            return [DAMAGED_ID] * expected
        try:
            got_level, ids = decode_node(self._load(node_id), what)
            if got_level != level or len(ids) != expected:
                raise IntegrityError(f"{what}: level {got_level}/{len(ids)} entries, expected {level}/{expected}")
        except IntegrityError:
            if not self.tolerate_damage:
                raise
            return [DAMAGED_ID] * expected
        return ids

    def _walk(self, node_id: bytes, level: int, first: int, stop: int) -> Iterator[tuple[int, bytes]]:
        """Yield (first block, id) of every node at level ``stop`` below ``node_id``, zero ones too."""
        if level == stop:
            yield first, node_id
            return
        span = self.fanout**level  # blocks under each child
        if node_id == ZERO_ID:
            count = min(self.fanout, -(-(self.nblocks - first) // span))
            children = [ZERO_ID] * count
        else:
            children = self.entries(node_id, level, first)
        for k, child in enumerate(children):
            yield from self._walk(child, level - 1, first + k * span, stop)

    def leaves(self) -> Iterator[tuple[int, bytes]]:
        """(first block, leaf id) for every leaf, ``ZERO_ID`` for all-zero leaves."""
        if self.nblocks == 0:
            return iter(())
        return self._walk(self.root, self.height, 0, 0)

    def leaf_blocks(self, leaf_id: bytes, first: int) -> list[bytes]:
        """The block ids of one leaf (all ``ZERO_ID`` for a zero leaf)."""
        if leaf_id == ZERO_ID:
            return [ZERO_ID] * min(self.fanout, self.nblocks - first)
        return self.entries(leaf_id, 0, first)

    def blocks(self) -> Iterator[tuple[int, bytes]]:
        """(block number, block id) of every non-zero block, in order; zero subtrees are skipped."""
        for first, leaf in self.leaves():
            if leaf == ZERO_ID:
                continue
            for k, bid in enumerate(self.leaf_blocks(leaf, first)):
                if bid != ZERO_ID:
                    yield first + k, bid
