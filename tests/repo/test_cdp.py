"""The extent map that journal records leave behind, against a byte-by-byte model."""

from __future__ import annotations

import random

from umbra.repo.cdp import ExtentMap


def test_later_extents_win_and_stay_sorted_and_disjoint() -> None:
    rng = random.Random(1)
    size = 5000
    model: list[tuple[bytes, int] | None] = [None] * size
    m = ExtentMap()
    for i in range(3000):
        start = rng.randrange(size)
        end = min(size, start + rng.choice([1, 7, 64, 500, 2000]))
        source = (bytes([i % 256]) * 32, start)
        m.put(start, end, source)
        model[start:end] = [source] * (end - start)
    got: list[tuple[bytes, int] | None] = [None] * size
    previous_end = 0
    for start, end, source in m:
        assert previous_end <= start < end  # sorted, disjoint, not empty
        got[start:end] = [source] * (end - start)
        previous_end = end
    assert got == model
    for _ in range(200):
        a = rng.randrange(size)
        b = min(size, a + rng.randrange(1, 300))
        pieces = list(m.overlapping(a, b))
        assert all(a <= s < e <= b for s, e, _ in pieces)
        assert sum(e - s for s, e, _ in pieces) == sum(1 for x in model[a:b] if x is not None)
