"""Storage and source failures in the middle of a backup (RELIABILITY A6, P12): the backup fails
with the right error, publishes no point, the repository checks clean, and the next backup works."""

from __future__ import annotations

import errno
import os
import random
from pathlib import Path

import pytest

from tests.engine.helpers import do_backup, restored, sha
from umbra.engine import backup
from umbra.errors import RepositoryFull, RepositoryIOError, SourceError
from umbra.repo.backends import LocalBackend
from umbra.repo.check import check
from umbra.repo.repository import Repository
from umbra.testing.faults import FaultyBackend


@pytest.fixture
def volume(tmp_path: Path) -> Path:
    img = tmp_path / "v.img"
    img.write_bytes(random.Random(8).randbytes(3_000_000))
    return img


@pytest.mark.parametrize("plan", ["E", "..E", "....E", "......E"])
@pytest.mark.parametrize("err", [errno.ENOSPC, errno.EIO])
def test_store_failure_mid_backup(repo: Repository, volume: Path, tmp_path: Path, plan: str, err: int) -> None:
    first = do_backup(repo, volume, volume="before")
    other = tmp_path / "other.img"
    other.write_bytes(random.Random(9).randbytes(3_000_000))
    faulty_backend = FaultyBackend(repo.backend, {"store": plan}, err)
    faulty = Repository(faulty_backend, repo.config, repo.crypto, repo.key_id)
    with pytest.raises(RepositoryFull if err == errno.ENOSPC else RepositoryIOError):
        do_backup(faulty, other, volume="during")
    assert faulty_backend.failures == 1
    reopened = Repository.open(LocalBackend(tmp_path / "repo"), "secret")
    assert [p.volume for p in reopened.list_points()] == ["before"]
    result = check(reopened, read_data=True)
    assert result.ok, result.errors
    assert sha(restored(reopened, first, tmp_path / "o.img")) == sha(volume)
    again = do_backup(reopened, other, volume="during")
    assert sha(restored(reopened, again, tmp_path / "o.img")) == sha(other)


def test_source_shrinking_mid_backup_is_a_source_error(repo: Repository, volume: Path) -> None:
    class Shrink:  # the source shrinks after its used-block map was taken
        def start(self, task: str, total: int) -> None:
            os.truncate(volume, 100_000)

        def advance(self, n: int) -> None:
            pass

        def finish(self) -> None:
            pass

    with pytest.raises(SourceError, match="unexpected end of data"):
        backup.run(repo, backup.BackupOptions(str(volume), "v", workers=2), Shrink())
    assert repo.point_ids() == []
    assert check(repo).ok


def test_unreadable_source(repo: Repository, tmp_path: Path) -> None:
    (tmp_path / "dir").mkdir()
    with pytest.raises(SourceError, match="not an image file or block device"):
        do_backup(repo, tmp_path / "dir")
    with pytest.raises(SourceError, match="No such file"):
        do_backup(repo, tmp_path / "missing")


@pytest.mark.root
def test_a_full_restore_target_is_one_clear_error(tmp_path: Path) -> None:
    """A restore onto a filesystem that fills up ends with TargetError (exit 32, one line), not
    an internal error; the repository is untouched."""
    import subprocess
    import sys

    from tests.conftest import requires

    requires("root")
    repo_dir = tmp_path / "repo"
    Repository.init(LocalBackend(repo_dir), "secret")
    image = tmp_path / "v.img"
    image.write_bytes(random.Random(9).randbytes(4 << 20))  # incompressible, no zero blocks
    env = dict(os.environ, UMBRA_REPO=str(repo_dir), UMBRA_PASSWORD="secret")

    def umbra(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "umbra", *args], capture_output=True, text=True, env=env)

    assert umbra("backup", "--volume", "v", str(image)).returncode == 0
    small = tmp_path / "small"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "none", str(small)], check=True)
    try:
        proc = umbra("restore", "v@latest", str(small / "out.img"))
    finally:
        subprocess.run(["umount", str(small)], check=True)
    assert proc.returncode == 32, proc.stderr
    assert "Traceback" not in proc.stderr and "No space left on device" in proc.stderr
    assert "incomplete" in proc.stderr
    assert umbra("check", "--read-data").returncode == 0
