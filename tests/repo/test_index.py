"""The in-memory index: compact locations that come back exactly as they went in."""

from __future__ import annotations

import os

import pytest

from umbra.repo.format import BlobType
from umbra.repo.index import Index, Location
from umbra.repo.pack import PackEntry

PACK_A, PACK_B = "a" * 64, "b" * 64


def test_locations_round_trip_at_the_edges_of_their_fields() -> None:
    index = Index()
    ids = [os.urandom(32) for _ in range(4)]
    entries_a = [
        PackEntry(BlobType.DATA, ids[0], 0, 1),
        PackEntry(BlobType.TREE, ids[1], 2**32 - 1, 2**32 - 1),  # the largest offset and length a record holds
    ]
    entries_b = [PackEntry(BlobType.DATA, ids[2], 7, 65536), PackEntry(BlobType.DATA, ids[0], 100, 5)]
    index.add_pack(PACK_A, entries_a)
    index.add_pack(PACK_B, entries_b)
    assert index.get(ids[0]) == Location(PACK_A, BlobType.DATA, 0, 1)  # the first location seen wins
    assert index.get(ids[1]) == Location(PACK_A, BlobType.TREE, 2**32 - 1, 2**32 - 1)
    assert index.get(ids[2]) == Location(PACK_B, BlobType.DATA, 7, 65536)
    assert index.get(ids[3]) is None and ids[3] not in index and ids[2] in index
    assert len(index) == 3
    assert dict(index.items()) == {i: index.get(i) for i in ids[:3]}
    assert index.packs() == {PACK_A: entries_a, PACK_B: entries_b}  # duplicates as index files list them
    assert index.pack_ids() == [PACK_A, PACK_B]


def test_a_pack_listed_by_several_index_files_keeps_its_entries_once() -> None:
    index = Index()
    entries = [PackEntry(BlobType.DATA, os.urandom(32), i * 10, 10) for i in range(3)]
    index.add_pack(PACK_A, entries[:2])
    index.add_pack(PACK_A, entries)  # a later index file lists the pack again, with one entry more
    assert index.packs() == {PACK_A: entries}
    assert len(index) == 3


def test_raw_records_load_like_entries() -> None:
    from umbra.repo.format import INDEX_ENTRY

    entries = [PackEntry(BlobType.DATA, os.urandom(32), i * 10, 10) for i in range(3)]
    records = b"".join(INDEX_ENTRY.pack(e.blob_type, e.blob_id, e.offset, e.length) for e in entries)
    by_records, by_entries = Index(), Index()
    by_records.add_pack_records(PACK_A, records)
    by_entries.add_pack(PACK_A, entries)
    assert by_records.packs() == by_entries.packs() == {PACK_A: entries}
    assert dict(by_records.items()) == dict(by_entries.items())
    by_records.add_pack_records(PACK_A, records)  # listed again by another index file: once
    assert by_records.packs() == {PACK_A: entries}


def test_an_index_without_pack_lists_keeps_locations_only() -> None:
    entries = [PackEntry(BlobType.DATA, os.urandom(32), i * 10, 10) for i in range(3)]
    full, light = Index(), Index(pack_lists=False)
    for index in (full, light):
        index.add_pack(PACK_A, entries)
        index.add_pack(PACK_B, entries[:1])  # a copy elsewhere: listed, not chosen
    assert dict(light.items()) == dict(full.items())
    assert light.pack_ids() == full.pack_ids() == [PACK_A, PACK_B]
    assert light.nbytes < full.nbytes
    with pytest.raises(RuntimeError):
        light.packs()
