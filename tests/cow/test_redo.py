"""Crash redo: the journal's records after the volume's checkpoint are replayed onto the volume, so
the volume holds exactly what the journal says (a write journaled but never written, as after a
kill -9 between the two, comes back); never across a gap."""

from __future__ import annotations

import json
import random
import threading
import time
from pathlib import Path

import pytest

from tests.cow.helpers import make_volume
from umbra.cow import journal as journal_module
from umbra.cow.journal import WRITE, ZERO, Journal
from umbra.cow.redo import replay_onto
from umbra.volume.backing import open_backing

SIZE = 256 * 1024


def _replayed(initial: bytes, journal: Journal) -> bytes:
    state = bytearray(initial)
    for r in journal.records():
        if r.kind == WRITE:
            state[r.offset : r.offset + r.length] = r.data
        elif r.kind == ZERO:
            state[r.offset : r.offset + r.length] = bytes(r.length)
    return bytes(state)


def _crashed_volume(tmp_path: Path, seed: int) -> tuple[Path, bytes, int]:
    """Writes through the engine with flushes, then records journaled whose volume writes never
    happened; returns the image, its initial bytes and the checkpoint the last flush saved."""
    rng = random.Random(seed)
    volume = make_volume(tmp_path, SIZE)
    image = tmp_path / "vol.img"
    initial = image.read_bytes()
    volume.journal = journal = Journal.open(tmp_path / "j", SIZE, resume_free=0)
    for i in range(60):
        offset = rng.randrange(SIZE - 9000)
        if i % 9 == 0:
            volume.zero(offset, 5000)
        else:
            volume.write(offset, rng.randbytes(rng.choice([512, 4096, 9000])))
        if i == 40:
            volume.flush()
    checkpoint = journal.load_checkpoint()
    for _ in range(5):  # the daemon died after journaling these and before writing the volume
        offset = rng.randrange(SIZE - 4096)
        journal.wait_written(journal.append_write(offset, rng.randbytes(4096)))
    journal.commit()
    journal.close()
    volume.backing.close()  # the dead daemon's hold on the image
    return image, initial, checkpoint


def test_replay_brings_the_volume_to_the_journals_state(tmp_path: Path) -> None:
    image, initial, checkpoint = _crashed_volume(tmp_path, seed=1)
    assert checkpoint > 40  # the flush saved the records through write 41 as on the volume
    journal = Journal.open(tmp_path / "j", SIZE)
    expected = _replayed(initial, journal)
    assert image.read_bytes() != expected  # the five lost volume writes

    backing = open_backing(str(image))
    try:
        result = replay_onto(journal, backing)
    finally:
        backing.close()
    assert result.skipped is None and result.from_seq == checkpoint
    assert result.records == journal.last_seq - checkpoint  # only what follows the checkpoint
    assert image.read_bytes() == expected
    assert journal.load_checkpoint() == journal.last_seq
    journal.close()


def test_no_replay_across_a_gap(tmp_path: Path) -> None:
    """Writes made during a gap are on the volume only: replaying older journaled writes over them
    would undo them, so nothing is replayed."""
    image, _initial, _ = _crashed_volume(tmp_path, seed=2)
    journal = Journal.open(tmp_path / "j", SIZE, resume_free=0)
    journal.mark_gap("written behind the journal's back")  # a gap mark after the checkpoint
    before = image.read_bytes()
    backing = open_backing(str(image))
    try:
        result = replay_onto(journal, backing)
    finally:
        backing.close()
    assert result.skipped == "a gap follows the checkpoint" and result.records == 0
    assert image.read_bytes() == before
    journal.close()


def test_the_checkpoint_moves_while_writes_stay_in_flight(tmp_path: Path) -> None:
    """The volume's checkpoint is the low watermark of the writes in flight, so under a load that
    never pauses (here: always one slow write in flight) it still moves."""
    volume = make_volume(tmp_path, SIZE)
    volume.journal = journal = Journal.open(tmp_path / "j", SIZE, resume_free=0)
    gates = {8192: (threading.Event(), threading.Event()), 16384: (threading.Event(), threading.Event())}
    real_pwrite = volume.backing.pwrite

    def pwrite(data: bytes | memoryview, offset: int) -> None:
        if offset in gates:
            started, release = gates[offset]
            started.set()
            release.wait(10)
        real_pwrite(data, offset)

    def slow_write(offset: int) -> tuple[threading.Thread, int]:
        thread = threading.Thread(target=volume.write, args=(offset, b"s" * 4096))
        thread.start()
        assert gates[offset][0].wait(10)
        return thread, journal.last_seq

    volume.backing.pwrite = pwrite  # type: ignore[method-assign]
    first, first_seq = slow_write(8192)
    for k in range(5):  # later writes finish while the slow one is still in flight
        volume.write(65536 + k * 4096, b"b" * 4096)
    volume.flush()
    assert journal.load_checkpoint() == first_seq - 1
    second, second_seq = slow_write(16384)  # in flight before the first one ends: never quiet
    gates[8192][1].set()
    first.join(10)
    volume.flush()
    assert journal.load_checkpoint() == second_seq - 1
    gates[16384][1].set()
    second.join(10)
    volume.flush()
    assert journal.load_checkpoint() == journal.last_seq
    journal.close()


def test_a_killed_daemon_whose_clients_never_flushed_replays_only_the_tail(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without a flush there is no durable checkpoint, but the commit thread saves the applied
    one: after a kill (same boot) only what follows it is replayed; after a machine restart (a
    new boot id) the applied checkpoint does not count and everything kept is replayed."""
    monkeypatch.setattr(journal_module, "CHECKPOINT_EVERY", 0.0)
    rng = random.Random(4)
    volume = make_volume(tmp_path, SIZE)
    image = tmp_path / "vol.img"
    initial = image.read_bytes()
    volume.journal = journal = Journal.open(tmp_path / "j", SIZE, resume_free=0, commit_interval=0.01)
    for _ in range(30):
        volume.write(rng.randrange(SIZE - 4096), rng.randbytes(4096))
    applied = journal.last_seq
    deadline = time.monotonic() + 10
    while journal.load_checkpoint() < applied and time.monotonic() < deadline:
        time.sleep(0.01)
    assert journal.load_checkpoint() == applied  # saved by the commit thread, no flush
    for _ in range(3):  # journaled, never written to the volume: the kill came in between
        journal.wait_written(journal.append_write(rng.randrange(SIZE - 4096), rng.randbytes(4096)))
    journal.commit()
    journal.close()
    volume.backing.close()

    journal = Journal.open(tmp_path / "j", SIZE)
    expected = _replayed(initial, journal)
    backing = open_backing(str(image))
    try:
        result = replay_onto(journal, backing)
    finally:
        backing.close()
    assert (result.from_seq, result.records) == (applied, 3)
    assert image.read_bytes() == expected
    journal.close()

    journal = Journal.open(tmp_path / "j", SIZE)
    (tmp_path / "j" / "checkpoint").write_bytes(
        json.dumps({"journal": journal.id, "seq": 0, "applied": applied, "boot_id": "an-earlier-boot"}).encode()
    )
    assert journal.load_checkpoint() == 0  # the page cache it counted on is gone
    journal.close()
