"""Rollback and deletion by the storage (RELIABILITY B4): the storage can hide points and bring
back deleted ones, but not forge or alter them; umbra notices the first two."""

from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from tests.engine.helpers import do_backup
from umbra.errors import IntegrityError
from umbra.repo.audit import audit
from umbra.repo.check import check
from umbra.repo.prune import prune
from umbra.repo.repository import Repository
from umbra.repo.retention import Policy


@pytest.fixture
def points(repo: Repository, tmp_path: Path) -> list[str]:
    image = tmp_path / "vol.img"
    rng = random.Random(6)
    ids = []
    for _ in range(3):
        image.write_bytes(rng.randbytes(64 << 10))
        ids.append(do_backup(repo, image).id)
    return ids


def manifest(tmp_path: Path, pid: str) -> Path:
    return tmp_path / "repo" / "points" / pid


def test_a_hidden_point_is_noticed_until_it_is_back(repo: Repository, points: list[str], tmp_path: Path) -> None:
    seen = tmp_path / "seen.json"
    assert audit(repo, seen).hidden == []
    saved = manifest(tmp_path, points[1]).read_bytes()
    manifest(tmp_path, points[1]).unlink()  # the storage hides it
    assert audit(repo, seen).hidden == [points[1]]
    assert audit(repo, seen).hidden == [points[1]], "the warning stays"
    manifest(tmp_path, points[1]).write_bytes(saved)
    assert audit(repo, seen).hidden == []


def test_deletions_by_umbra_here_or_elsewhere_are_not_alarms(
    repo: Repository, points: list[str], tmp_path: Path
) -> None:
    here, elsewhere = tmp_path / "here.json", tmp_path / "elsewhere.json"
    audit(repo, here)
    audit(repo, elsewhere)
    prune(repo, Policy(keep_last=1))  # on the other machine
    for seen in (here, elsewhere):
        result = audit(repo, seen)
        assert result.hidden == [] and result.returned == []
    assert set(repo.point_ids()) == {points[-1]}


def test_a_deleted_point_put_back_is_noticed_and_pruned_again(
    repo: Repository, points: list[str], tmp_path: Path
) -> None:
    seen = tmp_path / "seen.json"
    old_copy = manifest(tmp_path, points[0]).read_bytes()
    prune(repo, Policy(keep_last=2))
    assert points[0] not in repo.point_ids()
    manifest(tmp_path, points[0]).write_bytes(old_copy)  # the storage restores an old copy
    assert audit(repo, seen).returned == [points[0]]
    assert repo.load_point(points[0]).id == points[0]  # a genuine manifest: it opens
    prune(repo, Policy(keep_last=5))  # a policy that would keep it: it goes all the same
    assert points[0] not in repo.point_ids() and points[1] in repo.point_ids()
    assert audit(repo, seen).returned == []
    assert check(repo).ok


def test_the_storage_cannot_forge_a_deletion_record(repo: Repository, points: list[str], tmp_path: Path) -> None:
    """A record of another point's deletion renamed to cover this one does not authenticate, and
    neither does one with a record deleted: the point counts as hidden."""
    seen = tmp_path / "seen.json"
    audit(repo, seen)
    repo.delete_point(points[0], "prune")
    forgotten = tmp_path / "repo" / "forgotten"
    os.link(forgotten / points[0], forgotten / points[1])  # forged record for points[1]
    manifest(tmp_path, points[1]).unlink()
    (forgotten / points[0]).unlink()
    assert audit(repo, seen).hidden == sorted([points[0], points[1]])


def test_a_manifest_under_another_points_name_does_not_open(
    repo: Repository, points: list[str], tmp_path: Path
) -> None:
    manifest(tmp_path, points[1]).write_bytes(manifest(tmp_path, points[0]).read_bytes())
    with pytest.raises(IntegrityError, match="authentication failed"):
        repo.load_point(points[1])
    result = check(repo)
    assert any(points[1] in e for e in result.errors)


def test_commands_warn_about_hidden_points(repo: Repository, points: list[str], tmp_path: Path) -> None:
    env = {**os.environ, "UMBRA_REPO": str(tmp_path / "repo"), "UMBRA_PASSWORD": "secret"}

    def umbra_list() -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "umbra.cli.main", "list"], env=env, capture_output=True, text=True, check=True
        )

    assert "warning" not in umbra_list().stderr
    manifest(tmp_path, points[2]).unlink()
    warned = umbra_list()
    assert f"point {points[2]} was seen here before and is gone" in " ".join(warned.stderr.split())
    assert points[2] not in warned.stdout
