"""Continuous data protection end to end: ``umbra protect --repo`` ships every write, and
``VOLUME@TIME`` restores, exports and lists the volume as it was at many instants of a running
write workload, including writes made just before a kill -9 of the daemon (RELIABILITY C3, C4)."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest

from tests.conftest import requires
from tests.frontends.nbd_helpers import RawClient
from tests.frontends.protect_helpers import Protected
from umbra.coordinator.snapshot_set import SetOptions
from umbra.engine import backup_set
from umbra.frontends.nbd import protocol as p
from umbra.repo.backends import LocalBackend
from umbra.repo.repository import Repository

MiB = 1 << 20
SIZE = 8 * MiB


def iso_ns(ns: int) -> str:
    return datetime.fromtimestamp(ns // 10**9, UTC).strftime("%Y-%m-%dT%H:%M:%S") + f".{ns % 10**9:09d}Z"


def umbra(repo: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, UMBRA_REPO=str(repo), UMBRA_PASSWORD="secret")
    return subprocess.run([sys.executable, "-m", "umbra", *args], capture_output=True, text=True, env=env, timeout=120)


class Workload:
    """Writes through NBD, keeping the model and the instant after each acknowledged write."""

    def __init__(self, sock: Path, initial: bytes, seed: int) -> None:
        self.sock = sock
        self.rng = random.Random(seed)
        self.model = bytearray(initial)
        self.states: list[tuple[int, bytes]] = []

    def run(self, count: int) -> None:
        client = RawClient(self.sock, "data")
        for _ in range(count):
            offset = self.rng.randrange(0, SIZE - 70000)
            length = self.rng.choice([512, 4096, 8192, 65536, 70000])
            if self.rng.random() < 0.1:
                client.request(p.CMD_WRITE_ZEROES, offset, length)
                self.model[offset : offset + length] = bytes(length)
            else:
                data = self.rng.randbytes(length)
                client.request(p.CMD_WRITE, offset, length, payload=data)
                self.model[offset : offset + length] = data
            assert client.simple_reply()[0] == 0
            self.states.append((time.time_ns(), bytes(self.model)))  # after the ack, before the next write
        client.request(p.CMD_FLUSH, 0, 0)
        assert client.simple_reply()[0] == 0
        client.close()


def wait_shipped(d: Protected, timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        shipping = d.client.call("journal")["shipping"]
        if shipping["pending_records"] == 0 and shipping["shipped_seq"] > 0:
            return shipping
        assert time.monotonic() < deadline, shipping
        time.sleep(0.1)


@pytest.fixture
def setup(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("UMBRA_STATE_DIR", str(tmp_path / "states"))
    monkeypatch.setenv("UMBRA_PASSWORD", "secret")
    repo_dir = tmp_path / "repo"
    repo = Repository.init(LocalBackend(repo_dir), "secret", block_size=16384)
    image = tmp_path / "data.img"
    image.write_bytes(random.Random(5).randbytes(SIZE))
    d = Protected(image, "data", tmp_path / "states" / "data", "--repo", str(repo_dir))
    yield repo, repo_dir, d
    d.stop()


def test_any_instant_of_a_running_workload_restores_exactly(setup, tmp_path: Path) -> None:
    repo, repo_dir, d = setup
    work = Workload(d.state / "nbd.sock", d.source.read_bytes(), seed=1)
    work.run(20)
    opts = backup_set.SetBackupOptions(["data"], ["data"], "full", set_options=SetOptions())
    (result,) = backup_set.run(repo, opts, [])
    point = result.point
    assert point.cdp["journal"] and point.cdp["seq"] > 20  # the snapshot's mark follows the 20 writes
    work.run(150)
    shipping = wait_shipped(d)
    assert shipping["lag_s"] == 0 and shipping["batches"] >= 1
    status = d.cli("status", "data").stdout
    assert "shipping: ok" in status

    after_point = [s for s in work.states if s[0] > point.cdp["time_ns"]]
    picks = [after_point[0], after_point[len(after_point) // 2], after_point[-1], *random.sample(after_point, 3)]
    for when, expected in picks:
        out = tmp_path / f"r-{when}.img"
        proc = umbra(repo_dir, "restore", f"data@{iso_ns(when)}", str(out), "--json")
        assert proc.returncode == 0, proc.stderr
        assert json.loads(proc.stdout)["journal"]["records"] > 0
        assert out.read_bytes() == expected, f"state at {when}"
        out.unlink()

    # the same instant served over NBD reads back identical to its restore
    requires("qemu-img")
    when, expected = picks[1]
    (tmp_path / "expected.img").write_bytes(expected)
    sock = tmp_path / "export.sock"
    env = dict(os.environ, UMBRA_REPO=str(repo_dir))
    cmd = [sys.executable, "-m", "umbra", "export", f"data@{iso_ns(when)}", "--nbd", f"unix:{sock}"]
    served = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while not sock.exists():
            assert served.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        uri = f"nbd+unix:///data?socket={sock}"
        compare = subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "raw", str(tmp_path / "expected.img"), uri])
        assert compare.returncode == 0
    finally:
        served.send_signal(signal.SIGTERM)
        served.wait(30)


def test_kill_9_loses_no_shipped_or_pending_write(setup, tmp_path: Path) -> None:
    repo, repo_dir, d = setup
    work = Workload(d.state / "nbd.sock", d.source.read_bytes(), seed=2)
    opts = backup_set.SetBackupOptions(["data"], ["data"], "full", set_options=SetOptions())
    backup_set.run(repo, opts, [])
    work.run(60)
    d.stop(signal.SIGKILL)  # some records were shipped, others only reached the local journal
    again = Protected(d.source, "data", d.state, "--repo", str(repo_dir))
    try:
        wait_shipped(again)
        work.run(10)
        wait_shipped(again)
    finally:
        again.stop()
    for when, expected in (work.states[-1], work.states[59], work.states[30]):
        out = tmp_path / "r.img"
        proc = umbra(repo_dir, "restore", f"data@{iso_ns(when)}", str(out), "--force")
        assert proc.returncode == 0, proc.stderr
        assert out.read_bytes() == expected
        out.unlink()
    check = umbra(repo_dir, "check", "--json")
    result = json.loads(check.stdout)
    # a kill in the middle of a batch may leave its pack unindexed: a warning (exit 1, as in the
    # crash tests of tests/engine/test_crash.py), never an error
    leftovers = all("is not indexed (left by an interrupted operation" in w for w in result["warnings"])
    assert result["ok"] and not result["errors"] and leftovers, check.stdout
    assert check.returncode == (1 if result["warnings"] else 0), check.stderr
    assert result["journal_batches"] >= 2


def test_bookmarks_mark_consistent_instants_on_the_timeline(setup, tmp_path: Path) -> None:
    repo, repo_dir, d = setup
    work = Workload(d.state / "nbd.sock", d.source.read_bytes(), seed=3)
    opts = backup_set.SetBackupOptions(["data"], ["data"], "full", set_options=SetOptions())
    (result,) = backup_set.run(repo, opts, [])
    work.run(30)
    at_bookmark = bytes(work.model)
    log = tmp_path / "hook.log"
    proc = umbra(repo_dir, "bookmark", "data", "before-upgrade", "--pre-snapshot", f"echo frozen >> {log}", "--json")
    assert proc.returncode == 0, proc.stderr
    mark = json.loads(proc.stdout)
    assert mark["consistency"] == "application-consistent" and log.read_text() == "frozen\n"
    assert d.client.call("snapshot-list") == []  # the bookmark's snapshot is gone at once
    work.run(30)
    wait_shipped(d)
    doc = json.loads(umbra(repo_dir, "timeline", "data", "--json").stdout)
    kinds = [(e["kind"], e["name"]) for e in doc["events"]]
    assert kinds == [("point", result.point.id), ("bookmark", "before-upgrade")]
    assert doc["journal"]["records"] > 60
    assert "before-upgrade" in umbra(repo_dir, "timeline", "data").stdout
    out = tmp_path / "at-bookmark.img"
    proc = umbra(repo_dir, "restore", f"data@{iso_ns(mark['time_ns'])}", str(out))
    assert proc.returncode == 0, proc.stderr
    assert out.read_bytes() == at_bookmark
    missing = umbra(repo_dir, "bookmark", "nosuch", "x")
    assert missing.returncode != 0 and "Traceback" not in missing.stderr


def test_repository_outage_pauses_shipping_and_loses_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("UMBRA_STATE_DIR", str(tmp_path / "states"))
    monkeypatch.setenv("UMBRA_PASSWORD", "secret")
    repo_dir = tmp_path / "repo"
    repo = Repository.init(LocalBackend(repo_dir), "secret", block_size=16384)
    image = tmp_path / "data.img"
    image.write_bytes(random.Random(6).randbytes(SIZE))
    d = Protected(image, "data", tmp_path / "states" / "data", "--repo", str(repo_dir), "--journal-max", "256K")
    try:
        work = Workload(d.state / "nbd.sock", image.read_bytes(), seed=4)
        opts = backup_set.SetBackupOptions(["data"], ["data"], "full", set_options=SetOptions())
        backup_set.run(repo, opts, [])
        wait_shipped(d)
        away = tmp_path / "repo-away"
        repo_dir.rename(away)  # the repository disappears (an unmounted share, a dead disk)
        work.run(40)  # far more than --journal-max
        deadline = time.monotonic() + 30
        while not (journal := d.client.call("journal"))["shipping"]["last_error"]:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        assert journal["over_limit"] and journal["shipping"]["pending_records"] >= 40
        assert journal["shipping"]["lag_s"] > 0
        status = d.cli("status", "data").stdout
        assert "PAUSED" in status and "WARNING: the journal is over --journal-max" in status
        away.rename(repo_dir)  # back: shipping catches up by itself
        shipping = wait_shipped(d)
        assert shipping["last_error"] is None and shipping["lag_s"] == 0
        assert not d.client.call("journal")["over_limit"]  # shipped segments could be dropped again
    finally:
        d.stop()
    for when, expected in (work.states[-1], work.states[10]):
        out = tmp_path / "r.img"
        proc = umbra(repo_dir, "restore", f"data@{iso_ns(when)}", str(out), "--force")
        assert proc.returncode == 0, proc.stderr
        assert out.read_bytes() == expected


@pytest.mark.loopdev
def test_a_full_journal_filesystem_never_fails_a_write(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The state directory's filesystem fills up under NBD writes: every write is still acknowledged
    and lands in the volume; the journal records a gap when it has room again, and VOLUME@TIME
    restores every instant before the gap and after the next point, and refuses those between."""
    from tests.loopdev import small_filesystem

    monkeypatch.setenv("UMBRA_PASSWORD", "secret")
    repo_dir = tmp_path / "repo"
    repo = Repository.init(LocalBackend(repo_dir), "secret", block_size=16384)
    image = tmp_path / "data.img"
    image.write_bytes(random.Random(8).randbytes(SIZE))
    with small_filesystem(tmp_path / "statefs", 32) as fs:
        monkeypatch.setenv("UMBRA_STATE_DIR", str(fs))
        st = os.statvfs(fs)
        filler = fs / "filler"
        filler.write_bytes(bytes(st.f_bavail * st.f_frsize - 5 * MiB))
        d = Protected(image, "data", fs / "data", "--repo", str(repo_dir), "--journal-min-free", "0")
        try:
            work = Workload(d.state / "nbd.sock", image.read_bytes(), seed=5)
            work.run(10)
            opts = backup_set.SetBackupOptions(["data"], ["data"], "full", set_options=SetOptions())
            backup_set.run(repo, opts, [])
            for _ in range(40):  # until the journal's filesystem is full: no write fails meanwhile
                work.run(10)
                if d.client.call("journal")["gap"]:
                    break
            gap = d.client.call("journal")["gap"]
            assert gap and "No space left" in gap["reason"]
            assert "JOURNAL GAP since" in d.cli("status", "data").stdout
            work.run(10)
            filler.unlink()
            deadline = time.monotonic() + 90
            while d.client.call("journal")["gap"]:  # the daemon retries with backoff
                assert time.monotonic() < deadline
                time.sleep(0.2)
            assert d.client.call("journal")["gaps_recorded"] == 1
            work.run(10)
            (second,) = backup_set.run(repo, opts, [])
            work.run(10)
            wait_shipped(d)
        finally:
            d.stop()
    assert image.read_bytes() == work.model
    since, second_ns = gap["since_ns"], second.point.state_time_ns
    before = [s for s in work.states if s[0] < since]
    inside = [s for s in work.states if since <= s[0] < second_ns]
    after = [s for s in work.states if s[0] >= second_ns]
    assert len(before) >= 10 and len(inside) >= 20 and len(after) == 10
    out = tmp_path / "r.img"
    for when, expected in (before[-1], before[len(before) // 2], after[0], after[-1]):
        proc = umbra(repo_dir, "restore", f"data@{iso_ns(when)}", str(out), "--force")
        assert proc.returncode == 0, proc.stderr
        assert out.read_bytes() == expected
    for when, _ in (inside[0], inside[-1]):
        proc = umbra(repo_dir, "restore", f"data@{iso_ns(when)}", str(out), "--force")
        assert proc.returncode == 26, proc.stderr
        assert "its journal lacks the writes from" in proc.stderr and "Traceback" not in proc.stderr
    timeline = umbra(repo_dir, "timeline", "data")
    assert timeline.returncode == 0 and "writes missing until" in timeline.stdout
