"""The ``hold`` provider: a mounted ext4 or XFS on a plain block device (a loop device over a file on a
filesystem without reflink) stays frozen while the backup reads it, within the hold limit, and is
thawed by the watchdog if umbra dies or the limit passes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import requires
from tests.coordinator.test_snapshot_set import is_frozen
from tests.loopdev import loop_device, mounted
from umbra.coordinator.snapshot_set import SetOptions
from umbra.engine import backup_set, restore
from umbra.errors import CoordinatorTimeout, ProviderError
from umbra.providers import registry
from umbra.repo.backends.local import LocalBackend
from umbra.repo.repository import Repository
from umbra.testing.volumes import make_ext4
from umbra.volume.mounts import resolve_source
from umbra.writers.base import SetContext, Writer

pytestmark = [pytest.mark.root, pytest.mark.loopdev]
MiB = 1 << 20


@pytest.fixture(params=["ext4", "xfs"])
def plain(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Path]:
    """A mounted filesystem on a loop device over a file on the root filesystem: no snapshot provider."""
    requires("loop", f"mkfs.{request.param}")
    if request.param == "ext4":
        img = make_ext4(tmp_path / "plain.img", 64 * MiB, None, garbage=False)
    else:
        img = tmp_path / "plain.img"
        with open(img, "wb") as f:
            f.truncate(320 * MiB)  # XFS's smallest
        subprocess.run(["mkfs.xfs", "-q", "-f", str(img)], check=True, capture_output=True)
    with loop_device(img) as dev, mounted(dev, tmp_path / "mnt", "rw") as mnt:
        yield mnt


class WritesWhileHeld(Writer):
    """At its thaw (after the commit, while the hold lasts) it checks the filesystem is still
    frozen and starts a write that can only finish once the backup has read the device."""

    name = "writes-while-held"

    def __init__(self, mountpoint: Path, pause: float = 0.0) -> None:
        self.mountpoint, self.pause = mountpoint, pause
        self.frozen_at_thaw: bool | None = None
        self.write_done = threading.Event()

    def metadata(self) -> dict[str, object]:
        return {"writer": self.name, "components": []}

    def freeze(self, ctx: SetContext) -> None:
        return None

    def thaw(self, ctx: SetContext) -> None:
        self.frozen_at_thaw = is_frozen(self.mountpoint)
        threading.Thread(target=self._write, daemon=True).start()
        time.sleep(self.pause)

    def _write(self) -> None:
        path = self.mountpoint / "after"
        with open(path, "w") as f:
            f.write("written during the hold")
            os.fsync(f.fileno())
        self.write_done.set()


def restored_files(repo: Repository, point_id: str, tmp_path: Path) -> dict[str, str]:
    out = tmp_path / "restored.img"
    restore.run(repo, repo.load_point(point_id), str(out))
    if out.read_bytes()[:4] == b"XFSB":
        # a frozen XFS keeps its lazy superblock counters in memory: the image gets them from its
        # log at mount, as after a crash; then it must check clean
        with loop_device(out) as dev, mounted(dev, tmp_path / "restored", "rw,nouuid") as m:
            files = {p.name: p.read_text() for p in m.iterdir() if p.is_file()}
        fsck = subprocess.run(["xfs_repair", "-n", str(out)], capture_output=True, text=True)
        assert fsck.returncode == 0, fsck.stdout + fsck.stderr
        return files
    fsck = subprocess.run(["e2fsck", "-fn", str(out)], capture_output=True, text=True)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr
    with loop_device(out, read_only=True) as dev, mounted(dev, tmp_path / "restored", "ro,noload") as m:
        return {p.name: p.read_text() for p in m.iterdir() if p.is_file()}


def test_plain_device_needs_hold_chosen(plain: Path) -> None:
    with pytest.raises(ProviderError, match=r"hold: would do, but only when chosen \(--provider hold\)"):
        registry.select(resolve_source(str(plain)))
    assert registry.select(resolve_source(str(plain)), ["hold"]).name == "hold"
    listed = {s.name: s for s in registry.statuses()}
    assert listed["hold"].opt_in and not listed["reflink"].opt_in


def test_hold_keeps_the_filesystem_frozen_until_read(repo: Repository, plain: Path, tmp_path: Path) -> None:
    (plain / "before").write_text("on disk at the snapshot")
    writer = WritesWhileHeld(plain)
    opts = backup_set.SetBackupOptions([str(plain)], ["plain"], set_options=SetOptions(providers=["hold"]))
    (result,) = backup_set.run(repo, opts, [writer])
    assert writer.frozen_at_thaw is True, "still frozen after the commit: the hold lasts for the read"
    assert writer.write_done.wait(10), "the write went through once the backup had read the device"
    point = result.point
    assert point.provider == "hold" and point.consistency == "application-consistent"
    hold = [p for p in point.phases if p["name"] == "hold"]
    assert len(hold) == 1 and hold[0]["ok"], point.phases
    files = restored_files(repo, point.id, tmp_path)
    assert files == {"before": "on disk at the snapshot"}, "the write that waited is not in the image"
    assert (plain / "after").read_text() == "written during the hold"
    assert not is_frozen(plain)


def test_hold_limit_passed_fails_the_backup(repo: Repository, plain: Path) -> None:
    writer = WritesWhileHeld(plain, pause=2.0)  # the hold limit passes while it thaws
    opts = backup_set.SetBackupOptions(
        [str(plain)], ["plain"], set_options=SetOptions(providers=["hold"], hold_limit=1.0)
    )
    with pytest.raises(CoordinatorTimeout, match="hold"):
        backup_set.run(repo, opts, [writer])
    assert repo.point_ids() == [], "an image read after the thaw may be torn: no point"
    assert writer.write_done.wait(10) and not is_frozen(plain)


def test_hold_refuses_the_filesystem_it_writes_to(plain: Path) -> None:
    inside = Repository.init(LocalBackend(plain / "repo"), "secret", block_size=4096, fanout=8)
    opts = backup_set.SetBackupOptions([str(plain)], ["plain"], set_options=SetOptions(providers=["hold"]))
    with pytest.raises(ProviderError, match="would stay frozen while the backup writes there"):
        backup_set.run(inside, opts, [])
    assert inside.point_ids() == [] and not is_frozen(plain)


def test_sigkill_during_hold_thawed_by_watchdog(plain: Path, tmp_path: Path) -> None:
    """umbra is killed while it reads a held filesystem: the watchdog thaws it at once."""
    env = {**os.environ, "UMBRA_REPO": str(tmp_path / "repo"), "UMBRA_PASSWORD": "secret"}
    umbra = [sys.executable, "-m", "umbra"]
    subprocess.run([*umbra, "init", "--encryption", "none"], env=env, check=True, capture_output=True)
    marker = tmp_path / "held"
    proc = subprocess.Popen(
        [
            *umbra,
            "backup",
            str(plain),
            "-v",
            "plain",
            "--provider",
            "hold",
            "--hold-limit",
            "60",
            "--post-snapshot",
            f"touch {marker}; sleep 60",
        ],
        env=env,
        start_new_session=True,
    )
    try:
        for _ in range(400):
            if marker.exists():
                break
            time.sleep(0.05)
        assert marker.exists(), "the backup never reached its post-snapshot command"
        assert is_frozen(plain), "held after the commit"
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        t0 = time.monotonic()
        while is_frozen(plain):
            assert time.monotonic() - t0 < 10, "the watchdog did not thaw the filesystem"
        (plain / "after").write_text("writable again")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
