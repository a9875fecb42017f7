"""Restore targets: blocks written through O_DIRECT in runs come out exactly as given."""

from __future__ import annotations

import os
import random
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from umbra.volume import sink
from umbra.volume.sink import Target, open_target


def _pieces(rng: random.Random, size: int, block: int) -> list[tuple[int, bytes]]:
    """Random blocks with gaps between some of them, and the last one (which may be short)."""
    out = []
    for offset in range(0, size, block):
        if rng.random() < 0.7 or offset + block >= size:
            out.append((offset, rng.randbytes(min(block, size - offset))))
    return out


@pytest.mark.parametrize("size", [64 * 4096, 64 * 4096 + 123])
def test_runs_of_adjacent_blocks_write_exactly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, size: int) -> None:
    monkeypatch.setattr(sink, "RUN_BYTES", 5 * 4096)  # runs longer than the buffer are cut
    rng = random.Random(size)
    pieces = _pieces(rng, size, 4096)
    path = tmp_path / "out.img"
    target = open_target(str(path), size)
    assert target.direct_fd is not None  # ext4 takes O_DIRECT
    halves = [pieces[: len(pieces) // 2], pieces[len(pieces) // 2 :]]
    with ThreadPoolExecutor(2) as pool:  # two threads at once, each with its own buffer
        list(pool.map(lambda part: target.write_many(part, 4096), halves))
    target.finish()
    expected = bytearray(size)
    for offset, data in pieces:
        expected[offset : offset + len(data)] = data
    assert path.read_bytes() == expected
    assert os.stat(path).st_blocks * 512 < size  # the gaps stay holes


def test_without_o_direct_the_page_cache_is_used(tmp_path: Path) -> None:
    size = 10 * 4096 + 7
    pieces = _pieces(random.Random(3), size, 4096)
    path = tmp_path / "out.img"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT)
    os.ftruncate(fd, size)
    target = Target(str(path), fd, False, None)  # a filesystem that refuses O_DIRECT at open
    target.write_many(pieces, 4096)
    target.finish()
    expected = bytearray(size)
    for offset, data in pieces:
        expected[offset : offset + len(data)] = data
    assert path.read_bytes() == expected
