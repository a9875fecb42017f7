"""Backup and restore on real ext4 images and raw images (RELIABILITY G3, E4; issue 2 tests)."""

from __future__ import annotations

import filecmp
import os
import random
import subprocess
from pathlib import Path

import pytest

from tests.conftest import requires
from tests.engine.helpers import do_backup, restored, sha, write_at
from umbra.repo.repository import Repository
from umbra.testing.volumes import debugfs, e2fsck_clean, make_ext4, make_tree, write_file
from umbra.volume.source import open_source
from umbra.volume.usedmap import build_used_map

MiB = 1 << 20


def dump_tree(image: Path, out: Path) -> Path:
    out.mkdir()
    subprocess.run(["debugfs", "-R", f"rdump / {out}", str(image)], check=True, capture_output=True)
    return out


def same_tree(a: Path, b: Path) -> bool:
    cmp = filecmp.dircmp(a, b)
    if cmp.left_only or cmp.right_only or cmp.diff_files or cmp.funny_files:
        return False
    _, mismatch, errors = filecmp.cmpfiles(a, b, cmp.common_files, shallow=False)
    return not mismatch and not errors and all(same_tree(a / d, b / d) for d in cmp.common_dirs)


@pytest.fixture
def ext4(tmp_path: Path) -> Path:
    requires("mkfs.ext4", "debugfs")
    tree = make_tree(tmp_path / "tree", seed=1, files=30)
    return make_ext4(tmp_path / "vol.img", 24 * MiB, tree, seed=1)


def test_all_blocks_restores_byte_identical(repo: Repository, ext4: Path, tmp_path: Path) -> None:
    point = do_backup(repo, ext4, all_blocks=True)
    assert point.used_map == "all"
    assert sha(restored(repo, point, tmp_path / "out.img")) == sha(ext4)


def test_used_blocks_only_free_space_restores_as_zeros(repo: Repository, ext4: Path, tmp_path: Path) -> None:
    point = do_backup(repo, ext4)
    assert point.used_map == "ext4+holes"
    out = restored(repo, point, tmp_path / "out.img")
    src, dst = ext4.read_bytes(), out.read_bytes()
    assert len(src) == len(dst)
    with open_source(str(ext4)) as s:
        used = build_used_map(s).extents
    assert point.stats["bytes_read"] < len(src) // 2  # free space was not read
    pos = 0
    for start, end in used:
        assert dst[pos:start] == bytes(start - pos), "free space must restore as zeros"
        assert dst[start:end] == src[start:end]
        pos = end
    assert b"STALE-GARBAGE" in src and b"STALE-GARBAGE" not in dst
    clean, report = e2fsck_clean(out)
    assert clean, report
    assert same_tree(dump_tree(ext4, tmp_path / "a"), dump_tree(out, tmp_path / "b"))


