"""Exhaustive crash points (RELIABILITY A2, and A4 for repair).

Each mutating storage call (``store``, ``delete``) of a small full backup, a small incremental, a
prune, a key add and a repair is in turn the instant the command dies:
``UMBRA_TESTONLY_CRASH_AT=k`` ends it with ``os._exit(137)`` right before its *k*-th call, as a
``kill -9`` would (no cleanup, locks left behind).  A dry run with ``UMBRA_TESTONLY_CRASH_LOG``
counts the calls.  After every crash: ``check --read-data`` passes (unreferenced packs are allowed,
as warnings), every listed point restores byte-identical to its oracle, the point the command was
making is absent or complete, no point a prune keeps is lost, the old passphrase still opens the
repository, and the same command run again succeeds; a prune afterwards leaves nothing for
``check`` to warn about.
"""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.engine.helpers import restored, sha, write_at
from umbra.repo.backends import LocalBackend
from umbra.repo.check import check
from umbra.repo.repository import Repository

pytestmark = pytest.mark.slow
MiB = 1 << 20
CRASHED = 137


@dataclass
class Case:
    """A repository to crash a command in, and what must hold of it afterwards."""

    work: Path
    env: dict[str, str]
    oracle: dict[str, str] = field(default_factory=dict)  # point id -> sha256 of its volume
    command: list[str] = field(default_factory=list)
    expected: str | None = None  # the sha of the point the command makes (backups)
    keep: Callable[[set[str]], set[str]] = lambda points: set()  # points that must survive (prune)
    passphrase: str = "pw"

    def umbra(self, *args: str, repo: Path, **env: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "umbra.cli.main", *args],
            env={**self.env, "UMBRA_REPO": str(repo), **env},
            capture_output=True,
            text=True,
        )

    def backup(self, image: Path, repo: Path, type_: str = "full") -> None:
        before = points(repo)
        result = self.umbra("backup", str(image), "-v", "vol", "--type", type_, repo=repo)
        assert result.returncode == 0, result.stderr
        (pid,) = points(repo) - before
        self.oracle[pid] = sha(image)


def points(repo: Path, passphrase: str = "pw") -> set[str]:
    return set(Repository.open(LocalBackend(repo), passphrase).point_ids())


def verify(case: Case, repo: Path, k: int, made: str | None = None) -> set[str]:
    """The A1 criteria; returns the points listed."""
    r = Repository.open(LocalBackend(repo), "pw")  # the old passphrase opens it, whatever happened
    result = check(r, read_data=True)
    assert result.ok, (k, result.errors)
    listed = set(r.point_ids())
    for pid in listed:
        expect = case.oracle.get(pid, made)
        assert expect is not None, (k, "a point appeared that is not complete", pid)
        assert sha(restored(r, r.load_point(pid), case.work / "restored.img")) == expect, (k, pid)
    lost = case.keep(set(case.oracle)) - listed
    assert not lost, (k, "points a prune keeps were lost", lost)
    return listed


def crash_everywhere(case: Case) -> int:
    """Run the command once per crash point, each time on a fresh copy of the repository."""
    base = case.work / "base"
    dry = case.work / "dry"
    shutil.copytree(base, dry)
    log = case.work / "calls.log"
    result = case.umbra(*case.command, repo=dry, UMBRA_TESTONLY_CRASH_LOG=str(log))
    assert result.returncode == 0, result.stderr
    calls = len(log.read_text().splitlines())
    assert 1 <= calls <= 400
    for k in range(1, calls + 1):
        repo = case.work / f"crash-{k}"
        shutil.copytree(base, repo)
        result = case.umbra(*case.command, repo=repo, UMBRA_TESTONLY_CRASH_AT=str(k))
        assert result.returncode == CRASHED, (k, result.returncode, result.stderr)
        before = verify(case, repo, k, made=case.expected)
        again = case.umbra(*case.command, repo=repo)
        assert again.returncode == 0, (k, again.stderr)
        after = verify(case, repo, k, made=case.expected)
        if case.expected is not None:  # the backup run again made its point
            assert any(case.oracle.get(p, case.expected) == case.expected for p in after - set(case.oracle)), k
            assert len(after - before) == 1, k
        tidy = case.umbra("prune", "--keep-last", "100", repo=repo)
        assert tidy.returncode == 0, (k, tidy.stderr)
        assert not check(Repository.open(LocalBackend(repo), "pw")).warnings, (k, "garbage left after a prune")
        shutil.rmtree(repo)
    return calls


@pytest.fixture
def case(tmp_path: Path) -> Case:
    env = {**os.environ, "UMBRA_PASSWORD": "pw"}
    c = Case(tmp_path, env)
    result = c.umbra("init", repo=tmp_path / "base")
    assert result.returncode == 0, result.stderr
    return c


def test_every_crash_point_of_a_full_backup(case: Case) -> None:
    image = case.work / "vol.img"
    image.write_bytes(random.Random(1).randbytes(2 * MiB))
    case.command = ["backup", str(image), "-v", "vol"]
    case.expected = sha(image)
    assert crash_everywhere(case) >= 8  # packs, index, point, set, lock


def test_every_crash_point_of_an_incremental_backup(case: Case) -> None:
    rng = random.Random(2)
    image = case.work / "vol.img"
    image.write_bytes(rng.randbytes(2 * MiB))
    case.backup(image, case.work / "base")
    for _ in range(40):
        write_at(image, rng.randrange(0, 2 * MiB - 4096) // 4096 * 4096, rng.randbytes(4096))
    case.command = ["backup", str(image), "-v", "vol", "--type", "incremental"]
    case.expected = sha(image)
    assert crash_everywhere(case) >= 4


def test_every_crash_point_of_a_prune(case: Case) -> None:
    rng = random.Random(3)
    image = case.work / "vol.img"
    image.write_bytes(rng.randbytes(2 * MiB))
    for _ in range(3):  # heavy changes between points: the prune repacks and deletes packs
        case.backup(image, case.work / "base")
        for _ in range(120):
            write_at(image, rng.randrange(0, 2 * MiB - 8192), rng.randbytes(8192))
    before = set(case.oracle)
    case.backup(image, case.work / "base")
    (newest,) = set(case.oracle) - before
    case.command = ["prune", "--keep-last", "1"]
    case.keep = lambda _points: {newest}
    assert crash_everywhere(case) >= 10


def test_every_crash_point_of_a_key_add(case: Case) -> None:
    image = case.work / "vol.img"
    image.write_bytes(random.Random(4).randbytes(MiB))
    case.backup(image, case.work / "base")
    case.env["UMBRA_NEW_PASSWORD"] = "pw2"
    case.command = ["key", "add"]
    assert crash_everywhere(case) >= 1
    assert points(case.work / "dry", "pw2") == set(case.oracle)  # the dry run's key works


def test_every_crash_point_of_a_repair(case: Case) -> None:
    """RELIABILITY A4: ``check --repair`` rebuilds the index (new index stored, old ones deleted)."""
    rng = random.Random(5)
    image = case.work / "vol.img"
    image.write_bytes(rng.randbytes(2 * MiB))
    case.backup(image, case.work / "base")
    for _ in range(60):
        write_at(image, rng.randrange(0, 2 * MiB - 8192), rng.randbytes(8192))
    case.backup(image, case.work / "base")
    case.command = ["check", "--repair"]
    case.keep = lambda points: points  # a repair loses no point
    assert crash_everywhere(case) >= 2
