"""The shadow copy service on real filesystems (RELIABILITY G6 and the coordinator scenarios of
STYLE P12): script-writer control flow, all-or-none, timeouts, the watchdog under SIGKILL, a
two-volume invariant, and SQLite consistency."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.conftest import requires
from tests.coordinator_fixtures import btrfs_host, ext4_volumes, xfs_host
from tests.loopdev import loop_device, mounted
from umbra.coordinator.snapshot_set import SetOptions, SnapshotSet
from umbra.engine import backup_set, restore
from umbra.errors import CoordinatorTimeout, ProviderError, WriterVeto
from umbra.providers import registry
from umbra.repo.repository import Repository
from umbra.testing.faults import FaultyProvider
from umbra.writers.base import SetContext, Writer
from umbra.writers.script import ScriptWriter
from umbra.writers.sqlite import SQLiteWriter

pytestmark = [pytest.mark.root, pytest.mark.loopdev]


@pytest.fixture
def faulty(monkeypatch: pytest.MonkeyPatch) -> type[FaultyProvider]:
    monkeypatch.setattr(registry, "PROVIDERS", [*registry.PROVIDERS, FaultyProvider])
    monkeypatch.setattr(FaultyProvider, "mode", "fail")
    monkeypatch.setattr(FaultyProvider, "only_volume", None)
    return FaultyProvider


def env_recorder(tmp_path: Path, phase: str, code: int = 0) -> str:
    """A command that appends its phase and UMBRA_* environment to log.jsonl, then exits ``code``."""
    log = tmp_path / "log.jsonl"
    script = (
        "import json, os, sys; "
        f"open({str(log)!r}, 'a').write(json.dumps({{'phase': {phase!r}, "
        "**{k: v for k, v in os.environ.items() if k.startswith('UMBRA_')}}) + '\\n'); "
        f"sys.exit({code})"
    )
    return f"{sys.executable} -c {json.dumps(script)}"


def read_log(tmp_path: Path) -> list[dict[str, str]]:
    path = tmp_path / "log.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def is_frozen(mountpoint: Path) -> bool:
    """True if a write to the filesystem blocks.  The probing child cannot be killed while it
    sleeps on the frozen filesystem (uninterruptible), so it is left to finish after the thaw."""
    probe = subprocess.Popen(["sh", "-c", f"echo x > {mountpoint}/.frozen-probe && sync -f {mountpoint}/.frozen-probe"])
    try:
        probe.wait(timeout=1.5)
        return False
    except subprocess.TimeoutExpired:
        threading.Thread(target=probe.wait, daemon=True).start()  # reaped once thawed
        return True


@pytest.fixture
def host(tmp_path: Path):  # type: ignore[no-untyped-def]
    requires("loop", "mkfs.xfs", "mkfs.ext4")
    with xfs_host(tmp_path) as h:
        yield h


def backup_opts(mnts: dict[str, Path], **set_kw: object) -> backup_set.SetBackupOptions:
    return backup_set.SetBackupOptions(
        [str(m) for m in mnts.values()],
        list(mnts),
        set_options=SetOptions(**set_kw),  # type: ignore[arg-type]
    )


# --- script writer: every branch of seed 004's flow -------------------------------------------


def script(tmp_path: Path, pre: int = 0, post_snap: int = 0) -> ScriptWriter:
    return ScriptWriter(
        env_recorder(tmp_path, "pre", pre),
        env_recorder(tmp_path, "post-snapshot", post_snap),
        env_recorder(tmp_path, "post-backup"),
    )


def test_script_writer_success_flow(repo: Repository, host: Path, tmp_path: Path) -> None:
    with ext4_volumes(host, tmp_path, ["data"]) as mnts:
        results = backup_set.run(repo, backup_opts(mnts), [script(tmp_path)])
    log = read_log(tmp_path)
    assert [e["phase"] for e in log] == ["pre", "post-snapshot", "post-backup"]
    assert [e["UMBRA_PHASE"] for e in log] == ["pre-snapshot", "post-snapshot", "post-backup"]
    assert log[0]["UMBRA_VOLUMES"] == str(mnts["data"]) and log[0]["UMBRA_PROVIDER"] == "reflink"
    assert log[1]["UMBRA_STATUS"] == "ok" and log[2]["UMBRA_STATUS"] == "ok"
    assert log[2]["UMBRA_POINT"] == results[0].point.id and log[2]["UMBRA_ERROR"] == ""
    point = results[0].point
    assert point.consistency == "application-consistent" and point.provider == "reflink"
    names = [p["name"] for p in point.phases]
    assert names == [
        "gather",
        "select",
        "prepare",
        "freeze-writers",
        "flush-and-hold",
        "commit",
        "release",
        "thaw-writers",
        "held",
    ]
    assert all(p["ok"] for p in point.phases)
    assert not list(host.glob(".umbra-snapshot-*")), "snapshots are deleted after the backup"
    outcome = repo.set_outcomes()[point.set_id]  # backup-complete happens after the manifest
    assert outcome["status"] == "ok" and outcome["points"] == [point.id]
    assert outcome["notified"] == [{"writer": "script", "ok": True, "error": ""}]
    assert outcome["phases"][-1]["name"] == "backup-complete" and outcome["phases"][-1]["ok"]


class FailsNotification(Writer):
    name = "fails-notification"

    def metadata(self) -> dict[str, object]:
        return {"writer": self.name, "components": []}

    def freeze(self, ctx: SetContext) -> None:
        return None

    def thaw(self, ctx: SetContext) -> None:
        return None

    def backup_complete(self, ctx: SetContext) -> None:
        raise RuntimeError("log truncation failed")


def test_backup_complete_outcome_is_stored_and_listed(repo: Repository, host: Path, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from umbra.cli.main import register
    from umbra.repo.prune import prune
    from umbra.repo.retention import Policy

    with ext4_volumes(host, tmp_path, ["data"]) as mnts:
        (first,) = backup_set.run(repo, backup_opts(mnts), [FailsNotification()])
        (second,) = backup_set.run(repo, backup_opts(mnts), [script(tmp_path)])
    outcomes = repo.set_outcomes()
    bad = outcomes[first.point.set_id]
    assert bad["status"] == "ok", "the backup itself succeeded"
    assert bad["notified"] == [{"writer": "fails-notification", "ok": False, "error": "log truncation failed"}]
    env = {"UMBRA_REPO": str(tmp_path / "repo"), "UMBRA_PASSWORD": "secret"}
    listing = CliRunner().invoke(register(), ["list", "--json"], env=env)
    assert listing.exit_code == 0, listing.output
    by_id = {d["id"]: d for d in json.loads(listing.output)}
    assert by_id[first.point.id]["set_outcome"]["notified"][0]["ok"] is False
    assert by_id[second.point.id]["set_outcome"]["status"] == "ok"
    table = CliRunner().invoke(register(), ["list"], env=env, terminal_width=200)
    assert "notify-failed" in table.output
    lines = CliRunner().invoke(register(), ["list", "--phases"], env=env, terminal_width=200).output.splitlines()
    first_line = next(line for line in lines if line.startswith(first.point.short_id + "  "))
    assert "flush-and-hold ok" in first_line and "commit ok" in first_line
    assert "backup-complete FAILED" in first_line and "(a writer failed)" in first_line
    with repo.lock(exclusive=True):
        prune(repo, Policy(keep_last=1))
    assert set(repo.set_outcomes()) == {second.point.set_id}, "an outcome goes with its last point"


def test_pre_snapshot_failure_aborts_everything(repo: Repository, host: Path, tmp_path: Path) -> None:
    with ext4_volumes(host, tmp_path, ["data"]) as mnts, pytest.raises(WriterVeto, match="exited with 3"):
        backup_set.run(repo, backup_opts(mnts), [script(tmp_path, pre=3)])
    assert [e["phase"] for e in read_log(tmp_path)] == ["pre"]
    assert repo.point_ids() == [] and not list(host.glob(".umbra-snapshot-*"))


def test_snapshot_failure_runs_post_commands_with_error(
    repo: Repository, host: Path, tmp_path: Path, faulty: type[FaultyProvider]
) -> None:
    with ext4_volumes(host, tmp_path, ["data"]) as mnts:
        with pytest.raises(ProviderError, match="injected"):
            backup_set.run(repo, backup_opts(mnts, providers=["faulty"]), [script(tmp_path)])
        assert not is_frozen(mnts["data"])
    log = read_log(tmp_path)
    assert [e["phase"] for e in log] == ["pre", "post-snapshot", "post-backup"]
    assert log[1]["UMBRA_STATUS"] == "failed" and "injected commit failure" in log[1]["UMBRA_ERROR"]
    assert log[2]["UMBRA_STATUS"] == "failed" and log[2]["UMBRA_POINT"] == ""
    assert repo.point_ids() == [] and not list(host.glob(".umbra-snapshot-*"))


def test_post_snapshot_failure_does_not_stop_the_backup(repo: Repository, host: Path, tmp_path: Path) -> None:
    with ext4_volumes(host, tmp_path, ["data"]) as mnts:
        results = backup_set.run(repo, backup_opts(mnts), [script(tmp_path, post_snap=9)])
    log = read_log(tmp_path)
    assert [e["phase"] for e in log] == ["pre", "post-snapshot", "post-backup"]
    assert log[2]["UMBRA_STATUS"] == "ok" and log[2]["UMBRA_POINT"] == results[0].point.id


def test_backup_failure_after_snapshot_reaches_post_backup(repo: Repository, host: Path, tmp_path: Path) -> None:
    from umbra.errors import RepositoryLocked

    with ext4_volumes(host, tmp_path, ["data"]) as mnts, repo.lock(exclusive=True), pytest.raises(RepositoryLocked):
        backup_set.run(repo, backup_opts(mnts), [script(tmp_path)])
    log = read_log(tmp_path)
    assert [e["phase"] for e in log] == ["pre", "post-snapshot", "post-backup"]
    assert log[2]["UMBRA_STATUS"] == "failed" and "locked" in log[2]["UMBRA_ERROR"]
    assert not list(host.glob(".umbra-snapshot-*"))


# --- all or none, timeouts, the watchdog -------------------------------------------------------


def test_one_provider_failing_leaves_no_point_and_no_snapshot(
    repo: Repository, host: Path, tmp_path: Path, faulty: type[FaultyProvider]
) -> None:
    with ext4_volumes(host, tmp_path, ["a", "b"]) as mnts:
        faulty.only_volume = str(mnts["b"])
        with pytest.raises(ProviderError):
            backup_set.run(repo, backup_opts(mnts, providers=["faulty"]), [])
        assert not is_frozen(mnts["a"]) and not is_frozen(mnts["b"])
    assert repo.point_ids() == []
    assert not list(host.glob(".umbra-snapshot-*")), "the snapshot of the volume that succeeded was deleted"


class NeverFreezes(Writer):
    name = "stuck"

    def __init__(self) -> None:
        self.thawed = False

    def metadata(self) -> dict[str, object]:
        return {"writer": self.name}

    def freeze(self, ctx: SetContext) -> None:
        time.sleep(3600)

    def thaw(self, ctx: SetContext) -> None:
        self.thawed = True


def test_writer_that_never_freezes_times_out(repo: Repository, host: Path, tmp_path: Path) -> None:
    sqlite_db = tmp_path / "x.db"
    sqlite3.connect(sqlite_db).execute("create table t(x)").connection.commit()
    first = SQLiteWriter([str(sqlite_db)])
    with ext4_volumes(host, tmp_path, ["data"]) as mnts:
        t0 = time.monotonic()
        with pytest.raises(CoordinatorTimeout, match="freeze-writers"):
            backup_set.run(repo, backup_opts(mnts, freeze_timeout=1.5), [first, NeverFreezes()])
        assert time.monotonic() - t0 < 10
        assert not is_frozen(mnts["data"])
    assert first.held() is False or not first._conns, "the writer that froze was thawed"
    with sqlite3.connect(sqlite_db, timeout=1) as conn:
        conn.execute("insert into t values (1)")  # not locked any more


def test_commit_over_limit_is_thawed_by_watchdog(
    repo: Repository, host: Path, tmp_path: Path, faulty: type[FaultyProvider]
) -> None:
    faulty.mode, faulty.hang_s = "hang", 6
    with ext4_volumes(host, tmp_path, ["data"]) as mnts:
        t0 = time.monotonic()
        with pytest.raises(CoordinatorTimeout, match="commit"):
            backup_set.run(repo, backup_opts(mnts, providers=["faulty"], commit_timeout=1.0), [])
        assert time.monotonic() - t0 < 5
        assert not is_frozen(mnts["data"])
    assert repo.point_ids() == []


KILL_SCRIPT = """
import sys
from umbra.coordinator.snapshot_set import SetOptions, SnapshotSet
from umbra.providers import registry
from umbra.testing.faults import FaultyProvider
registry.PROVIDERS.append(FaultyProvider)
FaultyProvider.mode, FaultyProvider.signal_path = "signal", sys.argv[1]
SnapshotSet([sys.argv[2]], [], SetOptions(providers=["faulty"], commit_timeout=float(sys.argv[3]))).create()
"""


def test_sigkill_during_commit_thawed_by_watchdog(host: Path, tmp_path: Path) -> None:
    """umbra is SIGKILLed while the filesystem is frozen: the watchdog thaws it at once."""
    signal_file = tmp_path / "committing"
    with ext4_volumes(host, tmp_path, ["data"]) as mnts:
        proc = subprocess.Popen([sys.executable, "-c", KILL_SCRIPT, str(signal_file), str(mnts["data"]), "30"])
        for _ in range(200):
            if signal_file.exists():
                break
            time.sleep(0.05)
        assert signal_file.exists(), "the coordinator never reached its commit"
        assert is_frozen(mnts["data"]), "the filesystem is frozen during the commit"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        t0 = time.monotonic()
        while is_frozen(mnts["data"]):
            assert time.monotonic() - t0 < 10, "the watchdog did not thaw the filesystem"
        (mnts["data"] / "after").write_text("writable again")
        assert time.monotonic() - t0 < 30 / 3, "thawed well within the commit limit"


# --- consistency across volumes, and SQLite ------------------------------------------------------

WORKLOAD = """
import os, sys, time
a, b, stop = sys.argv[1:4]
n = 0
while not os.path.exists(stop):
    n += 1
    for path in (a, b):  # invariant: at any instant a == b or a == b + 1
        with open(path + ".tmp", "w") as f:
            f.write(str(n))
        os.replace(path + ".tmp", path)
