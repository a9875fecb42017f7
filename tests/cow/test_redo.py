"""Crash redo: the journal's records after the volume's checkpoint are replayed onto the volume, so
the volume holds exactly what the journal says (a write journaled but never written, as after a
kill -9 between the two, comes back); never across a gap."""

from __future__ import annotations

import random
from pathlib import Path

from tests.cow.helpers import make_volume
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
