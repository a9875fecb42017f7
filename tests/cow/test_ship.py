"""Journal shipping and VOLUME@TIME against a model (RELIABILITY C3): random writes and zeros with
their timestamps, points taken at snapshot marks, batches shipped at random moments, prunes; the
state at random instants (exactly at a write, between writes, after the last) equals the model
byte for byte, through the block view and through restore."""

from __future__ import annotations

import random
from datetime import UTC, datetime
from pathlib import Path

import pytest

from tests.cow.helpers import make_volume
from umbra.cow.journal import Journal
from umbra.cow.ship import Shipper
from umbra.engine import backup, restore
from umbra.engine.compact import compact
from umbra.engine.diff import diff_states
from umbra.errors import PointNotFound, RepositoryIOError
from umbra.repo import cdp
from umbra.repo.check import check
from umbra.repo.prune import prune
from umbra.repo.repository import Repository
from umbra.repo.retention import Policy
from umbra.repo.view import open_state
from umbra.testing.faults import FaultyBackend

SIZE = 256 * 1024


def iso_ns(ns: int) -> str:
    return datetime.fromtimestamp(ns // 10**9, UTC).strftime("%Y-%m-%dT%H:%M:%S") + f".{ns % 10**9:09d}+00:00"


class Scenario:
    """A protected volume with a journal, its model, and a repository the journal ships to."""

    def __init__(self, tmp_path: Path, repo: Repository, seed: int) -> None:
        self.rng = random.Random(seed)
        self.repo = repo
        self.journal = Journal.open(tmp_path / "journal", SIZE, segment_bytes=32 * 1024)
        self.volume = make_volume(tmp_path, SIZE)
        self.volume.journal = self.journal
        self.image = tmp_path / "vol.img"
        self.model = bytearray(SIZE)
        self.history: list[tuple[int, bytes]] = []  # (time of the write, volume after it)
        self.shipper = Shipper(self.journal, repo, "v")
        self.points = 0
        self.first_point_ns = 2**63

    def write(self) -> None:
        rng = self.rng
        offset = rng.randrange(SIZE - 1)
        length = rng.choice([1, 512, 4096, 5000, 9000, 30000])
        length = min(length, SIZE - offset)
        if rng.random() < 0.15:
            self.volume.zero(offset, length)
            self.model[offset : offset + length] = bytes(length)
        else:
            data = rng.randbytes(length) if rng.random() < 0.8 else bytes([rng.randrange(256)]) * length
            self.volume.write(offset, data)
            self.model[offset : offset + length] = data
        self.history.append((self.journal._last_ns, bytes(self.model)))

    def take_point(self) -> None:
        """A snapshot mark, then a backup of exactly that state (no writes in between)."""
        self.points += 1
        info = self.volume.create_snapshot(f"s{self.points}")
        cdp_info = {"journal": self.journal.id, "seq": info.journal_seq, "time_ns": info.created_ns}
        kind = "full" if self.points == 1 else "incremental"
        opts = backup.BackupOptions(str(self.image), "v", kind, all_blocks=True, workers=2)
        opts.annotations = {"cdp": cdp_info}
        backup.run(self.repo, opts)
        self.volume.delete_snapshot(f"s{self.points}")
        self.history.append((info.created_ns, bytes(self.model)))
        self.first_point_ns = min(self.first_point_ns, info.created_ns)

    def expected(self, when_ns: int) -> bytes | None:
        """The model at ``when_ns``; None before the first point (nothing to start from)."""
        if when_ns < self.first_point_ns:
            return None
        state = None
        for t, volume in self.history:
            if t <= when_ns:
                state = volume
        return state


def run_scenario(tmp_path: Path, repo: Repository, seed: int, steps: int) -> Scenario:
    s = Scenario(tmp_path, repo, seed)
    for _ in range(5):
        s.write()
    s.take_point()
    for i in range(steps):
        s.write()
        if s.rng.random() < 0.08:
            s.shipper.ship_once()
        if i in (steps // 3, 2 * steps // 3):
            s.take_point()
    while s.shipper.ship_once():
        pass
    s.shipper.ship_once()
    return s


def instants(s: Scenario) -> list[int]:
    times = [t for t, _ in s.history]
    picks = [*s.rng.sample(times, 25), times[-1] + 10**9]  # exactly at writes and marks; after the last
    picks += [t + 1 for t in s.rng.sample(times, 10)] + [t - 1 for t in s.rng.sample(times, 10)]
    return sorted(picks)


def test_every_instant_reads_and_restores_as_the_model(repo: Repository, tmp_path: Path) -> None:
    s = run_scenario(tmp_path, repo, seed=1, steps=300)
    assert len(cdp.list_batches(repo)) > 3
    for when in instants(s):
        expected = s.expected(when)
        if expected is None:
            with pytest.raises(PointNotFound):
                open_state(repo, f"v@{iso_ns(when)}")
            continue
        inst, view = open_state(repo, f"v@{iso_ns(when)}")
        assert view.read(0, SIZE) == expected, f"state at {when}"
        offset = s.rng.randrange(SIZE - 10000)
        assert view.read(offset, 9999) == expected[offset : offset + 9999]
        if inst.records:
            target = tmp_path / f"restored-{when}.img"
            restore.run(repo, inst.point, str(target), extents=cdp.extent_map(inst.records, SIZE))
            assert target.read_bytes() == expected
            target.unlink()


def test_prune_keeps_the_journal_and_check_verifies_it(repo: Repository, tmp_path: Path) -> None:
    s = run_scenario(tmp_path, repo, seed=2, steps=120)
    with repo.lock(exclusive=True):
        prune(repo, Policy(keep_last=1))
    assert check(repo).ok
    for when in instants(s)[-10:]:
        expected = s.expected(when)
        if expected is not None and when >= repo.list_points()[0].state_time_ns:
            assert open_state(repo, f"v@{iso_ns(when)}")[1].read(0, SIZE) == expected


def test_shipping_survives_an_outage_and_a_restart(repo: Repository, tmp_path: Path) -> None:
    s = Scenario(tmp_path, repo, seed=3)
    s.take_point()
    faulty = FaultyBackend(repo.backend, {})
    broken = Repository(faulty, repo.config, repo.crypto, repo.key_id)
    shipper = Shipper(s.journal, broken, "v")
    s.journal.max_bytes = 40 * 1024  # tight: unshipped segments must still be kept
    for _ in range(20):
        s.write()
    faulty.fail_on = {"store": "E" * 1000}  # the repository is unreachable
    with pytest.raises(RepositoryIOError):
        shipper.ship_once()
    status = shipper.status()
    assert status.pending_records >= 20 and status.lag_s > 0
    for _ in range(200):
        s.write()
    faulty.fail_on = {}
    while shipper.ship_once():
        pass
    shipper.ship_once()
    assert shipper.status().pending_records == 0 and shipper.status().lag_s == 0
    fresh = Shipper(s.journal, repo, "v")  # a restarted daemon: where to go on comes from the repository
    s.write()
    fresh.ship_once()
    assert fresh.status().shipped_seq == s.journal.last_seq
    last = s.history[-1]
    assert open_state(repo, f"v@{iso_ns(last[0])}")[1].read(0, SIZE) == last[1]


def test_compaction_thins_old_journal_and_never_loses_a_write_in_the_window(repo: Repository, tmp_path: Path) -> None:
    s = Scenario(tmp_path, repo, seed=4)
    for _ in range(5):
        s.write()
    s.take_point()
    bookmark_ns = 0
    for i in range(240):
        s.write()
        if i == 60:  # what the daemon's bookmark does: a snapshot's instant, marked by name
            info = s.volume.create_snapshot("bm")
            s.journal.append_mark("bookmark", "before-upgrade", time_ns=info.created_ns, seq=info.journal_seq,
                                  consistency="application-consistent")  # fmt: skip
            s.volume.delete_snapshot("bm")
            s.history.append((info.created_ns, bytes(s.model)))
            bookmark_ns = info.created_ns
        if s.rng.random() < 0.1:
            s.shipper.ship_once()
    while s.shipper.ship_once():
        pass
    s.shipper.ship_once()
    times = [t for t, _ in s.history]
    cutoff = times[180]
    every_s = (times[170] - times[6]) / 4e9
    before = len(cdp.list_batches(repo))
    result = compact(repo, "v", keep_within_s=1.0, every_s=every_s, now_ns=cutoff + 10**9)
    assert len(result.points) >= 4 and result.batches_deleted > 0
    assert len(cdp.list_batches(repo)) < before
    synthetic = {p.state_time_ns: p for p in repo.list_points("v") if p.type == "synthetic"}
    assert synthetic[bookmark_ns].consistency == "application-consistent"
    assert "before-upgrade" in synthetic[bookmark_ns].tags
    kept = sorted(p.state_time_ns for p in repo.list_points("v"))

    def assert_state(when: int) -> bool:
        inst, view = open_state(repo, f"v@{iso_ns(when)}")
        got = view.read(0, SIZE)
        if when >= cutoff:
            assert got == s.expected(when) and not inst.compacted, "a write inside the retention window was lost"
        elif inst.compacted:  # outside: the newest kept state at or before
            assert got == s.expected(max(k for k in kept if k <= when))
        else:  # (or exactly, where the records after a kept state are still whole in a batch)
            assert got == s.expected(when)
        return inst.compacted

    outside = s.rng.sample([t for t in times if times[5] < t < cutoff], 40)
    assert not any(assert_state(when) for when in times if when >= cutoff)
    assert sum(assert_state(when) for when in outside) > 10
    with repo.lock(exclusive=True):
        prune(repo, Policy(keep_last=1))  # the journal's anchor point is kept whatever the policy says
    assert check(repo).ok
    for when in [t for t in times if t >= cutoff]:
        assert_state(when)
    again = compact(repo, "v", keep_within_s=1.0, every_s=every_s, now_ns=cutoff + 10**9)
    assert again.points == [] and again.batches_deleted == 0  # nothing left to do


def test_diff_between_instants_finds_exactly_the_blocks_that_differ(repo: Repository, tmp_path: Path) -> None:
    s = run_scenario(tmp_path, repo, seed=5, steps=150)
    times = [t for t, _ in s.history if t >= s.first_point_ns]
    bs = repo.config.block_size
    for _ in range(8):
        t1, t2 = sorted(s.rng.sample(times, 2))
        a, b = s.expected(t1), s.expected(t2)
        assert a is not None and b is not None
        want = [(k, k + bs) for k in range(0, SIZE, bs) if a[k : k + bs] != b[k : k + bs]]
        _, _, result = diff_states(repo, f"v@{iso_ns(t1)}", f"v@{iso_ns(t2)}")
        got = [(k, k + bs) for s_, e in result.ranges for k in range(s_, e, bs)]
        assert got == want


def test_shipping_merges_its_index_files_and_survives_prune_between_batches(repo: Repository, tmp_path: Path) -> None:
    s = Scenario(tmp_path, repo, seed=6)
    s.take_point()
    for round_ in range(80):  # one batch per round
        s.write()
        s.shipper.ship_once()
        if round_ == 50:
            with repo.lock(exclusive=True):
                prune(repo, Policy(keep_last=1))  # rewrites every index file under the shipper
    assert len(cdp.list_batches(repo)) >= 80
    assert len(list(repo.backend.list("index"))) < 40  # not one per batch
    repo.invalidate_index()
    assert check(repo, read_data=True).ok
    for when, expected in s.history[-30:]:
        assert open_state(repo, f"v@{iso_ns(when)}")[1].read(0, SIZE) == expected


def test_a_journal_gap_is_refused_until_the_next_point(
    repo: Repository, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Writes made while the journal could not be written reach the volume; every instant before
    the gap and after the next point restores exactly, every instant between is refused."""
    from umbra.cow import journal as journal_mod
    from umbra.engine.timeline import timeline
    from umbra.errors import InstantInGap

    monkeypatch.setattr(journal_mod, "RETRY_FIRST", 0.0)
    s = Scenario(tmp_path, repo, seed=9)
    s.journal.resume_free = 0
    for _ in range(5):
        s.write()
    s.take_point()
    for _ in range(30):
        s.write()
    real_writev = journal_mod.os.writev

    def enospc(fd: int, parts: list) -> int:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(journal_mod.os, "writev", enospc)
    for _ in range(20):
        s.write()  # the volume takes them; the journal does not
    gap = s.journal.gap
    assert gap is not None
    gap_writes = s.history[-20:]
    monkeypatch.setattr(journal_mod.os, "writev", real_writev)
    for _ in range(20):
        s.write()  # the first one records the gap
    assert s.journal.gap is None
    assert (tmp_path / "vol.img").read_bytes() == s.model  # no write was lost on the volume
    s.take_point()
    second_point_ns = s.history[-1][0]
    for _ in range(20):
        s.write()
    while s.shipper.ship_once():
        pass
    s.shipper.ship_once()

    refused = 0
    times = [t for t, _ in s.history]
    for when in sorted({*times, *(t - 1 for t in times), gap.since_ns - 1, gap.since_ns}):
        expected = s.expected(when)
        if expected is None:
            continue
        if gap.since_ns <= when < second_point_ns:
            with pytest.raises(InstantInGap, match="lacks the writes from"):
                open_state(repo, f"v@{iso_ns(when)}")
            refused += 1
            continue
        _inst, view = open_state(repo, f"v@{iso_ns(when)}")
        assert view.read(0, SIZE) == expected, f"state at {when}"
    assert refused >= 40 and all(gap.since_ns <= t < second_point_ns for t, _ in gap_writes)

    events, _span = timeline(repo, "v")
    (gap_event,) = [e for e in events if e.kind == "gap"]
    assert gap_event.time_ns == gap.since_ns and "No space left" in gap_event.name

    # compaction cannot make points inside the gap: it skips them and keeps every other instant
    result = compact(repo, "v", keep_within_s=0, every_s=1e-6)
    assert result.skipped and all(gap.since_ns <= t < second_point_ns for t in result.skipped)
    _inst, view = open_state(repo, f"v@{iso_ns(gap.since_ns - 1)}")
    assert view.read(0, SIZE) == s.expected(gap.since_ns - 1)
    _inst, view = open_state(repo, f"v@{iso_ns(times[-1])}")
    assert view.read(0, SIZE) == s.model
    s.journal.close()


def test_only_durable_records_are_shipped(repo: Repository, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A record that a power cut could still take from the local journal is never in the repository
    (its sequence number would be used again, for another write, after the restart)."""
    journal = Journal.open(tmp_path / "j", SIZE, commit_interval=3600)
    shipper = Shipper(journal, repo, "v")
    journal.append_write(0, b"a" * 100)
    journal.commit()
    journal.append_write(100, b"b" * 100)  # in the file, not yet durable
    monkeypatch.setattr(journal, "commit", lambda: None)  # as if every fdatasync were still to come
    shipper.ship_once()
    assert shipper.shipped_seq == 1
    monkeypatch.undo()
    shipper.ship_once()  # the shipper makes them durable itself before it reads
    assert shipper.shipped_seq == 2
    journal.close()


def test_a_damaged_local_journal_cut_off_after_shipping(repo: Repository, tmp_path: Path) -> None:
    """Records already shipped are damaged locally and cut off (--journal-cut-damaged): the journal
    goes on after their numbers, the repository takes the jump, and every instant before the
    damage and after the next point still restores exactly."""
    from umbra.errors import InstantInGap

    s = Scenario(tmp_path, repo, seed=11)
    s.journal.resume_free = 0
    for _ in range(5):
        s.write()
    s.take_point()
    for _ in range(60):
        s.write()
    while s.shipper.ship_once():
        pass
    shipped, shipped_ns = s.shipper.shipped_seq, s.shipper._shipped_ns
    s.journal.close()
    segments = sorted((tmp_path / "journal").glob("seg-*"))
    victim = segments[len(segments) // 2]
    data = bytearray(victim.read_bytes())
    data[-100] ^= 1
    victim.write_bytes(bytes(data))
    journal = Journal.open(tmp_path / "journal", SIZE, segment_bytes=32 * 1024, cut_damaged=True, resume_free=0)
    gap_mark = list(journal.records())[-1]
    assert gap_mark.seq == shipped + 1 and gap_mark.mark["first_missing_seq"] < shipped
    s.journal = s.volume.journal = journal
    s.shipper = Shipper(journal, repo, "v")
    for _ in range(10):
        s.write()
    s.take_point()
    for _ in range(10):
        s.write()
    while s.shipper.ship_once():
        pass
    assert gap_mark.mark["since_ns"] < shipped_ns  # the local journal lost records the repository has
    second_point = max(p.state_time_ns for p in repo.list_points("v"))
    refused = 0
    for when, expected in s.history:
        if when < s.first_point_ns:
            continue
        if shipped_ns < when < second_point:  # nowhere are these writes journaled
            refused += 1
            with pytest.raises(InstantInGap):
                open_state(repo, f"v@{iso_ns(when)}")
            continue
        _inst, view = open_state(repo, f"v@{iso_ns(when)}")
        assert view.read(0, SIZE) == expected, f"state at {when}"
    assert refused >= 10
    journal.close()
