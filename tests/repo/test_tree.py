"""Volume trees against a model: every geometry, zero runs at node boundaries, shared subtrees."""

import hashlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from umbra.errors import IntegrityError
from umbra.repo.format import ZERO_ID
from umbra.repo.tree import TreeBuilder, TreeReader, decode_node, encode_node, height_for


class Store:
    def __init__(self) -> None:
        self.nodes: dict[bytes, bytes] = {}

    def put(self, node: bytes) -> bytes:
        nid = hashlib.sha256(node).digest()
        self.nodes[nid] = node
        return nid

    def get(self, nid: bytes) -> bytes:
        return self.nodes[nid]


def block_ids(n: int, zero: set[int]) -> list[bytes]:
    return [ZERO_ID if i in zero else hashlib.sha256(str(i).encode()).digest() for i in range(n)]


def build(store: Store, ids: list[bytes], fanout: int) -> TreeReader:
    b = TreeBuilder(fanout, store.put)
    for i in ids:
        b.add(i)
    root, h = b.finish()
    assert h == height_for(len(ids), fanout)
    return TreeReader(store.get, root, h, fanout, len(ids))


@given(n=st.integers(0, 300), fanout=st.integers(2, 9), zero=st.sets(st.integers(0, 299)))
@settings(max_examples=300, deadline=None)
def test_round_trip(n: int, fanout: int, zero: set[int]) -> None:
    ids = block_ids(n, zero)
    reader = build(Store(), ids, fanout)
    assert list(reader.blocks()) == [(i, x) for i, x in enumerate(ids) if x != ZERO_ID]
    leaves = list(reader.leaves())
    assert [first for first, _ in leaves] == list(range(0, n, fanout))


@pytest.mark.parametrize("n", [1, 8, 9, 63, 64, 65, 512, 513])
def test_zero_runs_across_node_boundaries(n: int) -> None:
    for zero in [set(range(n)), set(range(0, n, 2)), set(range(8, min(n, 72))), {n - 1}, {0}]:
        ids = block_ids(n, zero)
        store = Store()
        reader = build(store, ids, 8)
        assert list(reader.blocks()) == [(i, x) for i, x in enumerate(ids) if x != ZERO_ID]
        if zero == set(range(n)):
            assert reader.root == ZERO_ID and not store.nodes


def test_unchanged_subtrees_shared() -> None:
    store = Store()
    a = block_ids(512, set())
    b = list(a)
    b[300] = ZERO_ID
    build(store, a, 8)
    before = len(store.nodes)
    build(store, b, 8)
    assert len(store.nodes) - before == height_for(512, 8) + 1  # only the path to block 300 is new


def test_malformed_nodes_rejected() -> None:
    with pytest.raises(IntegrityError):
        decode_node(b"short", "t")
    good = encode_node(0, [b"x" * 32])
    with pytest.raises(IntegrityError):
        decode_node(good + b"y", "t")
    store = Store()
    reader = build(store, block_ids(20, set()), 4)
    wrong = store.put(encode_node(0, [b"x" * 32] * 3))  # a leaf where a level-1 node belongs
    bad = TreeReader(store.get, wrong, reader.height, 4, 20)
    with pytest.raises(IntegrityError):
        list(bad.blocks())
