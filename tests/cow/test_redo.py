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
            volume.checkpoint()
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
    volume.checkpoint()
    assert journal.load_checkpoint() == first_seq - 1
    second, second_seq = slow_write(16384)  # in flight before the first one ends: never quiet
    gates[8192][1].set()
    first.join(10)
    volume.checkpoint()
    assert journal.load_checkpoint() == second_seq - 1
    gates[16384][1].set()
    second.join(10)
    volume.checkpoint()
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


def test_flushed_writes_survive_a_power_loss_through_the_journal_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A flush makes only the journal durable.  A power loss then drops the volume's writes since
    its last checkpoint (emulated: the image goes back to its bytes at the checkpoint, and the
    machine has a new boot id); the redo brings every flushed write back."""
    rng = random.Random(5)
    journal = Journal.open(tmp_path / "j", SIZE, resume_free=0)
    volume = make_volume(tmp_path, SIZE, journal=journal, checkpoint_interval=3600)
    image = tmp_path / "vol.img"
    initial = image.read_bytes()
    volume_flushes = []
    real_flush = volume.backing.flush
    volume.backing.flush = lambda: (volume_flushes.append(1), real_flush())[1]  # type: ignore[method-assign]
    for _ in range(20):
        volume.write(rng.randrange(SIZE - 4096), rng.randbytes(4096))
    volume.checkpoint()
    on_disk = image.read_bytes()  # what the device holds durably from here on
    for i in range(40):
        volume.write(rng.randrange(SIZE - 9000), rng.randbytes(rng.choice([512, 9000])), fua=i % 7 == 0)
    volume.flush()
    assert len(volume_flushes) == 1, "the flushes after the checkpoint synced only the journal"
    flushed = image.read_bytes()
    journal.close()
    volume.backing.close()

    image.write_bytes(on_disk)  # the power loss: the page cache never reached the device
    monkeypatch.setattr(journal_module, "boot_id", lambda: "the-next-boot")
    journal = Journal.open(tmp_path / "j", SIZE)
    assert _replayed(initial, journal) == flushed
    backing = open_backing(str(image))
    try:
        result = replay_onto(journal, backing)
    finally:
        backing.close()
    assert result.records == 40
    assert image.read_bytes() == flushed
    journal.close()


def test_checkpoints_in_the_background_by_bytes_and_by_time(tmp_path: Path) -> None:
    journal = Journal.open(tmp_path / "j", SIZE, resume_free=0)
    volume = make_volume(tmp_path, SIZE, journal=journal, checkpoint_interval=3600, checkpoint_bytes=64 * 1024)
    for k in range(16):
        volume.write(k * 4096, b"x" * 4096)
    deadline = time.monotonic() + 10
    while journal.checkpoint_seq < 16 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert journal.checkpoint_seq == 16 and volume.checkpoints == 1
    volume.checkpoint_bytes, volume.checkpoint_interval = 1 << 40, 0.2
    volume.checkpoint()  # (the interval starts now)
    volume.write(0, b"y")
    while journal.checkpoint_seq < 17 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert journal.checkpoint_seq == 17
    time.sleep(1.2)  # nothing written since: no more checkpoints
    assert volume.checkpoints == 3
    volume.stop()
    journal.close()


def test_segments_the_volume_may_still_need_are_kept_past_the_limit(tmp_path: Path) -> None:
    """``--journal-max`` drops old segments, but never records past the volume's durable
    checkpoint: a redo may need them.  After a checkpoint the limit holds again."""
    journal = Journal.open(tmp_path / "j", SIZE, resume_free=0, segment_bytes=64 * 1024, max_bytes=256 * 1024)
    volume = make_volume(tmp_path, SIZE, journal=journal, checkpoint_interval=3600)
    volume.checkpoint()
    rng = random.Random(6)
    for _ in range(200):  # ~800 KiB of records
        volume.write(rng.randrange(SIZE - 4096), rng.randbytes(4096))
    volume.flush()
    assert journal.stats().bytes > 512 * 1024
    assert next(iter(journal.records(with_data=False))).seq == 1  # everything since the checkpoint
    volume.checkpoint()
    volume.write(0, b"z" * 70000)  # the next segment switch drops what the checkpoint covers
    assert journal.stats().bytes <= 256 * 1024 + 70000 + 4096
    assert next(iter(journal.records(with_data=False))).seq > 1
    volume.stop()
    journal.close()


def test_a_gap_makes_the_volume_durable_before_any_unjournaled_write(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A redo never replays across a gap, so writes flushed through the journal alone must be
    durable in the volume before the gap begins; until a checkpoint passes the gap's mark,
    flushes sync the volume again."""
    monkeypatch.setattr(journal_module, "RETRY_FIRST", 0.0)
    journal = Journal.open(tmp_path / "j", SIZE, resume_free=0)
    volume = make_volume(tmp_path, SIZE, journal=journal, checkpoint_interval=3600)
    events: list[str] = []
    real_flush, real_pwrite = volume.backing.flush, volume.backing.pwrite
    volume.backing.flush = lambda: (events.append("volume flush"), real_flush())[1]  # type: ignore[method-assign]
    volume.backing.pwrite = lambda data, offset: (events.append(f"write {offset}"), real_pwrite(data, offset))[1]  # type: ignore[method-assign]
    volume.checkpoint()
    volume.write(4096, b"a" * 4096)
    volume.flush()
    assert events == ["volume flush", "write 4096"]  # the flush: the journal alone
    real_writev, failed = journal_module.os.writev, []

    def writev(fd: int, buffers: list[bytes]) -> int:
        if not failed:
            failed.append(fd)
            raise OSError(5, "Input/output error")
        return real_writev(fd, buffers)

    monkeypatch.setattr(journal_module.os, "writev", writev)
    volume.write(8192, b"b" * 4096)  # the journal fails: a gap, this write unjournaled
    assert failed and journal.gap is not None
    assert events[2:] == ["volume flush", "write 8192"], "the volume was durable before the gap's first write"
    assert journal.checkpoint_seq == 1 and not journal.covers_volume()
    volume.write(12288, b"c" * 4096)  # the journal writes again: first its gap mark
    assert journal.gap is None and not journal.covers_volume()
    volume.flush()  # a checkpoint past the mark
    assert events[-1] == "volume flush" and journal.covers_volume()
    events.clear()
    volume.write(0, b"d")
    volume.flush()
    assert events == ["write 0"]
    volume.stop()
    journal.close()
