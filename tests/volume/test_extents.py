from hypothesis import given
from hypothesis import strategies as st

from umbra.volume.extents import bitmap_runs, blocks_in, intersect, merge, subtract


def bits_to_set(bitmap: bytes, n: int) -> set[int]:
    return {i for i in range(n) if bitmap[i // 8] >> (i % 8) & 1}


@given(st.binary(min_size=0, max_size=64), st.integers(0, 512))
def test_bitmap_runs_match_bits(bitmap: bytes, nbits: int) -> None:
    nbits = min(nbits, len(bitmap) * 8)
    got = set()
    runs = list(bitmap_runs(bitmap, nbits))
    for a, b in runs:
        got.update(range(a, b))
    assert got == bits_to_set(bitmap, nbits)
    assert all(runs[i][1] < runs[i + 1][0] for i in range(len(runs) - 1))  # maximal runs


ext = st.lists(st.tuples(st.integers(0, 1000), st.integers(0, 1000)).map(lambda t: (min(t), max(t))))


@given(ext, ext)
def test_intersect_merge(a: list[tuple[int, int]], b: list[tuple[int, int]]) -> None:
    ma, mb = merge(a), merge(b)
    cover = lambda es: {i for s, e in es for i in range(s, e)}  # noqa: E731
    assert cover(ma) == cover(a)
    assert cover(intersect(ma, mb)) == cover(a) & cover(b)
    assert cover(subtract(ma, mb)) == cover(a) - cover(b)


@given(ext, st.sampled_from([4, 16, 64]))
def test_blocks_in(a: list[tuple[int, int]], bs: int) -> None:
    m = merge(a)
    covered = {i for s, e in m for i in range(s, e)}
    for b, ranges in blocks_in(m, bs):
        inside = {i - b * bs for i in covered if b * bs <= i < (b + 1) * bs}
        assert inside
        if ranges is None:
            assert inside == set(range(bs))
        else:
            assert {i for s, e in ranges for i in range(s, e)} == inside