"""


def restored_value(repo: Repository, point_id: str, tmp_path: Path, name: str) -> int:
    out = tmp_path / f"restored-{point_id[:8]}.img"
    out.unlink(missing_ok=True)
    restore.run(repo, repo.load_point(point_id), str(out))
    with loop_device(out, read_only=True) as dev, mounted(dev, tmp_path / f"r-{point_id[:8]}", "ro,noload") as m:
        return int((m / name).read_text())


def test_two_volume_invariant_holds_with_a_set_and_breaks_without(repo: Repository, host: Path, tmp_path: Path) -> None:
    with ext4_volumes(host, tmp_path, ["a", "b"]) as mnts:
        stop = tmp_path / "stop"
        worker = subprocess.Popen(
            [sys.executable, "-c", WORKLOAD, str(mnts["a"] / "counter"), str(mnts["b"] / "counter"), str(stop)]
        )
        try:
            time.sleep(0.5)
            together = []
            for _ in range(3):
                together.append(backup_set.run(repo, backup_opts(mnts), []))
            apart = [
                backup_set.run(repo, backup_opts({"a": mnts["a"]}), []),
                backup_set.run(repo, backup_opts({"b": mnts["b"]}), []),
            ]
        finally:
            stop.touch()
            worker.wait()
    for results in together:
        pa, pb = results[0].point, results[1].point
        assert pa.set_id == pb.set_id and pa.consistency == "filesystem-frozen"
        a, b = restored_value(repo, pa.id, tmp_path, "counter"), restored_value(repo, pb.id, tmp_path, "counter")
        assert a - b in (0, 1), f"a={a} b={b}: the set was not taken at one instant"
    a = restored_value(repo, apart[0][0].point.id, tmp_path, "counter")
    b = restored_value(repo, apart[1][0].point.id, tmp_path, "counter")
    assert a - b not in (0, 1), "without one set, the two volumes come from different instants"


SQLITE_WORKLOAD = """
import os, sqlite3, sys, time
db, stop = sys.argv[1:3]
conn = sqlite3.connect(db, timeout=60, isolation_level=None)
conn.execute("pragma journal_mode=wal")
conn.execute("create table if not exists acct(id integer primary key, balance integer)")
conn.execute("insert or ignore into acct values (1, 1000), (2, 0)")
while not os.path.exists(stop):
    conn.execute("begin immediate")
    conn.execute("update acct set balance = balance - 1 where id = 1")
    conn.execute("update acct set balance = balance + 1 where id = 2")
    conn.execute("commit")
    time.sleep(0.0005)
