"""Random access to a point's volume (PointView): bytes, holes, on-demand fetching, damage."""

from __future__ import annotations

import random
import threading
from pathlib import Path

import pytest

from tests.engine.helpers import do_backup
from umbra.errors import IntegrityError
from umbra.repo.format import BlobType
from umbra.repo.repository import Repository
from umbra.repo.view import PointView

BS = 4096


def make_volume(path: Path, size: int, seed: int) -> bytes:
    """Random blocks, zero blocks and a tail that is not a whole block."""
    rng = random.Random(seed)
    data = bytearray(size)
    for b in range(0, size, BS):
        kind = rng.random()
        if kind < 0.5:
            data[b : b + BS] = rng.randbytes(min(BS, size - b))
        elif kind < 0.6:
            data[b : b + BS] = bytes([b // BS % 251 + 1]) * min(BS, size - b)
    path.write_bytes(bytes(data))
    return bytes(data)


def test_random_reads_equal_the_volume(repo: Repository, tmp_path: Path) -> None:
    size = 700 * BS + 1234  # 701 blocks: a fan-out-8 tree of height 3, a short last block
    data = make_volume(tmp_path / "vol", size, seed=3)
    point = do_backup(repo, tmp_path / "vol", all_blocks=True)
    view = PointView(repo, point, cache_bytes=16 * BS)
    rng = random.Random(7)
    for _ in range(400):
        offset = rng.randrange(size)
        length = rng.choice([1, 511, BS, 3 * BS + 17, 40 * BS, size])
        assert view.read(offset, length) == data[offset : offset + length]
    assert view.read(size - 10, 100) == data[-10:]
    assert view.read(size, 10) == b""


def test_allocation_reports_zero_blocks_as_holes(repo: Repository, tmp_path: Path) -> None:
    size = 64 * BS
    data = bytearray(size)
    data[5 * BS : 7 * BS] = b"x" * (2 * BS)
    data[40 * BS + 100 : 40 * BS + 101] = b"y"
    (tmp_path / "vol").write_bytes(bytes(data))
    view = PointView(repo, do_backup(repo, tmp_path / "vol", all_blocks=True))
    runs = list(view.allocation(0, size))
    assert runs == [
        (0, 5 * BS, False),
        (5 * BS, 7 * BS, True),
        (7 * BS, 40 * BS, False),
        (40 * BS, 41 * BS, True),
        (41 * BS, size, False),
    ]
    assert list(view.allocation(6 * BS + 5, 10)) == [(6 * BS + 5, 6 * BS + 15, True)]
    assert view.blocks_fetched == 0  # allocation reads only the tree


def test_reads_fetch_only_the_blocks_they_need(repo: Repository, tmp_path: Path) -> None:
    size = 512 * BS
    data = make_volume(tmp_path / "vol", size, seed=5)
    view = PointView(repo, do_backup(repo, tmp_path / "vol", all_blocks=True))
    assert view.read(100 * BS + 10, 20) == data[100 * BS + 10 : 100 * BS + 30]
    assert view.blocks_fetched <= 1
    view.read(100 * BS, BS)
    assert view.blocks_fetched <= 1  # cached


def test_concurrent_readers(repo: Repository, tmp_path: Path) -> None:
    size = 300 * BS
    data = make_volume(tmp_path / "vol", size, seed=9)
    view = PointView(repo, do_backup(repo, tmp_path / "vol", all_blocks=True), cache_bytes=8 * BS)
    errors: list[str] = []

    def reader(seed: int) -> None:
        rng = random.Random(seed)
        for _ in range(200):
            off, n = rng.randrange(size), rng.randrange(1, 9 * BS)
            if view.read(off, n) != data[off : off + n]:
                errors.append(f"mismatch at {off}+{n}")

    threads = [threading.Thread(target=reader, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []


def test_damaged_block_is_an_integrity_error(repo: Repository, tmp_path: Path) -> None:
    size = 16 * BS
    make_volume(tmp_path / "vol", size, seed=11)
    point = do_backup(repo, tmp_path / "vol", all_blocks=True)
    view = PointView(repo, point)
    bid = view.block_ids(0, 16)
    target = next(b for b in bid if any(b))
    loc = repo.locate(target)
    pack = next((tmp_path / "repo").rglob(f"{loc.pack_id}*"))
    raw = bytearray(pack.read_bytes())
    raw[loc.offset + 20] ^= 0xFF
    pack.write_bytes(bytes(raw))
    with pytest.raises(IntegrityError):
        PointView(repo, point).blobs([target])
    assert repo.load_blobs(BlobType.DATA, []) == {}
