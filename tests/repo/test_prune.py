"""Prune and garbage collection: space is freed, and a crash at any step loses nothing (A4, D3)."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from tests.engine.helpers import do_backup, restored, sha, write_at
from umbra.repo.backends import LocalBackend
from umbra.repo.check import check
from umbra.repo.index import Index
from umbra.repo.prune import prune
from umbra.repo.repository import Repository
from umbra.repo.retention import Policy


def repo_size(root: Path) -> int:
    return sum(p.stat().st_size for p in (root / "data").rglob("*") if p.is_file())


def history(repo: Repository, tmp_path: Path, generations: int = 5) -> dict[str, str]:
    """Back up a volume that changes heavily between generations; returns point id → image hash."""
    rng = random.Random(9)
    img = tmp_path / "v.img"
    img.write_bytes(rng.randbytes(800_000))
    hashes = {}
    for gen in range(generations):
        if gen:
            for _ in range(60):
                write_at(img, rng.randrange(0, 800_000 - 4096), rng.randbytes(4096))
        p = do_backup(repo, img, type_="full" if gen == 0 else "incremental")
        hashes[p.id] = sha(img)
    return hashes


def verify_all(repo: Repository, hashes: dict[str, str], tmp_path: Path) -> None:
    result = check(repo, read_data=True)
    assert result.ok, result.errors
    for pid in repo.point_ids():
        assert sha(restored(repo, repo.load_point(pid), tmp_path / "r.img")) == hashes[pid]


def test_prune_frees_space_and_keeps_points_whole(repo: Repository, tmp_path: Path) -> None:
    hashes = history(repo, tmp_path)
    before = repo_size(tmp_path / "repo")
    result = prune(repo, Policy(keep_last=2))
    assert len(result.forgotten) == 3 and len(repo.point_ids()) == 2
    assert result.packs_deleted > 0 and repo_size(tmp_path / "repo") < before
    verify_all(repo, hashes, tmp_path)
    assert not check(repo).warnings


def test_dry_run_changes_nothing(repo: Repository, tmp_path: Path) -> None:
    history(repo, tmp_path, 3)
    files = sorted(p for p in (tmp_path / "repo").rglob("*") if p.is_file() and "locks" not in p.parts)
    result = prune(repo, Policy(keep_last=1), dry_run=True)
    assert len(result.forgotten) == 2
    assert sorted(p for p in (tmp_path / "repo").rglob("*") if p.is_file() and "locks" not in p.parts) == files


class Crash(BaseException):
    pass


@pytest.mark.parametrize("at", ["forgotten", "marked", "repacked", "indexed", "unindexed", "done"])
def test_crash_at_every_prune_step(repo: Repository, tmp_path: Path, at: str) -> None:
    hashes = history(repo, tmp_path)

    def hook(step: str) -> None:
        if step == at:
            raise Crash(step)

    with pytest.raises(Crash):
        prune(repo, Policy(keep_last=2), hook=hook)
    reopened = Repository.open(LocalBackend(tmp_path / "repo"), "secret")
    verify_all(reopened, hashes, tmp_path)
    prune(reopened, Policy(keep_last=2))  # a rerun completes and reaches a clean state
    verify_all(reopened, hashes, tmp_path)
    assert not check(reopened).warnings
    assert len(reopened.point_ids()) == 2


def test_gc_keeps_blocks_of_a_point_whose_base_is_pruned(repo: Repository, tmp_path: Path) -> None:
    """PBS PSA-2025-00019-1 shape: the base of an incremental is pruned; its blocks stay."""
    hashes = history(repo, tmp_path, 2)
    prune(repo, Policy(keep_last=1))
    verify_all(repo, hashes, tmp_path)


def test_prune_removes_copies_that_concurrent_backups_stored_twice(
    repo: Repository, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A backup that loaded the index before another stored its blocks stores them again (as
    truly simultaneous backups do); prune keeps one copy of each."""
    shared = random.Random(1).randbytes(400_000)
    images = []
    for i in range(2):
        img = tmp_path / f"v{i}.img"
        img.write_bytes(shared + random.Random(i + 10).randbytes(100_000))
        images.append(img)
    first = do_backup(repo, images[0], volume="a")
    monkeypatch.setattr(Repository, "load_index", lambda self: Index())  # sees nothing stored yet
    second = do_backup(repo, images[1], volume="b")
    monkeypatch.undo()
    twice = repo_size(tmp_path / "repo")
    assert twice > 2 * 400_000  # the shared blocks are stored twice
    prune(repo, Policy(keep_last=1))
    assert repo_size(tmp_path / "repo") < twice - 300_000
    for point, img in ((first, images[0]), (second, images[1])):
        assert sha(restored(repo, repo.load_point(point.id), tmp_path / "r.img")) == sha(img)
    assert check(repo, read_data=True).ok