"""


def test_sqlite_writer_restores_consistent_database(repo: Repository, host: Path, tmp_path: Path) -> None:
    with ext4_volumes(host, tmp_path, ["db"], size=96 << 20) as mnts:
        db = mnts["db"] / "bank.db"
        stop = tmp_path / "stop"
        worker = subprocess.Popen([sys.executable, "-c", SQLITE_WORKLOAD, str(db), str(stop)])
        try:
            time.sleep(0.7)
            results = [backup_set.run(repo, backup_opts(mnts), [SQLiteWriter([str(db)])]) for _ in range(3)]
        finally:
            stop.touch()
            worker.wait()
    for (res,) in results:
        assert res.point.consistency == "application-consistent"
        assert res.point.writers[0]["components"][0]["name"] == str(db)
        out = tmp_path / "r.img"
        out.unlink(missing_ok=True)
        restore.run(repo, res.point, str(out))
        with loop_device(out) as dev, mounted(dev, tmp_path / "rdb", "rw") as m:
            conn = sqlite3.connect(m / "bank.db")
            assert conn.execute("pragma integrity_check").fetchone()[0] == "ok"
            total = conn.execute("select sum(balance) from acct").fetchone()[0]
            moved = conn.execute("select balance from acct where id = 2").fetchone()[0]
            conn.close()
            assert total == 1000 and moved > 0


def test_unmounted_image_in_use_is_refused(repo: Repository, tmp_path: Path) -> None:
    img = tmp_path / "busy.img"
    img.write_bytes(bytes(1 << 20))
    holder = subprocess.Popen([sys.executable, "-c", f"f = open({str(img)!r}, 'r+b'); import time; time.sleep(60)"])
    try:
        time.sleep(0.5)
        with pytest.raises(ProviderError, match=f"open for writing by pid {holder.pid}"):
            SnapshotSet([str(img)], []).create()
    finally:
        holder.kill()
        holder.wait()
    results = backup_set.run(repo, backup_set.SetBackupOptions([str(img)], ["img"]), [])
    assert results[0].point.consistency == "offline" and results[0].point.provider == "direct"


def test_excluded_file_restores_as_zeros(repo: Repository, host: Path, tmp_path: Path) -> None:
    marker, keep = b"EXCLUDE-ME-" * 1000, b"KEEP-ME-" * 1000
    with ext4_volumes(host, tmp_path, ["data"]) as mnts:
        (mnts["data"] / "swapfile").write_bytes(marker * 300)
        (mnts["data"] / "keep.bin").write_bytes(keep * 300)
        opts = backup_opts(mnts, exclude_files=[str(mnts["data"] / "swapfile")])
        (res,) = backup_set.run(repo, opts, [])
        with pytest.raises(Exception, match="not a file on a mounted filesystem"):
            backup_set.run(repo, backup_opts(mnts, exclude_files=[str(tmp_path / "elsewhere")]), [])
    assert res.point.used_map.endswith("-excludes")
    out = tmp_path / "r.img"
    restore.run(repo, res.point, str(out))
    data = out.read_bytes()
    assert b"EXCLUDE-ME-" not in data and b"KEEP-ME-" in data
    with loop_device(out, read_only=True) as dev, mounted(dev, tmp_path / "r", "ro,noload") as m:
        assert (m / "swapfile").read_bytes() == bytes(len(marker) * 300)
        assert (m / "keep.bin").read_bytes() == keep * 300


BURSTY = """
import os, sys, time
path, pause, stop = sys.argv[1], float(sys.argv[2]), sys.argv[3]
fd = os.open(path, os.O_WRONLY)
n = 0
while not os.path.exists(stop):
    burst_end = time.monotonic() + 0.4
    while time.monotonic() < burst_end:
        os.pwrite(fd, os.urandom(65536), (n % 256) * 65536)
        os.fsync(fd)
        n += 1
    time.sleep(pause)
