"""The copy-on-write engine against a model: every snapshot reads exactly the data of its instant."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from umbra.cow.bitmap import Bitmap
from umbra.errors import SnapshotFailed, UsageError, VolumeBusy
from umbra.volume.backing import open_backing

from .helpers import make_volume

CHUNK = 512
NCHUNKS = 24
SIZE = CHUNK * NCHUNKS - 100  # a short last chunk

_offsets = st.integers(0, SIZE - 1)
op_strategy = st.one_of(
    st.tuples(st.just("write"), _offsets, st.integers(1, 3 * CHUNK), st.integers(0, 255)),
    st.tuples(st.just("zero"), _offsets, st.integers(1, 3 * CHUNK), st.just(0)),
    st.tuples(st.just("create"), st.integers(0, 5), st.booleans(), st.integers(0, 2**NCHUNKS - 1)),
    st.tuples(st.just("delete"), st.integers(0, 5), st.just(0), st.just(0)),
    st.tuples(st.just("release"), st.integers(0, 5), _offsets, st.integers(1, 4 * CHUNK)),
    st.tuples(st.just("check"), st.integers(0, 5), st.just(0), st.just(0)),
)


def _model_snapshot(vol: bytearray, used_mask: int | None) -> bytearray:
    snap = bytearray(vol)
    if used_mask is not None:
        for c in range(NCHUNKS):
            if not used_mask >> c & 1:
                snap[c * CHUNK : (c + 1) * CHUNK] = bytes(len(snap[c * CHUNK : (c + 1) * CHUNK]))
    return snap


def _used_extents(mask: int) -> list[tuple[int, int]]:
    return [(c * CHUNK, min(SIZE, (c + 1) * CHUNK)) for c in range(NCHUNKS) if mask >> c & 1]


def test_snapshots_read_their_instant(tmp_path_factory: pytest.TempPathFactory) -> None:
    executed: list[int] = []

    @settings(max_examples=90, deadline=None, suppress_health_check=list(HealthCheck))
    @given(ops=st.lists(op_strategy, min_size=115, max_size=130), tight_store=st.booleans())
    def run(ops: list[tuple[str, int, int, int]], tight_store: bool) -> None:
        tmp = tmp_path_factory.mktemp("cow")
        # a tight store (12 copies) exercises failure; a loose one with 4 chunks in memory, spilling
        vol = make_volume(tmp, SIZE, CHUNK, memory_limit=4 * CHUNK, limit=(12 if tight_store else 10_000) * CHUNK)
        model = bytearray(SIZE)
        snaps: dict[str, bytearray] = {}
        try:
            for kind, a, b, c in ops:
                if kind == "write":
                    length = min(b, SIZE - a)
                    data = bytes((c + i) & 0xFF for i in range(length))
                    vol.write(a, data)
                    model[a : a + length] = data
                elif kind == "zero":
                    length = min(b, SIZE - a)
                    vol.zero(a, length)
                    model[a : a + length] = bytes(length)
                elif kind == "create":
                    name = f"s{a}"
                    if name in snaps:
                        with pytest.raises(UsageError):
                            vol.create_snapshot(name)
                        continue
                    mask = c if b else None
                    vol.create_snapshot(name, _used_extents(mask) if mask is not None else None)
                    snaps[name] = _model_snapshot(model, mask)
                elif kind == "delete":
                    name = f"s{a}"
                    if name in snaps:
                        vol.delete_snapshot(name)
                        del snaps[name]
                elif kind == "release":
                    name = f"s{a}"
                    if name in snaps and vol.snapshot(name).failed is None:
                        length = min(c, SIZE - b)
                        vol.release(name, b, length)
                        first = -(-b // CHUNK)
                        end = NCHUNKS if b + length == SIZE else (b + length) // CHUNK
                        for k in range(first, end):
                            snaps[name][k * CHUNK : (k + 1) * CHUNK] = bytes(
                                len(snaps[name][k * CHUNK : (k + 1) * CHUNK])
                            )
                else:
                    _check_snapshot(vol, snaps, f"s{a}", tight_store)
                assert vol.read(0, SIZE) == model  # writes never fail, whatever the store does
            for name in list(snaps):
                _check_snapshot(vol, snaps, name, tight_store)
        finally:
            vol.close()
            vol.backing.close()
        executed.append(len(ops))

    run()
    assert sum(executed) >= 10_000


def _check_snapshot(vol, snaps: dict[str, bytearray], name: str, tight_store: bool) -> None:
    if name not in snaps:
        return
    info = vol.snapshot(name)
    if info.failed is not None:
        assert tight_store, info.failed  # only a full store may fail a snapshot
        with pytest.raises(SnapshotFailed):
            vol.read_snapshot(name, 0, SIZE)
        return
    expected = snaps[name]
    assert vol.read_snapshot(name, 0, SIZE) == expected
    assert vol.read_snapshot(name, 700, 1500) == expected[700:2200]


def test_old_blocks_are_shared_between_snapshots(tmp_path: Path) -> None:
    vol = make_volume(tmp_path, 16 * CHUNK, CHUNK)
    vol.write(0, b"a" * 16 * CHUNK)
    vol.create_snapshot("one")
    vol.create_snapshot("two")
    vol.write(0, b"b" * 4 * CHUNK)
    assert vol.store.stats().copies == 4  # one copy for both snapshots
    assert vol.read_snapshot("one", 0, 4 * CHUNK) == vol.read_snapshot("two", 0, 4 * CHUNK) == b"a" * 4 * CHUNK
    vol.delete_snapshot("one")
    assert vol.store.stats().copies == 4
    vol.delete_snapshot("two")
    assert vol.store.stats().copies == 0


def test_difference_store_spills_to_a_file(tmp_path: Path) -> None:
    vol = make_volume(tmp_path, 64 * CHUNK, CHUNK, memory_limit=8 * CHUNK)
    original = os.urandom(64 * CHUNK)
    vol.write(0, original)
    vol.create_snapshot("s")
    vol.write(0, bytes(64 * CHUNK))
    stats = vol.store.stats()
    assert stats.memory_bytes == 8 * CHUNK and stats.spilled_bytes == 56 * CHUNK
    assert (tmp_path / "state" / "difference.spill").stat().st_size == 56 * CHUNK
    assert vol.read_snapshot("s", 0, 64 * CHUNK) == original
    vol.close()
    assert not (tmp_path / "state" / "difference.spill").exists()


def test_full_store_fails_the_snapshot_not_the_write(tmp_path: Path) -> None:
    vol = make_volume(tmp_path, 32 * CHUNK, CHUNK, limit=4 * CHUNK)
    vol.write(0, b"x" * 32 * CHUNK)
    vol.create_snapshot("s")
    vol.write(0, b"y" * 8 * CHUNK)  # needs 8 copies, only 4 fit
    assert vol.read(0, 8 * CHUNK) == b"y" * 8 * CHUNK
    info = vol.snapshot("s")
    assert info.failed is not None and "difference store full" in info.failed
    with pytest.raises(SnapshotFailed, match="difference store full"):
        vol.read_snapshot("s", 0, CHUNK)
    assert vol.store.stats().copies == 0  # its copies were given back
    vol.create_snapshot("t")  # and a new snapshot works
    vol.write(0, b"z" * CHUNK)
    assert vol.read_snapshot("t", 0, CHUNK) == b"y" * CHUNK


def test_only_used_chunks_are_protected(tmp_path: Path) -> None:
    vol = make_volume(tmp_path, 8 * CHUNK, CHUNK)
    vol.write(0, b"u" * 8 * CHUNK)
    vol.create_snapshot("s", used=[(CHUNK, 2 * CHUNK + 1)])  # chunks 1 and 2
    vol.write(0, b"w" * 8 * CHUNK)
    assert vol.store.stats().copies == 2
    assert vol.read_snapshot("s", 0, 4 * CHUNK) == bytes(CHUNK) + b"u" * 2 * CHUNK + bytes(CHUNK)
    assert list(vol.snapshot_allocation("s", 0, 4 * CHUNK)) == [
        (0, CHUNK, False),
        (CHUNK, 3 * CHUNK, True),
        (3 * CHUNK, 4 * CHUNK, False),
    ]


def test_release_after_read_shrinks_the_protection(tmp_path: Path) -> None:
    vol = make_volume(tmp_path, 8 * CHUNK, CHUNK)
    vol.write(0, b"a" * 8 * CHUNK)
    vol.create_snapshot("s")
    vol.write(0, b"b" * 2 * CHUNK)
    assert vol.snapshot("s").protected_chunks == 6
    assert vol.release("s", 0, 4 * CHUNK) == 4
    info = vol.snapshot("s")
    assert (info.protected_chunks, info.copied_chunks, vol.store.stats().copies) == (4, 0, 0)
    vol.write(0, b"c" * 4 * CHUNK)  # released chunks are no longer copied
    assert vol.store.stats().copies == 0


def test_tracking_generations(tmp_path: Path) -> None:
    vol = make_volume(tmp_path, 8 * CHUNK, CHUNK)
    a = vol.create_snapshot("a")
    vol.write(CHUNK + 10, b"1" * CHUNK)  # chunks 1, 2
    b = vol.create_snapshot("b")
    vol.write(5 * CHUNK, b"2")  # chunk 5
    vol.create_snapshot("c")
    assert list(vol.changed_chunks("b", a.generation)) == [1, 2]
    assert list(vol.changed_chunks("c", b.generation)) == [5]
    assert list(vol.changed_chunks("c", a.generation)) == [1, 2, 5]  # differential
    assert vol.changed_chunks("a", "unknown") is None


def test_snapshot_is_one_instant_under_concurrent_writes(tmp_path: Path) -> None:
    """Writers each keep two chunks equal; a snapshot never catches one without the other."""
    vol = make_volume(tmp_path, 64 * CHUNK, CHUNK)
    stop = threading.Event()

    def writer(k: int) -> None:
        n = 0
        while not stop.is_set():
            n += 1
            vol.write(k * 2 * CHUNK, bytes([n & 0xFF]) * 2 * CHUNK)

    threads = [threading.Thread(target=writer, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    try:
        for i in range(40):
            vol.create_snapshot(f"s{i}")
            data = vol.read_snapshot(f"s{i}", 0, 8 * 2 * CHUNK)
            for k in range(4):
                pair = data[k * 2 * CHUNK : (k + 1) * 2 * CHUNK]
                assert pair == bytes([pair[0]]) * len(pair)
            vol.delete_snapshot(f"s{i}")
    finally:
        stop.set()
        for t in threads:
            t.join()


def test_bitmap_ranges() -> None:
    bm = Bitmap(100)
    bm.set_range(3, 77)
    assert list(bm.runs()) == [(3, 77)] and bm.count() == 74
    bm.clear_range(10, 20)
    assert list(bm.runs()) == [(3, 10), (20, 77)]
    assert Bitmap(13, fill=True).count() == 13


def test_backing_is_held_exclusively(tmp_path: Path) -> None:
    vol = make_volume(tmp_path, 4 * CHUNK, CHUNK)
    with pytest.raises(VolumeBusy, match="another umbra process"):
        open_backing(str(tmp_path / "vol.img"))
    vol.backing.close()


def test_flush_marks_follow_each_flush_once_it_is_durable(tmp_path: Path) -> None:
    """Test-only ``flush_marks``: a ``flush`` mark after every flush, appended once the records
    before it are durable (the power-loss test models a disk cache with them)."""
    from umbra.cow.journal import MARK, WRITE, Journal

    journal = Journal.open(tmp_path / "journal", 8 * CHUNK, commit_interval=3600)
    vol = make_volume(tmp_path, 8 * CHUNK, CHUNK, journal=journal, checkpoint_interval=3600)
    vol.flush_marks = True
    vol.write(0, b"a" * CHUNK)
    vol.write(CHUNK, b"b" * CHUNK)
    vol.flush()
    assert journal.durable_seq == journal.last_seq - 1  # everything before the mark
    vol.write(0, b"c", fua=True)
    kinds = [(r.kind, r.mark.get("kind")) for r in journal.records(with_data=False)]
    assert kinds == [(WRITE, None), (WRITE, None), (MARK, "flush"), (WRITE, None), (MARK, "flush")]
    vol.flush_marks = False
    vol.flush()
    assert len(list(journal.records(with_data=False))) == 5
    vol.stop()
    journal.close()


def test_fua_and_sync_mode_make_the_journal_durable_and_checkpoints_the_volume(tmp_path: Path) -> None:
    """With a journal recording, a flush (FUA, every write with --sync) makes only the journal
    durable: a redo replays it onto the volume after a crash.  A checkpoint makes both durable,
    the journal first, and moves the point the redo starts from."""
    from umbra.cow.journal import Journal

    journal = Journal.open(tmp_path / "journal", 8 * CHUNK, commit_interval=3600)  # no background commits
    vol = make_volume(tmp_path, 8 * CHUNK, CHUNK, journal=journal, checkpoint_interval=3600)
    calls: list[str] = []
    real_flush, real_commit = vol.backing.flush, journal.commit
    vol.backing.flush = lambda: (calls.append("volume"), real_flush())[1]  # type: ignore[method-assign]
    journal.commit = lambda: (calls.append("journal"), real_commit())[1]  # type: ignore[method-assign]
    vol.write(0, b"a" * CHUNK)
    assert calls == []  # group commit: not yet
    vol.write(0, b"b" * CHUNK, fua=True)
    assert calls == ["journal"] and journal.durable_seq == journal.last_seq
    vol.sync = True
    vol.zero(0, CHUNK)
    vol.write(CHUNK, b"c")
    assert calls == ["journal"] * 3
    assert journal.checkpoint_seq == 0
    vol.checkpoint()
    assert calls == ["journal"] * 4 + ["volume"]
    assert journal.checkpoint_seq == journal.last_seq == 4
    vol.stop()
    journal.close()


def test_without_a_journal_a_flush_makes_the_volume_durable(tmp_path: Path) -> None:
    vol = make_volume(tmp_path, 8 * CHUNK, CHUNK)
    calls: list[str] = []
    real_flush = vol.backing.flush
    vol.backing.flush = lambda: (calls.append("volume"), real_flush())[1]  # type: ignore[method-assign]
    vol.write(0, b"a" * CHUNK, fua=True)
    vol.flush()
    assert calls == ["volume", "volume"]
