"""The blob table against a dict: the same answers through growth, collisions and wrap-around."""

from __future__ import annotations

import os
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from umbra.repo.blobtable import MAX_LOAD, MAX_PACKS, SLOT, BlobTable


def test_locations_come_back_exactly_and_the_first_one_wins() -> None:
    table = BlobTable()
    a, b = os.urandom(32), os.urandom(32)
    assert table.add(a, 0, 1, 0, 1)
    assert table.add(b, MAX_PACKS - 1, 2, 2**32 - 1, 2**32 - 1)  # every field at its largest
    assert not table.add(a, 7, 2, 5, 5)  # a second copy elsewhere: the first location stays
    assert table.get(a) == (0, 1, 0, 1)
    assert table.get(b) == (MAX_PACKS - 1, 2, 2**32 - 1, 2**32 - 1)
    assert len(table) == 2 and a in table and os.urandom(32) not in table
    assert dict(table.items()) == {a: (0, 1, 0, 1), b: (MAX_PACKS - 1, 2, 2**32 - 1, 2**32 - 1)}


def test_the_all_zero_id_is_a_key_like_any_other() -> None:
    table = BlobTable()
    zero = bytes(32)
    assert zero not in table and table.get(zero) is None  # empty slots are zeros too
    table.add(zero, 3, 1, 4, 5)
    assert table.get(zero) == (3, 1, 4, 5)


def test_ids_that_start_alike_probe_past_the_end_and_wrap_around() -> None:
    table = BlobTable()
    slots = table.nbytes // SLOT.size
    last = [b"\xff" * 8 + os.urandom(24) for _ in range(5)]  # all start in the last slot
    for i, blob_id in enumerate(last):
        table.add(blob_id, i, 1, i, 1)
    assert table.nbytes // SLOT.size == slots  # no growth: the wrap-around did it
    assert [table.get(blob_id) for blob_id in last] == [(i, 1, i, 1) for i in range(5)]
    assert b"\xff" * 8 + os.urandom(24) not in table


def test_bad_records_are_refused() -> None:
    table = BlobTable()
    with pytest.raises(OverflowError):
        table.add(os.urandom(32), MAX_PACKS, 1, 0, 1)
    with pytest.raises(ValueError):
        table.add(os.urandom(32), 0, 0, 0, 1)  # type 0 would look like a free slot
    with pytest.raises(ValueError):
        table.add(os.urandom(31), 0, 1, 0, 1)
    assert len(table) == 0


def test_a_reserved_table_is_built_once_and_stays_small() -> None:
    count = 20_000
    table = BlobTable()
    table.reserve(count)
    size = table.nbytes
    table.add_many(1, ((1, os.urandom(32), i, 100) for i in range(count)))
    assert table.nbytes == size  # no growth while loading
    assert size / count <= SLOT.size / MAX_LOAD + 1  # about 63 bytes a blob (a dict takes ~140)


@settings(max_examples=40, deadline=None)
@given(st.data())
def test_the_table_answers_like_a_dict(data: st.DataObject) -> None:
    rng = random.Random(data.draw(st.integers(0, 2**32)))
    table, model = BlobTable(data.draw(st.integers(0, 50))), {}
    pool = [rng.randbytes(32) for _ in range(data.draw(st.integers(1, 400)))]
    pool += [pool[0][:8] + rng.randbytes(24) for _ in range(5)]  # a cluster of collisions
    for pack in range(data.draw(st.integers(1, 8))):
        records = [
            (rng.choice((1, 2)), rng.choice(pool), rng.randrange(2**32), rng.randrange(1, 2**32)) for _ in range(60)
        ]
        new = 0
        for blob_type, blob_id, offset, length in records:
            if blob_id not in model:
                model[blob_id] = (pack, blob_type, offset, length)
                new += 1
        assert table.add_many(pack, records) == new
    assert len(table) == len(model)
    assert dict(table.items()) == model
    for blob_id in pool:
        assert table.get(blob_id) == model.get(blob_id)
        assert (blob_id in table) == (blob_id in model)