def test_used_map_covers_every_allocated_block(ext4: Path) -> None:
    requires("dumpe2fs")
    out = subprocess.run(["dumpe2fs", str(ext4)], capture_output=True, text=True, check=True).stdout
    free: set[int] = set()
    for line in out.splitlines():
        line = line.strip()
        if line.startswith("Free blocks: ") and line != "Free blocks: ":
            for part in line.removeprefix("Free blocks: ").split(", "):
                a, _, b = part.partition("-")
                free.update(range(int(a), int(b or a) + 1))
    with open_source(str(ext4)) as s:
        used = {i for start, end in build_used_map(s).extents for i in range(start // 4096, end // 4096)}
    total = s.size // 4096
    itables = set()
    for line in out.splitlines():
        if "Inode table at" in line:
            a, b = line.split("Inode table at ")[1].split(" ")[0].split("-")
            itables.update(range(int(a), int(b) + 1))
    data = ext4.read_bytes()
    missing = {b for b in set(range(total)) - used - free if data[b * 4096 : (b + 1) * 4096] != bytes(4096)}
    assert missing <= itables, (
        "an allocated, non-zero block outside the used map (only unused inode-table tails may be)"
    )
    assert len(used & free) < total // 100  # we drop (nearly) all free space


@pytest.mark.parametrize(("fstype", "block_size"), [("ext4", 1024), ("ext4", 2048), ("ext2", 4096), ("ext3", 1024)])
def test_other_block_sizes_and_ext2_ext3(repo: Repository, tmp_path: Path, fstype: str, block_size: int) -> None:
    requires("mkfs.ext4", "debugfs")
    tree = make_tree(tmp_path / "tree", seed=3, files=15)
    img = make_ext4(tmp_path / "v.img", 12 * MiB, tree, seed=3, block_size=block_size, fstype=fstype)
    point = do_backup(repo, img)
    assert point.used_map.startswith("ext4")  # the ext2/3/4 family map was used
    assert point.stats["bytes_read"] < 12 * MiB * 0.9
    out = restored(repo, point, tmp_path / "o.img")
    # free space is gone; what garbage is left sits in blocks the filesystem marks used but mke2fs
    # never wrote (backup reserved-GDT blocks), which an image backup must keep
    assert out.read_bytes().count(b"STALE-GARBAGE") * 10 < img.read_bytes().count(b"STALE-GARBAGE")
    assert e2fsck_clean(out)[0]
    assert same_tree(dump_tree(img, tmp_path / "a"), dump_tree(out, tmp_path / "b"))


@pytest.mark.parametrize("kind", ["incremental", "differential"])
def test_ten_generation_chain(repo: Repository, ext4: Path, tmp_path: Path, kind: str) -> None:
    rng = random.Random(kind)
    hashes, points = [], []
    for gen in range(10):
        if gen:
            data = rng.randbytes(rng.randint(1, 200_000))
            write_file(ext4, tmp_path / "scratch", f"/dir{gen % 5}/file{rng.randint(0, 29)}.bin", data)
            debugfs(ext4, f"write {tmp_path / 'scratch'} /gen{gen}")
        points.append(do_backup(repo, ext4, type_="full" if gen == 0 else kind, all_blocks=True))
        hashes.append(sha(ext4))
    assert points[-1].parent == (points[-2].id if kind == "incremental" else points[0].id)
    assert all(p.base == points[0].id for p in points)
    for gen, (p, h) in enumerate(zip(points, hashes, strict=True)):
        assert sha(restored(repo, p, tmp_path / f"r{gen}.img")) == h, f"generation {gen}"
    assert points[5].stats["blocks_changed"] < points[5].stats["blocks_total"] // 4


def test_zero_layouts_and_rezeroing(repo: Repository, tmp_path: Path) -> None:
    """Zeros at the first and last block, across tree-node boundaries (fan-out 8), whole volume;
    then blocks zeroed and holes punched in later generations come back as zeros (G3)."""
    bs, n = 4096, 200
    img = tmp_path / "raw.img"
    rng = random.Random(7)
    img.write_bytes(b"".join(rng.randbytes(bs) for _ in range(n)))
    layouts = [{0}, {n - 1}, set(range(6, 70)), set(range(64, 128)), set(range(0, n, 3)), set(range(n))]
    for zero in layouts:
        for b in zero:
            write_at(img, b * bs, bytes(bs))
        expect = sha(img)
        p = do_backup(repo, img, type_="incremental" if repo.list_points() else "full")
        assert sha(restored(repo, p, tmp_path / "o.img")) == expect
        img.write_bytes(b"".join(rng.randbytes(bs) for _ in range(n)))
    fd = os.open(img, os.O_RDWR)
    try:  # punch holes: SEEK_HOLE must report them and the restore must give zeros
        libc_punch(fd, 10 * bs, 30 * bs)
    finally:
        os.close(fd)
    p = do_backup(repo, img, type_="incremental")
    assert sha(restored(repo, p, tmp_path / "o.img")) == sha(img)


def libc_punch(fd: int, offset: int, length: int) -> None:
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    falloc_fl_keep_size, falloc_fl_punch_hole = 1, 2
    if libc.fallocate(fd, falloc_fl_keep_size | falloc_fl_punch_hole, ctypes.c_long(offset), ctypes.c_long(length)):
        raise OSError(ctypes.get_errno(), "fallocate")


@pytest.mark.parametrize("size", [0, 1, 4095, 4097, 40 * 4096 + 123])
def test_odd_sizes(repo: Repository, tmp_path: Path, size: int) -> None:
    img = tmp_path / "odd.img"
    img.write_bytes(random.Random(size).randbytes(size))
    p = do_backup(repo, img)
    assert p.size == size
    assert restored(repo, p, tmp_path / "o.img").read_bytes() == img.read_bytes()


def test_sparse_image_reads_only_data(repo: Repository, tmp_path: Path) -> None:
    img = tmp_path / "sparse.img"
    with open(img, "wb") as f:
        f.truncate(64 * MiB)
    write_at(img, 10 * MiB, b"x" * 5000)
    write_at(img, 40 * MiB + 3, b"y" * 70000)
    p = do_backup(repo, img)
    assert p.used_map == "holes"
    assert p.stats["bytes_read"] <= 4 * 4096 * 8
    assert sha(restored(repo, p, tmp_path / "o.img")) == sha(img)


def test_no_plaintext_in_encrypted_repository(repo: Repository, tmp_path: Path) -> None:
    marker = b"UMBRA-PLAINTEXT-MARKER-0123456789"
    rng = random.Random(1)
    img = tmp_path / "m.img"
    img.write_bytes(b"".join(rng.randbytes(rng.randint(0, 3000)) + marker for _ in range(1000)))
    do_backup(repo, img)
    for path in (tmp_path / "repo").rglob("*"):
        if path.is_file():
            assert marker not in path.read_bytes(), path


def test_identical_data_has_different_ids_in_other_repositories(tmp_path: Path) -> None:
    from umbra.repo.backends import LocalBackend

    a = Repository.init(LocalBackend(tmp_path / "a"), "pw")
    b = Repository.init(LocalBackend(tmp_path / "b"), "pw")
    assert a.crypto.blob_id(b"same") != b.crypto.blob_id(b"same")


def test_dedup_inside_a_volume_and_across_volumes(repo: Repository, tmp_path: Path) -> None:
    block = random.Random(2).randbytes(4096)
    img = tmp_path / "d.img"
    img.write_bytes(block * 50)
    p = do_backup(repo, img)
    assert p.stats["blocks_new"] == 1
    p2 = do_backup(repo, img, volume="other")
    assert p2.stats["blocks_new"] == 0 and p2.stats["bytes_stored"] < 4096