"""


@pytest.mark.parametrize(("pause", "expect"), [(1.2, "inactivity-detected"), (0.0, "crash-consistent")])
def test_write_inactivity_detection(repo: Repository, host: Path, tmp_path: Path, pause: float, expect: str) -> None:
    """An image file written by a process without a writer (a VM, say): the set waits for a quiet
    window on the device; under constant writes it gives up at the timeout and says so."""
    img = host / "vm.img"
    img.write_bytes(bytes(16 << 20))
    stop = tmp_path / "stop"
    worker = subprocess.Popen([sys.executable, "-c", BURSTY, str(img), str(pause), str(stop)])
    try:
        time.sleep(0.3)
        opts = backup_set.SetBackupOptions(
            [str(img)], ["vm"], set_options=SetOptions(quiet_window=0.5, quiet_timeout=3)
        )
        (res,) = backup_set.run(repo, opts, [])
    finally:
        stop.touch()
        worker.wait()
    point = res.point
    assert point.provider == "reflink" and point.consistency == expect
    wait = next(p for p in point.phases if p["name"] == "wait-quiet")
    if expect == "crash-consistent":
        assert wait["duration_s"] >= 3 and "no quiet window" in wait["error"]
    else:
        assert wait["duration_s"] < 3 and not wait["error"]


LOCKSTEP = """
import os, sys
a, b, stop = sys.argv[1:4]
fa, fb = os.open(a, os.O_WRONLY), os.open(b, os.O_WRONLY)
n = 0
while not os.path.exists(stop):
    n += 1
    os.pwrite(fa, b"%020d" % n, 0)  # invariant at any instant: a == b or a == b + 1
    os.pwrite(fb, b"%020d" % n, 0)
