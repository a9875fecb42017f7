"""Locks (RELIABILITY D1, D2): prune waits for backups; a lost lock never publishes a point."""

from __future__ import annotations

import json
import random
import subprocess
from pathlib import Path

import pytest

from tests.engine.helpers import do_backup
from umbra.engine import backup
from umbra.errors import LockLost, RepositoryLocked
from umbra.repo import locks
from umbra.repo.check import check
from umbra.repo.locks import Lock
from umbra.repo.prune import prune
from umbra.repo.repository import Repository
from umbra.repo.retention import Policy


def test_shared_locks_coexist_exclusive_waits(repo: Repository) -> None:
    with repo.lock(), repo.lock(), pytest.raises(RepositoryLocked, match="shared lock of pid"):
        Lock(repo.backend, exclusive=True).acquire()
    with repo.lock(exclusive=True), pytest.raises(RepositoryLocked, match="exclusive"):
        Lock(repo.backend, exclusive=False).acquire()
    assert list(repo.backend.list("locks")) == []


def test_lock_of_dead_process_is_stale(repo: Repository) -> None:
    proc = subprocess.Popen(["true"])
    proc.wait()
    doc = {"exclusive": True, "host": __import__("socket").gethostname(), "pid": proc.pid, "refreshed": 4e9}
    repo.backend.store("locks/00aa", json.dumps(doc).encode())
    with repo.lock():
        pass
    assert list(repo.backend.list("locks")) == []


def test_lock_not_refreshed_within_ttl_is_stale(repo: Repository) -> None:
    doc = {"exclusive": True, "host": "elsewhere", "pid": 1, "refreshed": 1000.0}
    repo.backend.store("locks/00bb", json.dumps(doc).encode())
    with repo.lock(exclusive=True):
        pass


def test_prune_refused_while_backup_holds_lock(repo: Repository) -> None:
    with repo.lock(), pytest.raises(RepositoryLocked), repo.lock(exclusive=True):
        prune(repo, Policy(keep_last=1))


class _Hook:
    """Progress sink that runs an action once, in the middle of the backup."""

    def __init__(self, action) -> None:  # type: ignore[no-untyped-def]
        self.action, self.done = action, False

    def start(self, task: str, total: int) -> None:
        pass

    def advance(self, n: int) -> None:
        if not self.done:
            self.done = True
            self.action()

    def finish(self) -> None:
        pass


def _volume(tmp_path: Path) -> Path:
    img = tmp_path / "v.img"
    img.write_bytes(random.Random(1).randbytes(3_000_000))
    return img


def test_backup_whose_lock_file_vanished_writes_no_point(repo: Repository, tmp_path: Path) -> None:
    def steal() -> None:
        for name in list(repo.backend.list("locks")):
            repo.backend.delete(name)

    with pytest.raises(LockLost, match="removed by another process"):
        backup.run(repo, backup.BackupOptions(str(_volume(tmp_path)), "v"), _Hook(steal))
    assert repo.point_ids() == []
    assert check(repo).ok
    do_backup(repo, _volume(tmp_path))  # the next backup succeeds


def test_backup_suspended_past_ttl_writes_no_point(
    repo: Repository, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A process stopped for longer than the TTL cannot prove it kept its lock (restic #2715)."""
    real = locks._boottime

    def jump() -> None:
        monkeypatch.setattr(locks, "_boottime", lambda: real() + locks.lock_ttl() + 1)

    with pytest.raises(LockLost, match="TTL"):
        backup.run(repo, backup.BackupOptions(str(_volume(tmp_path)), "v"), _Hook(jump))
    assert repo.point_ids() == []
