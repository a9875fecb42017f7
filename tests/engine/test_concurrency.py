"""Concurrent backups into one repository (RELIABILITY D4) and a model-based test of the library
API (D5): backup, prune, check and restore against an in-memory model of what each point holds."""

from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from tests.engine.helpers import restored, sha
from umbra.engine import backup, restore
from umbra.repo.backends import MemBackend
from umbra.repo.check import check
from umbra.repo.prune import prune
from umbra.repo.repository import Repository
from umbra.repo.retention import Policy


@pytest.mark.slow
def test_parallel_backups_share_blocks(tmp_path: Path) -> None:
    env = {**os.environ, "UMBRA_REPO": str(tmp_path / "repo"), "UMBRA_PASSWORD": "pw"}
    cli = [sys.executable, "-m", "umbra.cli.main"]
    subprocess.run([*cli, "init", "--block-size", "4K"], env=env, check=True, capture_output=True)
    shared = random.Random(0).randbytes(4_000_000)
    images = []
    for i in range(8):  # half of every volume is the same data
        img = tmp_path / f"v{i}.img"
        img.write_bytes(shared + random.Random(i + 1).randbytes(4_000_000))
        images.append(img)
    procs = [
        subprocess.Popen([*cli, "backup", str(img), "-v", f"v{i}"], env=env, stderr=subprocess.PIPE)
        for i, img in enumerate(images)
    ]
    for p in procs:
        assert p.wait() == 0, p.stderr.read() if p.stderr else ""
    from umbra.repo.backends import LocalBackend

    repo = Repository.open(LocalBackend(tmp_path / "repo"), "pw")
    result = check(repo, read_data=True)
    assert result.ok, result.errors
    for i, img in enumerate(images):
        assert sha(restored(repo, repo.resolve(f"v{i}@latest"), tmp_path / "r.img")) == sha(img)

    def stored() -> int:
        return sum(p.stat().st_size for p in (tmp_path / "repo" / "data").rglob("*") if p.is_file())

    # backups that overlap in time cannot see each other's new blocks, so the shared half is stored
    # more than once (how often depends on scheduling; tests/repo/test_prune.py forces the case)
    pr = subprocess.run([*cli, "prune", "--keep-last", "1"], env=env, capture_output=True)
    assert pr.returncode == 0, pr.stderr
    unique = 8 * 4_000_000 + 4_000_000
    assert stored() < unique * 1.06, "after prune the shared half is stored once (plus envelope overhead)"
    repo = Repository.open(LocalBackend(tmp_path / "repo"), "pw")
    assert check(repo, read_data=True).ok
    for i, img in enumerate(images):
        assert sha(restored(repo, repo.resolve(f"v{i}@latest"), tmp_path / "r.img")) == sha(img)


class RepositoryModel(RuleBasedStateMachine):
    """Random small volumes, backups, prunes and restores against the model's expected bytes."""

    def __init__(self) -> None:
        super().__init__()
        self.repo = Repository.init(MemBackend(), None, encryption="none", block_size=4096, fanout=4)
        self.expected: dict[str, bytes] = {}
        self.volumes: dict[str, bytearray] = {"a": bytearray(), "b": bytearray()}
        self.dir = Path(os.environ.get("TMPDIR", "/tmp")) / f"umbra-model-{os.getpid()}"
        self.dir.mkdir(exist_ok=True)

    @rule(volume=st.sampled_from(["a", "b"]), offset=st.integers(0, 60_000), data=st.binary(min_size=1, max_size=9000))
    def write(self, volume: str, offset: int, data: bytes) -> None:
        v = self.volumes[volume]
        if len(v) < offset + len(data):
            v.extend(bytes(offset + len(data) - len(v)))
        v[offset : offset + len(data)] = data

    @rule(volume=st.sampled_from(["a", "b"]), offset=st.integers(0, 60_000), length=st.integers(1, 20_000))
    def zero(self, volume: str, offset: int, length: int) -> None:
        v = self.volumes[volume]
        end = min(len(v), offset + length)
        if offset < end:
            v[offset:end] = bytes(end - offset)

    @rule(volume=st.sampled_from(["a", "b"]), kind=st.sampled_from(["full", "incremental", "differential"]))
    def do_backup(self, volume: str, kind: str) -> None:
        img = self.dir / f"{volume}.img"
        img.write_bytes(bytes(self.volumes[volume]))
        has_full = any(p.type == "full" for p in self.repo.list_points(volume))
        kind = kind if has_full else "full"
        point = backup.run(self.repo, backup.BackupOptions(str(img), volume, kind, workers=2)).point
        self.expected[point.id] = bytes(self.volumes[volume])

    @rule(keep=st.integers(1, 3))
    def do_prune(self, keep: int) -> None:
        result = prune(self.repo, Policy(keep_last=keep))
        for p in result.forgotten:
            del self.expected[p.id]

    @rule()
    def restore_all(self) -> None:
        for pid, data in self.expected.items():
            out = self.dir / "out.img"
            out.unlink(missing_ok=True)
            restore.run(self.repo, self.repo.load_point(pid), str(out))
            assert out.read_bytes() == data

    @invariant()
    def points_match_model(self) -> None:
        assert set(self.repo.point_ids()) == set(self.expected)

    def teardown(self) -> None:
        result = check(self.repo, read_data=True)
        assert result.ok and not result.warnings, (result.errors, result.warnings)
        for p in self.dir.iterdir():
            p.unlink()
        self.dir.rmdir()


TestRepositoryModel = RepositoryModel.TestCase
TestRepositoryModel.settings = settings(
    max_examples=40, stateful_step_count=25, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