"""


def test_btrfs_subvolume_snapshot_shared_by_the_set(repo: Repository, tmp_path: Path) -> None:
    requires("loop", "mkfs.btrfs")
    with btrfs_host(tmp_path) as mnt:
        subprocess.run(["btrfs", "subvolume", "create", str(mnt / "vms")], check=True, capture_output=True)
        a, b = mnt / "vms" / "a.img", mnt / "vms" / "b.img"
        a.write_bytes(bytes(1 << 20))
        b.write_bytes(bytes(1 << 20))
        stop = tmp_path / "stop"
        worker = subprocess.Popen([sys.executable, "-c", LOCKSTEP, str(a), str(b), str(stop)])
        try:
            time.sleep(0.3)
            pause = ScriptWriter(f"kill -STOP {worker.pid}", f"kill -CONT {worker.pid}")  # the application's freeze
            sets = []
            for _ in range(5):
                opts = backup_set.SetBackupOptions(
                    [str(a), str(b)], ["a", "b"], set_options=SetOptions(providers=["btrfs"])
                )
                sets.append(backup_set.run(repo, opts, [pause]))
            assert worker.poll() is None, "the workload ran on between the sets"
        finally:
            stop.touch()
            worker.wait()
        assert not list((mnt / "vms").glob(".umbra-snapshot-*")), "the shared snapshot was deleted once"
    for ra, rb in sets:
        assert ra.point.set_id == rb.point.set_id and ra.point.provider == "btrfs"
        assert ra.point.consistency == "application-consistent"
        va = int(restored_bytes(repo, ra.point.id, tmp_path)[:20])
        vb = int(restored_bytes(repo, rb.point.id, tmp_path)[:20])
        assert va - vb in (0, 1), f"a={va} b={vb}: not one instant"


def restored_bytes(repo: Repository, point_id: str, tmp_path: Path) -> bytes:
    out = tmp_path / "r.bin"
    out.unlink(missing_ok=True)
    restore.run(repo, repo.load_point(point_id), str(out))
    return out.read_bytes()


class NeverThaws(NeverFreezes):
    def freeze(self, ctx: SetContext) -> None:
        return None

    def thaw(self, ctx: SetContext) -> None:
        time.sleep(3600)


def test_writer_that_never_thaws_is_a_clear_error(repo: Repository, host: Path, tmp_path: Path) -> None:
    other = script(tmp_path)
    with ext4_volumes(host, tmp_path, ["data"]) as mnts:
        with pytest.raises(CoordinatorTimeout, match="thaw-writers"):
            backup_set.run(repo, backup_opts(mnts, freeze_timeout=1.0), [other, NeverThaws()])
        assert not is_frozen(mnts["data"])
    assert repo.point_ids() == [] and not list(host.glob(".umbra-snapshot-*"))
    phases = [e["phase"] for e in read_log(tmp_path)]
    assert phases == ["pre", "post-snapshot", "post-backup"], "the other writer was still thawed and told"


def test_components_document_and_providers_listing(repo: Repository, host: Path, tmp_path: Path) -> None:
    with ext4_volumes(host, tmp_path, ["data"]) as mnts:
        db = mnts["data"] / "x.db"
        with contextlib.closing(sqlite3.connect(db)) as conn:  # closed: the test unmounts this filesystem
            conn.execute("create table t(x)")
            conn.commit()
        (res,) = backup_set.run(repo, backup_opts(mnts), [SQLiteWriter([str(db)])])
    comp = res.point.components
    assert comp["set_id"] == res.point.set_id and comp["volumes"][0]["provider"] == "reflink"
    assert comp["writers"][0]["components"][0]["name"] == str(db)
    names = {s.name: s for s in registry.statuses()}
    assert {"reflink", "btrfs", "direct", "fsfreeze"} <= set(names) and names["fsfreeze"].available
