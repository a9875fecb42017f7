"""``umbra verify``: a point's filesystem checked by its own fsck on a copy-on-write view, the
verdict kept with the point, shown by ``list`` and dropped by ``prune`` with the point."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import requires
from tests.engine.helpers import do_backup, sha
from umbra.engine.verify import verify
from umbra.repo.backends import LocalBackend
from umbra.repo.prune import prune
from umbra.repo.repository import Repository
from umbra.repo.retention import Policy
from umbra.testing.volumes import debugfs, make_ext4, make_tree

MiB = 1 << 20


def umbra(repo: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, UMBRA_REPO=str(repo), UMBRA_PASSWORD="secret")
    return subprocess.run([sys.executable, "-m", "umbra", *args], capture_output=True, text=True, env=env, timeout=300)


@pytest.fixture
def repo_dir(tmp_path: Path) -> Path:
    Repository.init(LocalBackend(tmp_path / "repo"), "secret")
    return tmp_path / "repo"


def test_clean_and_damaged_filesystems(repo_dir: Path, tmp_path: Path) -> None:
    requires("root", "mkfs.ext4", "debugfs")  # FUSE
    repo = Repository.open(LocalBackend(repo_dir), "secret")
    image = make_ext4(tmp_path / "fs.img", 32 * MiB, make_tree(tmp_path / "tree", seed=3, files=15))
    good = do_backup(repo, image, volume="fs")
    before = sha(image)
    result = verify(repo, good.id)
    assert result.clean and result.filesystem == "ext4" and result.stored
    assert [s["command"] for s in result.steps] == ["e2fsck -E journal_only -y", "e2fsck -fn"]
    debugfs(image, "set_inode_field /dir0 links_count 7")  # a wrong link count e2fsck must find
    bad = do_backup(repo, image, volume="fs", type_="incremental")
    proc = umbra(repo_dir, "verify", bad.id[:12])
    assert proc.returncode == 63 and "does not check clean" in proc.stderr, proc.stdout + proc.stderr
    listed = {p["id"]: p["verified"] for p in json.loads(umbra(repo_dir, "list", "--json").stdout)}
    assert listed == {good.id: True, bad.id: False}
    assert "NOT CLEAN" in umbra(repo_dir, "list").stdout
    assert sha(image) != before  # (the damage was in the image, not made by verify)
    prune(repo, Policy(keep_last=1))
    assert set(repo.latest_verifications()) == {bad.id}


def test_a_volume_without_a_filesystem_is_a_clear_error(repo_dir: Path, tmp_path: Path) -> None:
    requires("root")
    vol = tmp_path / "raw.img"
    vol.write_bytes(random.Random(1).randbytes(2 * MiB))
    do_backup(Repository.open(LocalBackend(repo_dir), "secret"), vol, volume="raw")
    proc = umbra(repo_dir, "verify", "raw@latest")
    assert proc.returncode == 61 and "umbra checks" in proc.stderr and "Traceback" not in proc.stderr


def test_xfs_taken_frozen_verifies_clean_and_damage_is_found(repo_dir: Path, tmp_path: Path) -> None:
    """An XFS image copied while frozen (as every snapshot of a live XFS is) has records in its
    log and stale lazy counters that `xfs_repair -n` alone reports as damage: verify replays the
    log first, as a mount would.  Real damage is still found."""
    requires("root", "loop", "mkfs.xfs", "xfs_db")
    from tests.loopdev import loop_device, mounted

    live = tmp_path / "live.img"
    with open(live, "wb") as f:
        f.truncate(320 * MiB)
    subprocess.run(["mkfs.xfs", "-q", "-f", str(live)], check=True)
    frozen = tmp_path / "frozen.img"
    with loop_device(live) as dev, mounted(dev, tmp_path / "m", "rw") as mnt:
        for i in range(3):
            (mnt / f"f{i}").write_bytes(random.Random(i).randbytes(3 * MiB))
        subprocess.run(["fsfreeze", "-f", str(mnt)], check=True)
        try:
            subprocess.run(["cp", "--sparse=always", str(live), str(frozen)], check=True)
        finally:
            subprocess.run(["fsfreeze", "-u", str(mnt)], check=True)
    assert subprocess.run(["xfs_repair", "-n", str(frozen)], capture_output=True).returncode != 0, "stale as copied"
    repo = Repository.open(LocalBackend(repo_dir), "secret")
    good = verify(repo, do_backup(repo, frozen, volume="xfs").id)
    assert good.clean, good.steps
    assert [s["command"].split()[0] for s in good.steps] == ["mount", "xfs_repair"]
    # damage: the root inode's link count, which xfs_repair -n reports
    root = subprocess.run(["xfs_db", "-c", "sb 0", "-c", "p rootino", str(frozen)], capture_output=True, text=True)
    rootino = root.stdout.split("=")[1].strip()
    subprocess.run(["xfs_db", "-x", "-c", f"inode {rootino}", "-c", "write core.nlinkv2 9", str(frozen)], check=True,
                   capture_output=True)  # fmt: skip
    bad = verify(repo, do_backup(repo, frozen, volume="xfs", type_="incremental").id)
    assert not bad.clean and bad.steps[-1]["command"] == "xfs_repair -n", bad.steps
