"""Changed-block tracking against a full comparison (RELIABILITY G5): over 1,000 random write
batches, with writes racing snapshot creates and deletes, the tracked set always covers every
chunk whose content differs, and equals the chunks written when nothing races."""

from __future__ import annotations

import random
import threading
from pathlib import Path

from umbra.cow.tracking import ChangeTracker

from .helpers import make_volume

CHUNK = 512
NCHUNKS = 64
SIZE = CHUNK * NCHUNKS


def _chunks_differing(a: bytes, b: bytes) -> set[int]:
    return {c for c in range(NCHUNKS) if a[c * CHUNK : (c + 1) * CHUNK] != b[c * CHUNK : (c + 1) * CHUNK]}


def test_tracked_changes_cover_every_difference(tmp_path: Path) -> None:
    rng = random.Random(5)
    vol = make_volume(tmp_path, SIZE, CHUNK)
    prev = vol.create_snapshot("p0")
    prev_data = vol.read_snapshot("p0", 0, SIZE)
    prev_racing = False
    for batch in range(1, 1001):
        written: set[int] = set()
        racing = batch % 4 == 0
        stop = threading.Event()

        def racer(seed: int = batch, stop: threading.Event = stop) -> None:
            r = random.Random(seed)  # writes while the snapshot is created (and the old one deleted)
            while not stop.is_set():
                off = r.randrange(SIZE - 100)
                vol.write(off, r.randbytes(100))

        for _ in range(rng.randint(0, 12)):
            off = rng.randrange(SIZE - 1)
            length = rng.randint(1, min(3 * CHUNK, SIZE - off))
            if rng.random() < 0.2:
                vol.zero(off, length)
            else:
                vol.write(off, rng.randbytes(length))
            written |= set(range(off // CHUNK, (off + length - 1) // CHUNK + 1))
        thread = threading.Thread(target=racer) if racing else None
        if thread:
            thread.start()
        try:
            snap = vol.create_snapshot(f"p{batch}")
            if batch % 3 == 0:
                vol.create_snapshot(f"x{batch}")
                vol.delete_snapshot(f"x{batch}")
        finally:
            stop.set()
            if thread:
                thread.join()
        data = vol.read_snapshot(f"p{batch}", 0, SIZE)
        tracked = set(vol.changed_chunks(f"p{batch}", prev.generation))
        differing = _chunks_differing(prev_data, data)
        assert differing <= tracked, f"batch {batch}: untracked changes {sorted(differing - tracked)}"
        if not racing and not prev_racing:  # a racer's late writes belong to the next generation
            assert tracked == written
        vol.delete_snapshot(f"p{batch - 1}")
        prev, prev_data, prev_racing = snap, data, racing
    vol.close()


def test_tracking_state_round_trip_and_crash(tmp_path: Path) -> None:
    t = ChangeTracker(100)
    g1, _ = t.start_generation()
    t.mark(3, 9)
    g2, frozen = t.start_generation()
    assert list(frozen[g1]) == list(range(3, 9))
    t.mark(50, 51)
    t.save(tmp_path / "t.cbt")
    loaded = ChangeTracker.load(tmp_path / "t.cbt", tmp_path / "running", 100)
    assert loaded.invalidated is None
    assert {k: list(g.bitmap) for k, g in loaded.generations.items()} == {g1: [*range(3, 9), 50], g2: [50]}
    assert not (tmp_path / "t.cbt").exists()  # only a clean shutdown writes it again
    t.save(tmp_path / "t.cbt")
    (tmp_path / "running").write_text("123")
    crashed = ChangeTracker.load(tmp_path / "t.cbt", tmp_path / "running", 100)
    assert crashed.generations == {} and "did not shut down cleanly" in crashed.invalidated
    (tmp_path / "running").unlink()
    t.save(tmp_path / "t.cbt")
    raw = bytearray((tmp_path / "t.cbt").read_bytes())
    raw[20] ^= 1
    (tmp_path / "t.cbt").write_bytes(bytes(raw))
    damaged = ChangeTracker.load(tmp_path / "t.cbt", tmp_path / "running", 100)
    assert damaged.generations == {} and "not usable" in damaged.invalidated
    t.save(tmp_path / "t.cbt")
    resized = ChangeTracker.load(tmp_path / "t.cbt", tmp_path / "running", 101)
    assert "changed size" in resized.invalidated
