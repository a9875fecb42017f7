"""RELIABILITY C5: the wall clock stepped back an hour and forward a day, and the daemon stopped
(SIGSTOP) for longer than its timers, while a client writes: the journal's times never go back,
the raw clock is kept in ``clock`` marks, and no write is lost.  The clock is moved with
libfaketime in the daemon only (the boot-time clock it compares against is left alone)."""

from __future__ import annotations

import json
import os
import random
import signal
import time
from pathlib import Path

import pytest

from tests.conftest import FAKETIME_LIB, requires
from tests.frontends.nbd_helpers import RawClient
from tests.frontends.protect_helpers import Protected
from tests.frontends.test_cdp import iso_ns, umbra, wait_shipped
from umbra.coordinator.snapshot_set import SetOptions
from umbra.cow.journal import MARK, WRITE, Journal
from umbra.engine import backup_set
from umbra.frontends.nbd import protocol as p
from umbra.repo.backends import LocalBackend
from umbra.repo.repository import Repository

MiB = 1 << 20
SIZE = 4 * MiB
HOUR, DAY = 3600 * 10**9, 86400 * 10**9


def _faketime(clock: Path) -> dict[str, str]:
    """The environment that runs a process on the clock in file ``clock`` (e.g. ``-1h``)."""
    return {
        "LD_PRELOAD": FAKETIME_LIB,
        "FAKETIME_TIMESTAMP_FILE": str(clock),
        "FAKETIME_NO_CACHE": "1",  # read the file at every call: the test moves the clock
        "FAKETIME_DONT_FAKE_MONOTONIC": "1",  # nor the boot-time clock: a stepped wall clock does not move it
    }


def test_clock_steps_and_a_stopped_daemon(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    requires("libfaketime")
    image, clock = tmp_path / "vol.img", tmp_path / "faketime"
    image.write_bytes(bytes(SIZE))
    clock.write_text("+0\n")
    for name, value in _faketime(clock).items():
        monkeypatch.setenv(name, value)
    daemon = Protected(image, "ck", tmp_path / "states" / "ck")
    for name in ("LD_PRELOAD", "FAKETIME_TIMESTAMP_FILE"):
        monkeypatch.delenv(name)  # only the daemon's clock moves
    model, rng, writes = bytearray(SIZE), random.Random(5), 0
    client = RawClient(daemon.state / "nbd.sock", "ck")

    def write_some(n: int) -> None:
        nonlocal writes
        for _ in range(n):
            offset, data = rng.randrange(SIZE // 4096) * 4096, rng.randbytes(4096)
            client.request(p.CMD_WRITE, offset, len(data), payload=data)
            assert client.simple_reply() == (0, b"")
            model[offset : offset + 4096] = data
            writes += 1

    try:
        write_some(20)
        clock.write_text("-1h\n")
        write_some(20)
        clock.write_text("+1d\n")
        write_some(20)
        os.kill(daemon.proc.pid, signal.SIGSTOP)  # longer than the group commit and retry timers
        client.request(p.CMD_WRITE, 0, 4096, payload=b"s" * 4096)  # waits for the stopped daemon
        time.sleep(3)
        os.kill(daemon.proc.pid, signal.SIGCONT)
        assert client.simple_reply() == (0, b"")
        model[0:4096], writes = b"s" * 4096, writes + 1
        write_some(20)
        client.request(p.CMD_FLUSH, 0, 0)
        assert client.simple_reply() == (0, b"")
    finally:
        client.close()
        assert daemon.stop() == 0, daemon.output()
    assert image.read_bytes() == model

    journal = Journal.open(daemon.state / "journal", SIZE)
    try:
        records = list(journal.records())
    finally:
        journal.close()
    times = [r.time_ns for r in records]
    assert times == sorted(times) and len(set(times)) == len(times)  # never back, never equal
    replayed = bytearray(SIZE)
    for r in records:
        if r.kind == WRITE:
            replayed[r.offset : r.offset + r.length] = r.data
    assert sum(r.kind == WRITE for r in records) == writes and replayed == model  # no write lost
    steps = [r.mark["step_ns"] for r in records if r.kind == MARK and r.mark.get("kind") == "clock"]
    assert len(steps) == 2, steps
    assert abs(steps[0] + HOUR) < 5 * 10**9 and abs(steps[1] - (DAY + HOUR)) < 5 * 10**9  # -1 h, then to +1 d


def test_instants_across_clock_steps_restore_exactly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With the journal shipped: ``VOLUME@TIME`` at the recorded time of writes before, inside and
    after the stretch where the clock was behind restores exactly the volume after that write, and
    ``umbra timeline`` lists the clock steps."""
    requires("libfaketime")
    monkeypatch.setenv("UMBRA_STATE_DIR", str(tmp_path / "states"))
    monkeypatch.setenv("UMBRA_PASSWORD", "secret")
    repo_dir = tmp_path / "repo"
    repo = Repository.init(LocalBackend(repo_dir), "secret", block_size=16384)
    image, clock = tmp_path / "data.img", tmp_path / "faketime"
    initial = random.Random(6).randbytes(SIZE)
    image.write_bytes(initial)
    clock.write_text("+0\n")
    for name, value in _faketime(clock).items():
        monkeypatch.setenv(name, value)
    daemon = Protected(image, "data", tmp_path / "states" / "data", "--repo", str(repo_dir))
    for name in ("LD_PRELOAD", "FAKETIME_TIMESTAMP_FILE"):
        monkeypatch.delenv(name)
    try:
        opts = backup_set.SetBackupOptions(["data"], ["data"], "full", set_options=SetOptions())
        backup_set.run(repo, opts, [])
        client, rng = RawClient(daemon.state / "nbd.sock", "data"), random.Random(7)
        for phase in ("+0", "-1h", "+1d"):
            clock.write_text(phase + "\n")
            for _ in range(8):
                offset, data = rng.randrange(SIZE // 4096) * 4096, rng.randbytes(4096)
                client.request(p.CMD_WRITE, offset, len(data), payload=data)
                assert client.simple_reply() == (0, b"")
        client.request(p.CMD_FLUSH, 0, 0)
        assert client.simple_reply() == (0, b"")
        client.close()
        wait_shipped(daemon)
    finally:
        assert daemon.stop() == 0, daemon.output()

    journal = Journal.open(daemon.state / "journal", SIZE)
    try:
        records = list(journal.records())
    finally:
        journal.close()
    model, states = bytearray(initial), []
    for r in records:
        if r.kind == WRITE:
            model[r.offset : r.offset + r.length] = r.data
            states.append((r.time_ns, bytes(model)))
    assert len(states) == 24 and image.read_bytes() == states[-1][1]
    for k in (7, 8, 12, 15, 16, 23):  # before the step back, inside the compressed stretch, after
        when, expected = states[k]
        out = tmp_path / f"r{k}.img"
        proc = umbra(repo_dir, "restore", f"data@{iso_ns(when)}", str(out))
        assert proc.returncode == 0, proc.stderr
        assert out.read_bytes() == expected, f"write {k}"
    events = json.loads(umbra(repo_dir, "timeline", "data", "--json").stdout)["events"]
    steps = [e for e in events if e["kind"] == "clock"]
    assert [e["name"] for e in steps] == ["the wall clock stepped -1 h", "the wall clock stepped +1 d 1 h"]
    assert "the wall clock stepped -1 h" in umbra(repo_dir, "timeline", "data").stdout
