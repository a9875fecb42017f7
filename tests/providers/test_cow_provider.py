"""Backups of protected volumes through the coordinator with the cow provider: tracked
incrementals and differentials read only what changed, fall back after a crash, and restore
byte for byte; a mounted, busy protected filesystem backs up fsck-clean."""

from __future__ import annotations

import random
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest

from tests.conftest import requires
from tests.engine.helpers import restored
from tests.frontends.nbd_helpers import RawClient
from tests.frontends.protect_helpers import Protected
from umbra.coordinator.snapshot_set import SetOptions
from umbra.engine import backup_set
from umbra.frontends.nbd import protocol as p
from umbra.repo.repository import Repository

MiB = 1 << 20
SIZE = 32 * MiB


def _backup(repo: Repository, source: str, type_: str = "full"):
    opts = backup_set.SetBackupOptions([source], ["data"], type_, set_options=SetOptions())
    (result,) = backup_set.run(repo, opts, [])
    return result.point


def _write_random(sock: Path, rng: random.Random, count: int) -> None:
    c = RawClient(sock, "data")
    for _ in range(count):
        off = rng.randrange(0, SIZE - 8192)
        c.request(p.CMD_WRITE, off, 8192, payload=rng.randbytes(8192))
        assert c.simple_reply()[0] == 0
    c.request(p.CMD_FLUSH, 0, 0)
    assert c.simple_reply()[0] == 0
    c.close()


@pytest.fixture
def protected(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("UMBRA_STATE_DIR", str(tmp_path / "states"))
    image = tmp_path / "data.img"
    rng = random.Random(1)
    with open(image, "wb") as f:
        f.truncate(SIZE)
        for _ in range(64):
            f.seek(rng.randrange(0, SIZE - 65536))
            f.write(rng.randbytes(65536))
    d = Protected(image, "data", tmp_path / "states" / "data")
    yield d
    d.stop()


def test_tracked_incremental_and_differential_backups(protected: Protected, repo: Repository, tmp_path: Path) -> None:
    rng = random.Random(2)
    sock = protected.state / "nbd.sock"
    full = _backup(repo, "data")
    assert full.provider == "cow" and full.tracking["generation"] and not full.stats["tracked"]
    assert protected.client.call("snapshot-list") == []  # deleted after the backup
    expected_full = protected.source.read_bytes()
    assert restored(repo, full, tmp_path / "r0.img").read_bytes() == expected_full

    _write_random(sock, rng, 40)  # about 1 % of the volume
    inc = _backup(repo, "data", "incremental")
    assert inc.stats["tracked"] and inc.parent == full.id
    assert inc.stats["bytes_read"] <= 40 * (8192 + 2 * 65536)  # changed chunks only
    assert restored(repo, inc, tmp_path / "r1.img").read_bytes() == protected.source.read_bytes()

    _write_random(sock, rng, 20)
    diff = _backup(repo, "data", "differential")
    assert diff.stats["tracked"] and diff.parent == full.id
    assert restored(repo, diff, tmp_path / "r2.img").read_bytes() == protected.source.read_bytes()
    assert restored(repo, full, tmp_path / "r0b.img").read_bytes() == expected_full

    # after a crash of the daemon the next backup compares hashes instead of trusting the bitmap
    protected.stop(signal.SIGKILL)
    d = Protected(protected.source, "data", protected.state)
    try:
        _write_random(sock, rng, 10)
        after_crash = _backup(repo, "data", "incremental")
        assert not after_crash.stats["tracked"]
        assert after_crash.stats["bytes_read"] >= 60 * 65536  # read everything used again
        assert restored(repo, after_crash, tmp_path / "r3.img").read_bytes() == d.source.read_bytes()
        _write_random(sock, rng, 10)
        again = _backup(repo, "data", "incremental")
        assert again.stats["tracked"]
        assert restored(repo, again, tmp_path / "r4.img").read_bytes() == d.source.read_bytes()
    finally:
        d.stop()


def test_backup_releases_the_snapshot_as_it_reads(
    protected: Protected, repo: Repository, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[dict] = []
    released: list[list[tuple[int, int]]] = []
    opts = backup_set.SetBackupOptions(["data"], ["data"], set_options=SetOptions())
    original_run = backup_set.backup.run
    monkeypatch.setattr(backup_set.backup, "RELEASE_BYTES", 8 * MiB)  # four batches of 8 MiB

    def spying_run(r, bopts, progress=None):
        inner = bopts.on_read

        def on_read(extents: list[tuple[int, int]]) -> None:
            inner(extents)
            released.append(extents)
            if not seen:
                seen.append(protected.client.call("snapshot-list")[0])

        bopts.on_read = on_read
        return original_run(r, bopts, progress)

    backup_set.backup.run = spying_run
    try:
        backup_set.run(repo, opts, [])
    finally:
        backup_set.backup.run = original_run
    assert released == [[(k * 8 * MiB, (k + 1) * 8 * MiB)] for k in range(4)]
    assert seen[0]["protected_bytes"] == SIZE - 8 * MiB  # the first batch was released at once


@pytest.mark.root
@pytest.mark.loopdev
def test_busy_mounted_protected_volume_backs_up_fsck_clean(
    tmp_path: Path, repo: Repository, monkeypatch: pytest.MonkeyPatch
) -> None:
    requires("root", "loop", "mkfs.ext4", "e2fsck")
    monkeypatch.setenv("UMBRA_STATE_DIR", str(tmp_path / "states"))
    image = tmp_path / "fs.img"
    with open(image, "wb") as f:
        f.truncate(96 * MiB)
    d = Protected(image, "fs", tmp_path / "states" / "fs", "--loop")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    loop = d.info["loop"]
    stop = threading.Event()
    try:
        subprocess.run(["mkfs.ext4", "-q", loop], check=True)
        subprocess.run(["mount", loop, str(mnt)], check=True)

        def busy() -> None:
            n = 0
            while not stop.is_set():
                n += 1
                (mnt / f"f{n % 50}.bin").write_bytes(random.randbytes(200_000))
                time.sleep(0.002)

        writer = threading.Thread(target=busy)
        writer.start()
        time.sleep(0.3)
        opts = backup_set.SetBackupOptions([str(mnt)], ["fs"], set_options=SetOptions())
        (full,) = backup_set.run(repo, opts, [])
        time.sleep(0.3)
        opts.type = "incremental"
        (inc,) = backup_set.run(repo, opts, [])
        stop.set()
        writer.join()
        for point in (full.point, inc.point):
            assert point.provider == "cow" and point.consistency == "filesystem-frozen"
            out = restored(repo, point, tmp_path / f"{point.id}.img")
            fsck = subprocess.run(["e2fsck", "-fn", str(out)], capture_output=True, text=True, check=False)
            assert fsck.returncode == 0, fsck.stdout
        assert inc.point.stats["tracked"] and inc.point.used_map.startswith("ext4")
    finally:
        stop.set()
        subprocess.run(["umount", str(mnt)], check=False)
        assert d.stop() == 0, d.output()
