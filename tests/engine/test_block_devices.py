"""Back up from and restore to real block devices (loop devices), compared by e2fsck and by a
read-only mount of the restored filesystem (issue 2 tests; RELIABILITY G2)."""

from __future__ import annotations

import filecmp
from pathlib import Path

import pytest

from tests.conftest import requires
from tests.engine.helpers import do_backup, sha
from tests.loopdev import loop_device, mounted
from umbra.engine import restore
from umbra.errors import TargetBusy, TargetError, TargetTooSmall
from umbra.repo.repository import Repository
from umbra.testing.volumes import e2fsck_clean, fill_garbage, make_ext4, make_tree

pytestmark = [pytest.mark.root, pytest.mark.loopdev]
MiB = 1 << 20


def assert_same_tree(a: Path, b: Path) -> None:
    cmp = filecmp.dircmp(a, b, ignore=["lost+found"])
    assert not (cmp.left_only or cmp.right_only or cmp.diff_files or cmp.funny_files), cmp.report()
    _, mismatch, errors = filecmp.cmpfiles(a, b, cmp.common_files, shallow=False)
    assert not mismatch and not errors
    for d in cmp.common_dirs:
        assert_same_tree(a / d, b / d)


def test_device_to_device_round_trip(repo: Repository, tmp_path: Path) -> None:
    requires("loop", "mkfs.ext4")
    tree = make_tree(tmp_path / "tree", seed=11, files=40)
    src_img = make_ext4(tmp_path / "src.img", 32 * MiB, tree, seed=11)
    dst_img = tmp_path / "dst.img"
    fill_garbage(dst_img, 40 * MiB, seed=99)  # the target holds old data that must not survive
    with loop_device(src_img, read_only=True) as src, loop_device(dst_img) as dst:
        point = do_backup(repo, Path(src))
        assert point.size == 32 * MiB and point.used_map == "ext4"
        restore.run(repo, point, dst)
        clean, report = e2fsck_clean(dst)
        assert clean, report
        with mounted(dst, tmp_path / "mnt"):
            assert_same_tree(tree, tmp_path / "mnt")
    restored = dst_img.read_bytes()[: 32 * MiB]
    assert b"STALE-GARBAGE" not in restored  # unused blocks were zeroed on the device


def test_all_blocks_from_device_is_byte_identical(repo: Repository, tmp_path: Path) -> None:
    requires("loop", "mkfs.ext4")
    img = make_ext4(tmp_path / "src.img", 16 * MiB, make_tree(tmp_path / "t", seed=2, files=10), seed=2)
    with loop_device(img, read_only=True) as dev:
        point = do_backup(repo, Path(dev), all_blocks=True)
    out = tmp_path / "out.img"
    restore.run(repo, point, str(out))
    assert sha(out) == sha(img)


def test_restore_refuses_small_mounted_and_attached_targets(repo: Repository, tmp_path: Path) -> None:
    requires("loop", "mkfs.ext4")
    img = make_ext4(tmp_path / "src.img", 16 * MiB, None, garbage=False)
    point = do_backup(repo, img)
    small = tmp_path / "small.img"
    small.write_bytes(bytes(8 * MiB))
    with loop_device(small) as dev:
        with pytest.raises(TargetTooSmall):
            restore.run(repo, point, dev)
        with pytest.raises(TargetTooSmall):
            restore.run(repo, point, dev, force=True)
    busy = make_ext4(tmp_path / "busy.img", 16 * MiB, None, garbage=False)
    before = sha(busy)
    with loop_device(busy) as dev, mounted(dev, tmp_path / "mnt"):
        with pytest.raises(TargetBusy):
            restore.run(repo, point, dev)
        with pytest.raises(TargetBusy, match="attached to /dev/loop"):
            restore.run(repo, point, str(busy))
    assert sha(busy) == before
    with pytest.raises(TargetError):
        restore.run(repo, point, "/dev/null")


def test_repository_on_filling_filesystem_fails_cleanly_and_recovers(tmp_path: Path) -> None:
    """RELIABILITY A5: ENOSPC names the repository, earlier points stay whole, and after space is
    freed a backup and check succeed."""
    requires("loop", "mkfs.ext4")
    import random

    from umbra.errors import RepositoryFull
    from umbra.repo.backends import LocalBackend
    from umbra.repo.check import check

    fs = make_ext4(tmp_path / "repofs.img", 48 * MiB, None, garbage=False)
    with loop_device(fs) as dev, mounted(dev, tmp_path / "mnt", "rw") as mnt:
        filler = mnt / "filler"
        filler.write_bytes(bytes(4 * MiB))
        repo = Repository.init(LocalBackend(mnt / "repo"), "pw", block_size=65536)
        rng = random.Random(4)
        volumes, hashes = [], {}
        for _ in range(3):  # three passes, as borg's disk-full test does
            while True:
                vol = tmp_path / f"v{len(volumes)}.img"
                vol.write_bytes(rng.randbytes(12 * MiB))
                volumes.append(vol)
                try:
                    p = do_backup(repo, vol, volume=f"v{len(volumes)}")
                    hashes[p.id] = sha(vol)
                except RepositoryFull as exc:
                    assert "repository storage is full" in str(exc)
                    break
            assert repo.point_ids() == list(hashes) or sorted(repo.point_ids()) == sorted(hashes)
            for pid, h in hashes.items():
                out = tmp_path / "r.img"
                out.unlink(missing_ok=True)
                restore.run(repo, repo.load_point(pid), str(out))
                assert sha(out) == h
            filler.unlink(missing_ok=True)  # free space: the next backup and check succeed
            p = do_backup(repo, volumes[0], volume="after")
            hashes[p.id] = sha(volumes[0])
            result = check(repo, read_data=True)
            assert result.ok, result.errors
            from umbra.repo.prune import prune
            from umbra.repo.retention import Policy

            with repo.lock(exclusive=True):
                prune(repo, Policy(keep_last=1))
            hashes = {pid: h for pid, h in hashes.items() if pid in repo.point_ids()}
            filler.write_bytes(bytes(2 * MiB))
