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
