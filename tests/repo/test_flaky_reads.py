"""Flaky reads (RELIABILITY B5): storage that garbles the first read of each pack.  ``check`` and
restores read a damaged pack or blob once more before calling it damaged; a good second read is
reported ("succeeded on the second attempt": suspect the hardware), never silent, and damage that
stays is still an error."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from tests.engine.helpers import do_backup, restored, sha
from umbra.errors import IntegrityError
from umbra.repo.backends import LocalBackend
from umbra.repo.check import check
from umbra.repo.repository import Repository
from umbra.testing.faults import CorruptingBackend


@pytest.fixture
def stored(repo: Repository, tmp_path: Path) -> tuple[Path, Path, str]:
    image = tmp_path / "vol.img"
    image.write_bytes(random.Random(5).randbytes(5 << 20))  # 20 packs of 256 KiB
    point = do_backup(repo, image)
    return tmp_path / "repo", image, point.id


def _open(repo_dir: Path, always: bool) -> tuple[Repository, CorruptingBackend]:
    backend = CorruptingBackend(LocalBackend(repo_dir), always=always)
    return Repository.open(backend, "secret"), backend


def test_check_reports_packs_that_read_back_good_only_the_second_time(stored: tuple[Path, Path, str]) -> None:
    repo, backend = _open(stored[0], always=False)
    result = check(repo, read_data=True)
    assert result.ok, result.errors
    packs = set(repo.backend.list("data"))
    assert len(packs) >= 20
    assert set(backend.garbled) == packs
    flaky = [w for w in result.warnings if "succeeded on the second attempt" in w]
    assert len(flaky) == len(packs)  # one per pack: its first read (the trailer's) was garbled
    assert all("suspect the storage's hardware" in w for w in flaky)


def test_restores_read_a_garbled_blob_again(stored: tuple[Path, Path, str], tmp_path: Path) -> None:
    repo_dir, image, point_id = stored
    repo, _ = _open(repo_dir, always=False)
    out = restored(repo, repo.load_point(point_id), tmp_path / "out.img")
    assert sha(out) == sha(image)
    assert repo.flaky_reads and all("succeeded on the second attempt" in n for n in repo.flaky_reads)


def test_damage_that_stays_is_still_an_error(stored: tuple[Path, Path, str], tmp_path: Path) -> None:
    repo_dir, _, point_id = stored
    repo, _ = _open(repo_dir, always=True)
    result = check(repo, read_data=True)
    assert not result.ok and not any("second attempt" in w for w in result.warnings)
    with pytest.raises(IntegrityError):
        restored(repo, repo.load_point(point_id), tmp_path / "out.img")
