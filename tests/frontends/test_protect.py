"""``umbra protect`` as a daemon: control commands, clean restart, kill -9 (RELIABILITY C4), FUSE + loop."""

from __future__ import annotations

import errno
import json
import os
import random
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from tests.conftest import requires
from umbra.cow.journal import WRITE, Journal
from umbra.frontends.nbd import protocol as p

from .nbd_helpers import RawClient
from .protect_helpers import Protected

MiB = 1 << 20


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "vol.img"
    with open(path, "wb") as f:
        f.truncate(32 * MiB)
    return path


def test_snapshot_status_and_journal_commands(image: Path, tmp_path: Path) -> None:
    requires("qemu-io")
    d = Protected(image, "vol", tmp_path / "state")
    try:
        subprocess.run(["qemu-io", "-f", "raw", d.nbd_uri, "-c", "write -P 7 0 2M"], check=True, capture_output=True)
        out = d.cli("snapshot", "create", "vol", "first").stdout
        assert "vol@first" in out
        subprocess.run(["qemu-io", "-f", "raw", d.nbd_uri, "-c", "write -P 8 0 1M"], check=True, capture_output=True)
        snaps = json.loads(d.cli("snapshot", "list", "vol", "--json").stdout)
        assert [s["name"] for s in snaps] == ["first"] and snaps[0]["copied_bytes"] == MiB
        status = json.loads(d.cli("status", "vol", "--json").stdout)
        assert status["writes"] == 2 and status["bytes_written"] == 3 * MiB and status["size"] == 32 * MiB
        journal = json.loads(d.cli("journal", "vol", "--json").stdout)
        assert journal["records"] == 3 and journal["write_bytes"] == 3 * MiB  # two writes and the snapshot mark
        assert journal["first"] <= journal["last"]
        dup = d.cli("snapshot", "create", "vol", "first", check=False)
        assert dup.returncode == 5 and "exists" in dup.stderr
        missing = d.cli("snapshot", "delete", "vol", "nosuch", check=False)
        assert missing.returncode == 5 and "no snapshot" in missing.stderr
        d.cli("snapshot", "delete", "vol", "first")
        assert json.loads(d.cli("snapshot", "list", "vol", "--json").stdout) == []
        # the source is held: a second daemon refuses it
        second = subprocess.run(
            [sys.executable, "-m", "umbra", "protect", str(image), "--name", "other", "--state", str(tmp_path / "s2")],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert second.returncode == 51 and "busy" in second.stderr
    finally:
        assert d.stop() == 0
    assert not (tmp_path / "state" / "running").exists()
    gone = subprocess.run(
        [sys.executable, "-m", "umbra", "status", "vol", "--state", str(tmp_path / "state")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert gone.returncode == 55 and "not being protected" in gone.stderr


def test_tracking_survives_a_clean_restart_and_not_a_crash(image: Path, tmp_path: Path) -> None:
    state = tmp_path / "state"
    d = Protected(image, "vol", state)
    d.cli("snapshot", "create", "vol", "a")
    gen = d.client.call("status")["tracking"]["generations"]
    assert len(gen) == 1
    assert d.stop() == 0
    d = Protected(image, "vol", state)
    tracking = d.client.call("status")["tracking"]
    assert tracking == {"generations": gen, "invalidated": None}
    assert d.stop(signal.SIGKILL) == -signal.SIGKILL
    d = Protected(image, "vol", state)
    tracking = d.client.call("status")["tracking"]
    assert tracking["generations"] == [] and "did not shut down cleanly" in tracking["invalidated"]
    assert d.stop() == 0


def test_kill_9_during_writes_loses_no_acknowledged_write(image: Path, tmp_path: Path) -> None:
    """RELIABILITY C4: every write the client saw acknowledged (and flushed) is in the volume and
    the journal after kill -9, and tracking is invalidated."""
    state = tmp_path / "state"
    d = Protected(image, "vol", state)
    client = RawClient(state / "nbd.sock", "vol")
    acked: list[tuple[int, bytes]] = []
    in_flight: tuple[int, bytes] | None = None  # sent, not acknowledged: wholly there or not at all
    flushed = 0
    rng = random.Random(4)
    killer = threading.Timer(1.0, lambda: os.kill(d.proc.pid, signal.SIGKILL))
    killer.start()
    try:
        for i in range(1_000_000):
            slot = rng.randrange(32 * MiB // 4096)
            data = rng.randbytes(4096)
            in_flight = (slot * 4096, data)
            client.request(p.CMD_WRITE, slot * 4096, 4096, payload=data)
            if client.simple_reply()[0] != 0:
                break
            acked.append(in_flight)
            in_flight = None
            if i % 10 == 9:
                client.request(p.CMD_FLUSH, 0, 0)
                if client.simple_reply()[0] != 0:
                    break
                flushed = len(acked)
    except (ConnectionError, OSError):
        pass
    killer.join()
    d.stop()
    assert flushed > 10, "the kill should land in the middle of the writes"
    last = dict(acked)  # offset -> the last data acknowledged there
    with open(image, "rb") as f:
        for offset, data in last.items():  # a process kill keeps the page cache: even unflushed acked writes
            f.seek(offset)
            allowed = {data, in_flight[1]} if in_flight and in_flight[0] == offset else {data}
            assert f.read(4096) in allowed
    journal = Journal.open(state / "journal", 32 * MiB)
    logged = [(r.offset, r.data) for r in journal.records() if r.kind == WRITE]
    journal.close()
    assert logged[: len(acked)] == acked
    d = Protected(image, "vol", state)
    assert "did not shut down cleanly" in d.client.call("status")["tracking"]["invalidated"]
    assert d.stop() == 0


@pytest.mark.root
@pytest.mark.loopdev
def test_fuse_loop_filesystem_and_snapshot_files(tmp_path: Path) -> None:
    requires("root", "loop", "mkfs.ext4")
    image = tmp_path / "vol.img"
    with open(image, "wb") as f:
        f.truncate(128 * MiB)
    d = Protected(image, "fsvol", tmp_path / "state", "--loop", "--fuse", str(tmp_path / "fuse"))
    mnt, snapmnt = tmp_path / "mnt", tmp_path / "snap"
    mnt.mkdir()
    snapmnt.mkdir()
    loop = d.info["loop"]
    snap_loop = None
    try:
        assert loop.startswith("/dev/loop")
        assert sorted(os.listdir(tmp_path / "fuse")) == ["fsvol.img"]
        subprocess.run(["mkfs.ext4", "-q", loop], check=True)
        subprocess.run(["mount", loop, str(mnt)], check=True)
        payload = os.urandom(3 * MiB)
        (mnt / "keep.bin").write_bytes(payload)
        (mnt / "note.txt").write_text("before")
        subprocess.run(["fsfreeze", "-f", str(mnt)], check=True)
        try:
            d.cli("snapshot", "create", "fsvol", "s1")
        finally:
            subprocess.run(["fsfreeze", "-u", str(mnt)], check=True)
        (mnt / "note.txt").write_text("after")
        (mnt / "keep.bin").unlink()
        (mnt / "new.txt").write_text("new")
        os.sync()
        assert sorted(os.listdir(tmp_path / "fuse")) == ["fsvol.img", "fsvol@s1.img"]
        with pytest.raises(OSError) as refused:
            open(tmp_path / "fuse" / "fsvol@s1.img", "r+b")  # noqa: SIM115
        assert refused.value.errno in (errno.EROFS, errno.EACCES)
        snap_loop = subprocess.run(
            ["losetup", "-f", "--show", "-r", str(tmp_path / "fuse" / "fsvol@s1.img")],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        subprocess.run(["mount", "-o", "ro,noload", snap_loop, str(snapmnt)], check=True)
        try:
            assert (snapmnt / "note.txt").read_text() == "before"
            assert (snapmnt / "keep.bin").read_bytes() == payload
            assert not (snapmnt / "new.txt").exists()
        finally:
            subprocess.run(["umount", str(snapmnt)], check=True)
        assert (mnt / "note.txt").read_text() == "after"
        d.cli("snapshot", "delete", "fsvol", "s1")
    finally:
        if snap_loop:
            subprocess.run(["losetup", "-d", snap_loop], check=False)
        subprocess.run(["umount", str(mnt)], check=False)
        rc = d.stop()
    assert rc == 0, d.output()
    assert loop not in subprocess.run(["losetup", "-a"], capture_output=True, text=True).stdout.split(":")[0::2]
    fsck = subprocess.run(["e2fsck", "-fn", str(image)], capture_output=True, text=True, check=False)
    assert fsck.returncode == 0, fsck.stdout


def test_snapshots_survive_a_clean_restart_but_not_a_modified_source(image: Path, tmp_path: Path) -> None:
    state = tmp_path / "state"
    d = Protected(image, "vol", state, "--memory", "64K")  # most copies spill to the file
    c = RawClient(state / "nbd.sock", "vol")
    old = os.urandom(4 * MiB)
    c.request(p.CMD_WRITE, 0, len(old), payload=old)
    assert c.simple_reply()[0] == 0
    c.close()
    d.cli("snapshot", "create", "vol", "keep")
    c = RawClient(state / "nbd.sock", "vol")
    c.request(p.CMD_WRITE, 0, 2 * MiB, payload=b"\x01" * 2 * MiB)
    assert c.simple_reply()[0] == 0
    c.close()
    assert d.stop() == 0
    assert (state / "snapshots.json").exists()
    d = Protected(image, "vol", state)
    snaps = d.client.call("snapshot-list")
    assert [s["name"] for s in snaps] == ["keep"] and snaps[0]["copied_bytes"] == 2 * MiB
    c = RawClient(state / "nbd.sock", "vol@keep")
    c.request(p.CMD_READ, 0, 4 * MiB)
    assert c.simple_reply(4 * MiB) == (0, old)
    c.close()
    assert d.stop() == 0
    with open(image, "r+b") as f:  # written while nobody protects it
        f.write(b"sneaky")
    d = Protected(image, "vol", state)
    status = d.client.call("status")
    assert status["snapshots"] == []
    assert "modified while it was not protected" in status["tracking"]["invalidated"]
    assert "dropping the snapshots" in d.output()
    assert d.stop() == 0


def test_an_nbd_address_in_use_is_a_clear_error(image: Path, tmp_path: Path) -> None:
    import socket

    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    port = busy.getsockname()[1]
    try:
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "umbra",
                "protect",
                str(image),
                "--name",
                "vol",
                "--state",
                str(tmp_path / "s"),
                "--nbd",
                f"127.0.0.1:{port}",
            ],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    finally:
        busy.close()
    assert proc.returncode == 50, proc.stderr
    assert f"cannot serve NBD at 127.0.0.1:{port}" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "s" / "running").exists()  # shut down cleanly: tracking stays valid


def test_nbd_over_tcp(image: Path, tmp_path: Path) -> None:
    requires("qemu-io")
    d = Protected(image, "vol", tmp_path / "state", "--nbd", "127.0.0.1:0")
    try:
        tcp = [a for a in d.info["nbd"] if not a.startswith("unix:")]
        assert len(tcp) == 1 and tcp[0].startswith("127.0.0.1:")
        out = subprocess.run(
            ["qemu-io", "-f", "raw", f"nbd://{tcp[0]}/vol", "-c", "write -P 9 0 64k", "-c", "read -P 9 0 64k"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        assert "read 65536/65536" in out
    finally:
        assert d.stop() == 0
    with open(image, "rb") as f:
        assert f.read(65536) == b"\x09" * 65536
