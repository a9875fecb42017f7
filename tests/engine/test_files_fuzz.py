"""Mutated ext4 images through ``ls`` and ``extract`` (RELIABILITY H3, the CI share of it; the long
run is ``bench/fuzz_filesystems.py``)."""

from __future__ import annotations

import collections
from pathlib import Path

import pytest

from tests.conftest import requires
from umbra.engine import files
from umbra.testing.fsfuzz import check_mutant, ext_metadata
from umbra.testing.volumes import debugfs, make_ext4, make_tree
from umbra.volume.filesystem import FileSystem

MUTANTS = 40


@pytest.mark.slow
def test_mutated_images_end_in_an_answer_or_one_error(tmp_path: Path) -> None:
    requires("mkfs.ext4")
    image = make_ext4(tmp_path / "fs.img", 4 << 20, make_tree(tmp_path / "tree", seed=5, files=30, max_size=20_000))
    data = image.read_bytes()
    hot = ext_metadata(data)
    outcomes = [check_mutant(data, seed, tmp_path, hot, stall_s=10) for seed in range(MUTANTS)]
    results = collections.Counter(o.result for o in outcomes)
    assert set(results) <= {"ok", "FileSystemError", "ExtractError"}, results
    assert max(o.seconds for o in outcomes) < 30  # a stuck reader is stopped after 10 s
    assert results["ok"] and len(results) > 1  # the mutations do reach the parser


def test_a_file_that_claims_a_terabyte_extracts_as_the_holes_it_is(tmp_path: Path) -> None:
    """Found by the fuzzing above: extract used to read a file's whole claimed size, so an inode
    whose size says 1 TiB kept the reader busy for hours."""
    requires("mkfs.ext4", "debugfs")
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "big").write_bytes(b"head" * 1024)
    image = make_ext4(tmp_path / "fs.img", 4 << 20, tree)
    debugfs(image, "sif /big size 0x10000000000")  # 1 TiB; its one block still maps the head
    fs = FileSystem(lambda offset, length: _read(image, offset, length), image.stat().st_size, "big")
    entry = fs.lookup("/big")
    assert entry.size == 1 << 40
    assert fs.data_ranges(entry) == [(0, 4096)]
    result = files.extract(fs, "/big", str(tmp_path / "out"), owners=False)
    out = tmp_path / "out" / "big"
    assert result.bytes_written == 4096 and out.stat().st_size == 1 << 40
    with open(out, "rb") as f:
        assert f.read(4096) == b"head" * 1024
        f.seek((1 << 40) - 4096)
        assert f.read() == bytes(4096)
    assert out.stat().st_blocks * 512 < 1 << 20  # holes, not a terabyte of zeros


def _read(path: Path, offset: int, length: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(length)
