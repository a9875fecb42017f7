"""CDP journal: order, timestamps, group commit, torn tails and damage in the middle (RELIABILITY C1, C2)."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest

from umbra.cow.journal import ALIGN, DIGEST_V2, DIRECT_MIN, MARK, RECORD_HEADER, SEGMENT_HEADER, WRITE, ZERO, Journal
from umbra.errors import JournalCorrupt

SIZE = 1 << 20


def _fill(directory: Path, n: int, **options) -> list[tuple[int, bytes]]:
    journal = Journal.open(directory, SIZE, **options)
    rng = random.Random(n)
    written = []
    for i in range(n):
        data = rng.randbytes(rng.randint(1, 3000))
        offset = rng.randrange(0, SIZE - len(data))
        journal.append_write(offset, data)
        written.append((offset, data))
        if i % 7 == 0:
            journal.append_zero(offset, 512)
    journal.close()
    return written


def _writes(journal: Journal) -> list[tuple[int, bytes]]:
    return [(r.offset, r.data) for r in journal.records() if r.kind == WRITE]


def test_records_come_back_in_order_with_increasing_times(tmp_path: Path) -> None:
    written = _fill(tmp_path / "j", 300, segment_bytes=64 * 1024)
    journal = Journal.open(tmp_path / "j", SIZE)
    records = list(journal.records())
    assert len({r.path for r in journal._segments}) > 3  # several segments
    assert _writes(journal) == written
    assert [r.seq for r in records] == list(range(1, len(records) + 1))
    times = [r.time_ns for r in records]
    assert times == sorted(times) and len(set(times)) == len(times)
    assert {r.kind for r in records} == {WRITE, ZERO}
    t = journal.append_mark("snapshot", "s1")
    assert t > times[-1]
    last = list(journal.records())[-1]
    assert last.kind == MARK and last.mark == {"kind": "snapshot", "name": "s1"}
    stats = journal.stats()
    assert stats.records == len(records) + 1 and stats.write_bytes == sum(len(d) for _, d in written)
    journal.close()


def test_torn_tail_is_cut_to_the_longest_valid_prefix(tmp_path: Path) -> None:
    _fill(tmp_path / "j", 50)
    (seg,) = sorted((tmp_path / "j").glob("seg-*"))
    full = seg.read_bytes()
    journal = Journal.open(tmp_path / "j", SIZE)
    records = [(r.seq, r.offset, r.data) for r in journal.records()]
    journal.close()
    ends, pos = [], SEGMENT_HEADER.size + 32
    for _seq, _off, data in records:
        pos += RECORD_HEADER.size + DIGEST_V2 + len(data)
        ends.append(pos)
    rng = random.Random(1)
    for cut in [*rng.sample(range(ends[0] - 10, len(full)), 40), ends[10], ends[10] + 1, len(full) - 1]:
        for p in (tmp_path / "j").glob("seg-*"):
            p.unlink()
        seg.write_bytes(full[:cut])
        journal = Journal.open(tmp_path / "j", SIZE)
        keep = sum(1 for e in ends if e <= cut)  # the longest valid prefix, exactly
        assert [(r.seq, r.offset, r.data) for r in journal.records()] == records[:keep]
        assert journal.stats().recovered_tail_bytes == cut - (ends[keep - 1] if keep else cut)
        journal.append_write(0, b"after")  # and the journal goes on from there
        assert list(journal.records())[-1].seq == keep + 1
        journal.close()


def test_damage_in_the_middle_is_reported_not_truncated(tmp_path: Path) -> None:
    _fill(tmp_path / "j", 50)
    (seg,) = sorted((tmp_path / "j").glob("seg-*"))
    data = bytearray(seg.read_bytes())
    data[len(data) // 2] ^= 0x40
    seg.write_bytes(bytes(data))
    with pytest.raises(JournalCorrupt, match="followed by valid records"):
        Journal.open(tmp_path / "j", SIZE)
    assert seg.read_bytes() == bytes(data)  # nothing was cut


def test_damage_in_a_sealed_segment_is_reported(tmp_path: Path) -> None:
    _fill(tmp_path / "j", 200, segment_bytes=32 * 1024)
    first = sorted((tmp_path / "j").glob("seg-*"))[0]
    data = bytearray(first.read_bytes())
    data[-3] ^= 1  # last record of a sealed segment
    first.write_bytes(bytes(data))
    with pytest.raises(JournalCorrupt, match="sealed segment"):
        Journal.open(tmp_path / "j", SIZE)


def test_missing_segment_is_reported(tmp_path: Path) -> None:
    _fill(tmp_path / "j", 200, segment_bytes=32 * 1024)
    sorted((tmp_path / "j").glob("seg-*"))[1].unlink()
    with pytest.raises(JournalCorrupt, match="out of sequence"):
        Journal.open(tmp_path / "j", SIZE)


def test_sync_mode_makes_each_record_durable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    real = os.fdatasync
    monkeypatch.setattr(os, "fdatasync", lambda fd: (calls.append(fd), real(fd)))
    journal = Journal.open(tmp_path / "j", SIZE, sync=True)
    before = len(calls)
    for i in range(5):
        journal.append_write(i * 10, b"x")
    assert len(calls) - before == 5
    journal.close()


def test_size_limit_drops_the_oldest_segments(tmp_path: Path) -> None:
    journal = Journal.open(tmp_path / "j", SIZE, segment_bytes=16 * 1024, max_bytes=64 * 1024)
    for i in range(200):
        journal.append_write(i, os.urandom(1000))
    stats = journal.stats()
    assert stats.bytes <= 64 * 1024 + 16 * 1024
    on_disk = sum(p.stat().st_size for p in (tmp_path / "j").glob("seg-*"))
    assert 0 <= on_disk - stats.bytes < ALIGN  # the open segment ends with the padding of direct appends
    seqs = [r.seq for r in journal.records(with_data=False)]
    assert seqs == list(range(seqs[0], 201)) and seqs[0] > 1
    assert stats.first_ns == next(journal.records()).time_ns
    journal.close()


def test_id_names_one_sequence_space_and_unshipped_segments_are_kept(tmp_path: Path) -> None:
    journal = Journal.open(tmp_path / "j", SIZE, segment_bytes=16 * 1024, max_bytes=48 * 1024)
    first_id = journal.id
    journal.keep_after = 10  # records after 10 are not shipped yet
    for i in range(200):
        journal.append_write(i, os.urandom(1000))
    assert next(r.seq for r in journal.records(with_data=False)) <= 11  # nothing unshipped was dropped
    assert journal.last_seq == 200
    journal.keep_after = 150
    journal.enforce_limit()
    seqs = [r.seq for r in journal.records(with_data=False)]
    assert 11 < seqs[0] <= 151 and seqs[-1] == 200
    assert [r.seq for r in journal.records(with_data=False, after_seq=190)] == list(range(191, 201))
    journal.close()
    journal = Journal.open(tmp_path / "j", SIZE)
    assert journal.id == first_id  # same sequence space after a restart
    journal.close()
    for p in (tmp_path / "j").glob("seg-*"):
        p.unlink()
    journal = Journal.open(tmp_path / "j", SIZE)
    assert journal.id != first_id  # starting again from sequence 1: a new id
    journal.close()


@pytest.mark.parametrize("direct", [False, True])
def test_concurrent_overlapping_writes_reach_the_volume_in_journal_order(tmp_path: Path, direct: bool) -> None:
    """Replaying the journal over the initial volume gives the volume: overlapping writes in
    flight at once are applied in the order they were journaled (what VOLUME@TIME relies on),
    also when direct appends are written by the journal's writer thread."""
    import threading
    import time

    from tests.cow.helpers import make_volume

    size = 256 * 1024
    volume = make_volume(tmp_path, size)
    volume.journal = Journal.open(tmp_path / "j", size, direct=direct, segment_bytes=256 * 1024)
    pwrite = volume.backing.pwrite

    def slow_pwrite(data, offset):  # widen the window between journaling and writing
        time.sleep(random.random() / 1000)
        pwrite(data, offset)

    volume.backing.pwrite = slow_pwrite

    def writer(seed: int) -> None:
        rng = random.Random(seed)
        for _ in range(300):
            offset = rng.randrange(0, size - 20000) // 512 * 512  # few distinct places: many overlaps
            volume.write(offset % 8192, bytes([seed]) * rng.choice([4096, 16384, 20000]))

    threads = [threading.Thread(target=writer, args=(s,)) for s in range(1, 5)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    volume.flush()
    replay = bytearray(size)
    for r in volume.journal.records():
        if r.kind == WRITE:
            replay[r.offset : r.offset + r.length] = r.data
    assert bytes(replay) == (tmp_path / "vol.img").read_bytes()
    volume.journal.close()


@pytest.mark.parametrize("direct", [True, False])
def test_a_journal_left_open_keeps_every_committed_record(tmp_path: Path, direct: bool) -> None:
    """As after kill -9: the open segment ends in the zero padding of O_DIRECT appends (or not,
    buffered); reopening keeps every committed record and cuts the rest."""
    journal = Journal.open(tmp_path / "j", SIZE, direct=direct)
    assert journal.direct is direct
    written = [os.urandom(random.Random(i).randint(1, 9000)) for i in range(100)]
    for i, data in enumerate(written):
        journal.append_write(i, data)
    journal.commit()
    copy = tmp_path / "copy"
    copy.mkdir()
    for p in (tmp_path / "j").iterdir():
        (copy / p.name).write_bytes(p.read_bytes())  # the files as the dead process left them
    journal.close()
    reopened = Journal.open(copy, SIZE)
    assert [r.data for r in reopened.records() if r.kind == WRITE] == written
    assert reopened.stats().recovered_tail_bytes < ALIGN  # at most the padding
    reopened.append_write(0, b"goes on")
    reopened.close()


def test_direct_appends_from_many_threads(tmp_path: Path) -> None:
    """Direct appends queue records that a writer thread writes in batches: every record is in the
    file once ``wait_written`` returns, segment switches included, and all of them survive a reopen."""
    import threading

    journal = Journal.open(tmp_path / "j", SIZE, direct=True, segment_bytes=2_000_000)
    assert journal.direct
    done: dict[int, bytes] = {}
    lock = threading.Lock()

    def appender(seed: int) -> None:
        rng = random.Random(seed)
        for k in range(150):  # small records (page cache, at once) and large ones (O_DIRECT batches)
            data = rng.randbytes(rng.randint(1, 20000) if k % 10 else rng.randint(DIRECT_MIN, 2 * DIRECT_MIN))
            ticket = journal.append_write(seed, data)
            journal.wait_written(ticket)
            with lock:
                done[ticket] = data

    threads = [threading.Thread(target=appender, args=(s,)) for s in range(6)]
    for t in threads:
        t.start()
    # a reader following the journal meanwhile only ever sees whole records, in sequence order
    seen = [r.seq for r in journal.records(with_data=False)]
    assert seen == list(range(1, len(seen) + 1))
    for t in threads:
        t.join()
    last = max(done)
    journal.wait_written(last)
    on_file = list(journal.records())
    assert [r.seq for r in on_file] == list(range(1, 901)), "written before wait_written returned"
    assert len(list((tmp_path / "j").glob("seg-*"))) > 5, "segments switched under load"
    journal.close()
    reopened = Journal.open(tmp_path / "j", SIZE)
    assert sorted(r.data for r in reopened.records()) == sorted(done.values())
    reopened.close()


# --- gaps: a journal that cannot be written never fails the volume's writes --------------------


def _fill_until_gap(journal: Journal, rng: random.Random) -> int:
    """Append writes (small ones through the page cache, large ones as O_DIRECT batches) until the
    journal's filesystem is full; every append returns.  Returns how many were made."""
    n = 0
    while journal.gap is None:
        data = rng.randbytes(rng.choice([3000, 60000, DIRECT_MIN + 5000]))
        journal.wait_written(journal.append_write(rng.randrange(SIZE - len(data)), data))
        n += 1
        assert n < 5000, "the filesystem never filled"
    return n


def _contiguous(journal: Journal) -> list:
    records = list(journal.records())
    assert [r.seq for r in records] == list(range(1, len(records) + 1))
    return records


@pytest.mark.loopdev
@pytest.mark.parametrize("fstype", ["ext4", "tmpfs"])
def test_a_full_filesystem_makes_a_recorded_gap_not_failed_writes(
    tmp_path: Path, fstype: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tests.loopdev import small_filesystem
    from umbra.cow import journal as journal_mod

    monkeypatch.setattr(journal_mod, "RETRY_FIRST", 0.0)
    with small_filesystem(tmp_path / "fs", 8, fstype) as fs:
        filler = fs / "filler"
        filler.write_bytes(os.urandom(2 << 20))
        journal = Journal.open(fs / "j", SIZE, direct=True, segment_bytes=2 << 20, resume_free=1 << 20)
        assert journal.direct or fstype == "tmpfs"  # older kernels' tmpfs has no O_DIRECT
        rng = random.Random(7)
        _fill_until_gap(journal, rng)
        gap = journal.gap
        assert gap is not None and "No space left" in gap.reason
        kept = _contiguous(journal)  # whole records stay, the torn rest was cut
        assert gap.since_ns == kept[-1].time_ns + 1
        for _ in range(20):  # writes during the gap return at once and record nothing
            journal.wait_written(journal.append_write(0, rng.randbytes(70000)))
        journal.commit()
        assert _contiguous(journal) == kept
        assert journal.gap is gap
        assert json.loads((fs / "j" / "gap").read_bytes().rstrip(b"\0"))["since_ns"] == gap.since_ns

        filler.unlink()  # room again: the next append first records the gap, then goes on
        journal.wait_written(journal.append_write(5, b"after"))
        assert journal.gap is None and journal.gaps_recorded == 1
        records = _contiguous(journal)
        assert records[: len(kept)] == kept
        mark, after = records[len(kept) :]
        assert mark.kind == MARK and mark.mark["kind"] == "gap" and mark.mark["since_ns"] == gap.since_ns
        assert "No space left" in mark.mark["reason"]
        assert (after.kind, after.offset, after.data) == (WRITE, 5, b"after")
        assert (fs / "j" / "gap").read_bytes() == bytes(4096)
        journal.close()
        reopened = Journal.open(fs / "j", SIZE)  # every segment intact
        assert [(r.seq, r.data) for r in reopened.records()] == [(r.seq, r.data) for r in records]
        reopened.close()


def test_a_failed_batch_releases_every_waiter_and_keeps_the_whole_records(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """EIO on an O_DIRECT batch that many request threads wait for: they all return (their writes
    go on), the records already whole in the file stay, and the journal resumes with a gap mark."""
    import threading

    from umbra.cow import journal as journal_mod

    monkeypatch.setattr(journal_mod, "RETRY_FIRST", 0.0)
    journal = Journal.open(tmp_path / "j", SIZE, direct=True, resume_free=0)
    assert journal.direct
    real_pwritev, failures, batches = os.pwritev, [], []

    def failing_pwritev(fd: int, buffers, offset: int) -> int:
        size = sum(len(b) for b in buffers)
        if fd == journal._fd and size > DIRECT_MIN * 3:
            batches.append(offset)
        if fd == journal._fd and len(failures) < 1 and len(batches) == 2:  # a batch with records before it
            failures.append(offset)
            os.pwrite(journal._buffered_fd, bytes(size // 2), offset)  # half of it reached the disk (zeros)
            raise OSError(5, "Input/output error")
        return real_pwritev(fd, buffers, offset)

    monkeypatch.setattr(journal_mod.os, "pwritev", failing_pwritev)
    done = []

    def appender(seed: int) -> None:
        rng = random.Random(seed)
        for _ in range(40):
            journal.wait_written(journal.append_write(seed, rng.randbytes(DIRECT_MIN)))
            done.append(seed)

    threads = [threading.Thread(target=appender, args=(s,)) for s in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(done) == 240, "every append returned"
    assert failures, "a batch failed"
    journal.commit()
    records = _contiguous(journal)
    gaps = [r for r in records if r.kind == MARK and r.mark["kind"] == "gap"]
    assert len(gaps) == 1 and journal.gaps_recorded == 1
    before = [r for r in records if r.seq < gaps[0].seq]
    assert before and gaps[0].mark["since_ns"] == before[-1].time_ns + 1
    assert len(records) - 1 < 240, "the failed batch's records are missing"
    journal.close()
    assert [r.seq for r in Journal.open(tmp_path / "j", SIZE).records()] == [r.seq for r in records]


def test_a_gap_outlives_a_restart(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Stopped while it could not write: the next start records the gap before anything else."""
    from umbra.cow import journal as journal_mod

    journal = Journal.open(tmp_path / "j", SIZE, resume_free=0)
    for i in range(10):
        journal.append_write(i, b"x" * 100)
    real_writev = os.writev

    def enospc(fd: int, parts) -> int:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(journal_mod.os, "writev", enospc)
    journal.append_write(0, b"lost")
    gap = journal.gap
    assert gap is not None
    journal.close()
    monkeypatch.setattr(journal_mod.os, "writev", real_writev)
    reopened = Journal.open(tmp_path / "j", SIZE, resume_free=0)
    assert reopened.gap is None
    reopened.append_write(1, b"next")
    *_, mark, last = _contiguous(reopened)
    assert mark.mark == {"kind": "gap", "name": "journal", "since_ns": gap.since_ns, "reason": gap.reason}
    assert last.data == b"next"
    reopened.close()


def test_mark_gap_records_writes_made_behind_the_journals_back(tmp_path: Path) -> None:
    journal = Journal.open(tmp_path / "j", SIZE, resume_free=0)
    journal.mark_gap("nothing to mark yet")  # an empty journal starts here: no gap
    assert journal.gaps_recorded == 0
    journal.append_write(0, b"a")
    journal.mark_gap("the source was modified while it was not protected")
    records = _contiguous(journal)
    assert records[-1].mark["reason"] == "the source was modified while it was not protected"
    assert records[-1].mark["since_ns"] == records[-2].time_ns + 1
    assert len({r.path for r in journal._segments}) == 2  # the gap starts a new segment
    journal.close()


@pytest.mark.loopdev
def test_min_free_drops_old_segments_then_pauses(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Below ``min_free`` the oldest segments go first (unshipped ones never); when that is not
    enough the journal pauses with a gap before the filesystem is full."""
    from tests.loopdev import small_filesystem

    with small_filesystem(tmp_path / "fs", 16, "tmpfs") as fs:
        journal = Journal.open(fs / "j", SIZE, segment_bytes=1 << 20, min_free=6 << 20, resume_free=0)
        rng = random.Random(3)
        for _ in range(300):  # ~18 MiB of records into 16 MiB, 6 of them kept free
            journal.append_write(0, rng.randbytes(60000))
        assert journal.gap is None, "old segments made room"
        first = next(iter(journal.records(with_data=False))).seq
        assert first > 1
        journal.keep_after = journal.last_seq - 10  # the newest records are not shipped yet
        (fs / "other").write_bytes(bytes(5 << 20))  # somebody else takes most of the free space
        for _ in range(200):
            journal.append_write(0, rng.randbytes(60000))
        assert journal.gap is not None and "--journal-min-free" in journal.gap.reason
        seqs = [r.seq for r in journal.records(with_data=False)]
        assert seqs[0] <= journal.keep_after + 1, "no unshipped record was dropped"
        journal.close()


def test_mark_gap_right_after_opening(tmp_path: Path) -> None:
    """As the daemon does at start (the open segment has no record yet)."""
    journal = Journal.open(tmp_path / "j", SIZE, resume_free=0)
    journal.append_write(0, b"a")
    journal.close()
    journal = Journal.open(tmp_path / "j", SIZE, resume_free=0)
    journal.mark_gap("the source was modified while it was not protected")
    assert journal.gap is None and journal.gaps_recorded == 1
    journal.append_write(1, b"b")
    journal.close()
    records = list(Journal.open(tmp_path / "j", SIZE).records())
    assert [(r.seq, r.kind) for r in records] == [(1, WRITE), (2, MARK), (3, WRITE)]


def test_cutting_damage_in_the_middle_keeps_it_aside_and_never_reuses_its_numbers(tmp_path: Path) -> None:
    """RELIABILITY C2 (b): damage followed by valid records is refused until the operator asks to
    cut it; then the records before it stay, the damaged file is kept aside, and a gap mark skips
    every sequence number the damaged part held (they may have been shipped)."""
    _fill(tmp_path / "j", 200, segment_bytes=64 * 1024)
    segments = sorted((tmp_path / "j").glob("seg-*"))
    assert len(segments) >= 4
    victim = segments[1]
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0x40
    victim.write_bytes(bytes(data))
    with pytest.raises(JournalCorrupt, match="sealed segment"):
        Journal.open(tmp_path / "j", SIZE)
    journal = Journal.open(tmp_path / "j", SIZE, cut_damaged=True, resume_free=0)
    assert journal.gap is None, "the gap is recorded at once"
    (aside,) = (tmp_path / "j").glob("damaged-*")
    assert (aside / victim.name).read_bytes() == bytes(data)  # kept as it was
    assert sorted(p.name for p in aside.iterdir()) == sorted(p.name for p in segments[1:])
    records = list(journal.records())
    mark = records[-1]
    assert mark.kind == MARK and mark.mark["kind"] == "gap" and "damaged" in mark.mark["reason"]
    kept = records[:-1]
    assert [r.seq for r in kept] == list(range(1, len(kept) + 1))
    assert mark.mark["first_missing_seq"] == len(kept) + 1
    assert mark.seq == 200 + 200 // 7 + 1 + 1  # after every record the moved files held
    journal.append_write(0, b"after")
    journal.close()
    reopened = Journal.open(tmp_path / "j", SIZE)  # the jump is legal now: no option needed
    assert [r.seq for r in reopened.records()][-2:] == [mark.seq, mark.seq + 1]
    reopened.close()


def test_dropped_segments_are_recycled_and_their_stale_records_never_read(tmp_path: Path) -> None:
    """With --journal-max, direct appends overwrite the files of dropped segments instead of
    extending new ones; the old records left in them never check (another salt): readers, a
    reopen after a kill -9 (RELIABILITY C2 (c)) and the size accounting see only the new ones."""
    journal = Journal.open(tmp_path / "j", SIZE, direct=True, segment_bytes=512 * 1024, max_bytes=2 << 20)
    assert journal.direct
    rng = random.Random(4)
    inodes = set()
    written = []
    for i in range(250):
        data = rng.randbytes(rng.choice([3000, 40000, DIRECT_MIN + 1000]))
        journal.wait_written(journal.append_write(i, data))
        written.append((i, data))
        inodes.add(journal._segments[-1].path.stat().st_ino)
    assert list((tmp_path / "j").glob("recycle-*")), "dropped segments were kept for reuse"
    assert len(inodes) < len({s.path for s in journal._segments}) + 10, "files were reused"
    journal.commit()
    on_file = [(r.offset, r.data) for r in journal.records()]
    assert on_file == written[-len(on_file) :]  # the newest records, none stale
    assert [r.seq for r in journal.records()] == list(range(250 - len(on_file) + 1, 251))
    copy = tmp_path / "copy"
    copy.mkdir()
    for p in (tmp_path / "j").iterdir():
        (copy / p.name).write_bytes(p.read_bytes())  # as a kill -9 leaves them: stale tail in the open one
    journal.close()
    reopened = Journal.open(copy, SIZE, direct=True, segment_bytes=512 * 1024, max_bytes=2 << 20)
    again = [(r.offset, r.data) for r in reopened.records()]
    assert again and again == on_file[-len(again) :]  # the newest (the limit may drop one more at open)
    assert reopened.last_seq == 250
    reopened.append_write(0, b"goes on")
    reopened.close()


def test_large_page_aligned_writes_go_to_disk_from_their_own_buffer(tmp_path: Path) -> None:
    """Version 2 records: a large write in a page-aligned buffer (as the NBD server receives
    them) is laid out 4 KiB-aligned in the file and written with O_DIRECT from that buffer; small
    and unaligned ones between them are staged.  All read back, also after a kill -9."""
    import mmap as mmap_mod

    from umbra.cow.journal import FLAG_ALIGNED

    journal = Journal.open(tmp_path / "j", SIZE, direct=True)
    assert journal.direct
    rng = random.Random(12)
    written = []
    for i in range(60):
        n = rng.choice([100, 5000, DIRECT_MIN, DIRECT_MIN * 3, DIRECT_MIN + 7])
        if i % 3:
            buf = mmap_mod.mmap(-1, n)  # page-aligned
            buf[:] = rng.randbytes(n)
        else:
            buf = rng.randbytes(n)  # read-only bytes: staged
        journal.wait_written(journal.append_write(i, buf))
        written.append(bytes(buf))
    journal.commit()
    segment = journal._segments[-1].path
    raw = segment.read_bytes()
    aligned = 0
    pos = SEGMENT_HEADER.size + 32
    for record in journal.records():
        flags = RECORD_HEADER.unpack_from(raw, pos)[2]
        start = pos + RECORD_HEADER.size + DIGEST_V2
        if flags & FLAG_ALIGNED:
            aligned += 1
            start = -(-start // ALIGN) * ALIGN
            assert start % ALIGN == 0
        assert raw[start : start + record.length] == record.data
        pos = start + record.length
    assert aligned >= 10
    assert [r.data for r in journal.records()] == written
    copy = tmp_path / "copy"
    copy.mkdir()
    for p in (tmp_path / "j").iterdir():
        if p.is_file():
            (copy / p.name).write_bytes(p.read_bytes())
    journal.close()
    assert [r.data for r in Journal.open(copy, SIZE).records()] == written


def test_version_1_segments_are_still_read(tmp_path: Path) -> None:
    """Segments written before 2026-12 (BLAKE3 record checksums, data before the digest) stay
    readable; the journal goes on in version 2 segments after them."""
    import struct
    import time

    import blake3

    from umbra.cow.journal import RECORD_MAGIC, SEGMENT_MAGIC, _Codec

    directory = tmp_path / "j"
    directory.mkdir()
    salt = os.urandom(16)
    header = SEGMENT_HEADER.pack(SEGMENT_MAGIC, 1, 0, salt, SIZE, 1, time.time_ns())
    body = bytearray(header + blake3.blake3(header).digest())
    codec = _Codec.of(1, salt)
    old = [os.urandom(n) for n in (10, 4096, 70000)]
    for seq, data in enumerate(old, 1):
        rec = RECORD_HEADER.pack(RECORD_MAGIC, WRITE, 0, 0, seq, time.time_ns(), seq, len(data), len(data))
        body += rec + data + codec.digest(rec, data)
    body += struct.pack("<I", RECORD_MAGIC) + b"torn"  # a torn tail
    (directory / "seg-0000000000000001.ucj").write_bytes(bytes(body))
    journal = Journal.open(directory, SIZE, direct=True)
    journal.append_write(0, b"new")
    journal.close()
    reopened = Journal.open(directory, SIZE)
    assert [r.data for r in reopened.records()] == [*old, b"new"]
    assert [r.seq for r in reopened.records()] == [1, 2, 3, 4]
    assert [s.version for s in reopened._segments][:2] == [1, 2]  # and the one it opened
    reopened.close()


def test_a_batch_of_more_aligned_records_than_pwritev_takes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Past MAX_DIRECT_PARTS aligned records in one batch, the rest are staged (IOV_MAX)."""
    import mmap as mmap_mod

    from umbra.cow import journal as journal_mod

    monkeypatch.setattr(journal_mod, "MAX_DIRECT_PARTS", 2)
    journal = Journal.open(tmp_path / "j", SIZE, direct=True)
    rng = random.Random(5)
    buffers = []
    for _ in range(6):
        buf = mmap_mod.mmap(-1, DIRECT_MIN)
        buf[:] = rng.randbytes(DIRECT_MIN)
        buffers.append(buf)
    tickets = [journal.append_write(0, b) for b in buffers]  # queued together: one batch
    journal.wait_written(tickets[-1])
    assert [r.data for r in journal.records()] == [bytes(b) for b in buffers]
    journal.close()


def test_mark_gap_writes_what_is_queued_first(tmp_path: Path) -> None:
    journal = Journal.open(tmp_path / "j", SIZE, direct=True, resume_free=0)
    journal.wait_written(journal.append_write(0, b"a"))
    queued = [journal.append_write(1, os.urandom(DIRECT_MIN)) for _ in range(3)]  # not written yet
    journal.mark_gap("the source was modified while it was not protected")
    for ticket in queued:
        journal.wait_written(ticket)
    journal.close()
    records = list(Journal.open(tmp_path / "j", SIZE).records())
    assert [r.kind for r in records] == [WRITE, WRITE, WRITE, WRITE, MARK]
