"""kill -9 at random moments of backup and of prune (RELIABILITY A1, A4).

After every kill: ``check`` passes (unindexed packs are allowed, as warnings), every listed point
restores byte-identical to its oracle, the killed point is absent or complete, and the next run
succeeds.  The seed is printed so a failure can be replayed.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.engine.helpers import restored, sha, write_at
from umbra.repo.backends import LocalBackend
from umbra.repo.check import check
from umbra.repo.repository import Repository

pytestmark = pytest.mark.slow
MiB = 1 << 20
KILLS = 30


def start(env: dict[str, str], *args: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "umbra.cli.main", *args], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )


def self_describing(path: Path, rng: random.Random, generation: int) -> None:
    """64 MiB where each 4 KiB block starts with (block, generation): a stale block names itself."""
    with open(path, "wb") as f:
        for block in range(64 * MiB // 4096):
            head = f"block {block} gen {generation} ".encode()
            f.write(head + (rng.randbytes(64) * 64)[: 4096 - len(head)])


def kill_at_random(proc: subprocess.Popen[bytes], rng: random.Random, span: float) -> bool:
    """SIGKILL ``proc`` at a uniform random moment of ``span`` seconds; returns whether it was killed."""
    time.sleep(rng.uniform(0, span))
    if proc.poll() is not None:
        return False
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return True


def verify(repo_dir: Path, oracle: dict[str, str], tmp_path: Path, seed: int, only: set[str] | None = None) -> None:
    repo = Repository.open(LocalBackend(repo_dir), "pw")
    result = check(repo)
    assert result.ok, (seed, result.errors)
    for pid in repo.point_ids():
        assert pid in oracle, (seed, "a point appeared that no backup reported", pid)
        if only is None or pid in only:
            assert sha(restored(repo, repo.load_point(pid), tmp_path / "r.img")) == oracle[pid], (seed, pid)


def setup(tmp_path: Path) -> tuple[int, random.Random, dict[str, str]]:
    """A seeded generator (UMBRA_TEST_SEED replays a failure) and a new repository."""
    seed = int(os.environ.get("UMBRA_TEST_SEED", random.randrange(1 << 30)))
    print(f"seed {seed}")
    env = {**os.environ, "UMBRA_REPO": str(tmp_path / "repo"), "UMBRA_PASSWORD": "pw"}
    subprocess.run([sys.executable, "-m", "umbra.cli.main", "init"], env=env, check=True, capture_output=True)
    return seed, random.Random(seed), env


def test_kill_backup_at_random_moments(tmp_path: Path) -> None:
    seed, rng, env = setup(tmp_path)
    img = tmp_path / "vol.img"
    self_describing(img, rng, 0)
    oracle: dict[str, str] = {}
    durations = [0.8]
    killed = 0
    for i in range(KILLS):
        for _ in range(200):  # change ~3 % of the blocks between runs
            write_at(
                img, rng.randrange(0, 64 * MiB // 4096) * 4096, f"block ? gen {i + 1} ".encode() + rng.randbytes(300)
            )
        expect = sha(img)
        before = set(Repository.open(LocalBackend(tmp_path / "repo"), "pw").point_ids())
        t0 = time.monotonic()
        proc = start(env, "backup", str(img), "--volume", "vol", "--type", "incremental" if oracle else "full")
        if kill_at_random(proc, rng, durations[-1] * 1.1):
            killed += 1
        else:
            assert proc.returncode == 0, proc.stderr.read() if proc.stderr else ""
            durations.append(time.monotonic() - t0)
        new = set(Repository.open(LocalBackend(tmp_path / "repo"), "pw").point_ids()) - before
        assert len(new) <= 1
        for pid in new:  # the killed point is absent or complete
            oracle[pid] = expect
        verify(tmp_path / "repo", oracle, tmp_path, seed, only=new | set(list(oracle)[-1:]))
    assert killed >= KILLS // 3, f"only {killed} runs were actually killed (seed {seed})"
    verify(tmp_path / "repo", oracle, tmp_path, seed)
    proc = start(env, "backup", str(img), "--volume", "vol", "--type", "incremental")
    assert proc.wait() == 0
    pr = subprocess.run(
        [sys.executable, "-m", "umbra.cli.main", "prune", "--keep-last", "3"], env=env, capture_output=True
    )
    assert pr.returncode == 0, pr.stderr
    repo = Repository.open(LocalBackend(tmp_path / "repo"), "pw")
    assert not check(repo).warnings, "prune removes the garbage that killed backups left"


def test_kill_prune_at_random_moments(tmp_path: Path) -> None:
    seed, rng, env = setup(tmp_path)
    img = tmp_path / "vol.img"
    img.write_bytes(rng.randbytes(8 * MiB))
    oracle: dict[str, str] = {}
    killed = 0
    for _round in range(KILLS):
        for _ in range(3):  # a few points with heavy changes, so prune has work (repack, delete)
            for _ in range(150):
                write_at(img, rng.randrange(0, 8 * MiB - 8192), rng.randbytes(8192))
            before = set(Repository.open(LocalBackend(tmp_path / "repo"), "pw").point_ids())
            subprocess.run(
                [sys.executable, "-m", "umbra.cli.main", "backup", str(img), "-v", "vol"],
                env=env,
                check=True,
                capture_output=True,
            )
            (pid,) = set(Repository.open(LocalBackend(tmp_path / "repo"), "pw").point_ids()) - before
            oracle[pid] = sha(img)
        proc = start(env, "prune", "--keep-last", str(rng.randint(1, 3)))
        if kill_at_random(proc, rng, 0.6):
            killed += 1
        else:
            assert proc.returncode == 0, proc.stderr.read() if proc.stderr else ""
        verify(tmp_path / "repo", oracle, tmp_path, seed)
    assert killed >= KILLS // 4, f"only {killed} prunes were actually killed (seed {seed})"
    assert (
        subprocess.run([sys.executable, "-m", "umbra.cli.main", "prune", "--keep-last", "1"], env=env).returncode == 0
    )
    verify(tmp_path / "repo", oracle, tmp_path, seed)
