"""Power loss under a repository, at the block level (RELIABILITY A3).

The repository lives on ext4 on a loop device over umbra's own protected volume, so the CDP journal
records every write the filesystem sends to its disk, in order and timed, and (a test-only knob)
a ``flush`` mark after every flush.  Two disks are modelled at each cut: one that keeps writes in
order (the disk holds a prefix of the stream), and one with a volatile cache (everything before the
last flush is there; each write since then is kept, dropped or torn at 4 KiB sectors, seeded).  Cuts:
right after each command returned, at seeded instants while commands ran (init, full and
incremental backups, a prune), and just before every flush that ended three or more writes (three
fates each).  The disk is rebuilt as it stood, ext4 recovers its own journal at mount, and then:
the repository opens, ``check --read-data`` passes (a pack that does not hash to its name fails
it), every point listed restores byte-identical to what was backed up, and every point whose
command returned before the cut (and that no prune started before the cut may have deleted) is
there.
"""

from __future__ import annotations

import bisect
import os
import random
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.conftest import requires
from tests.engine.helpers import restored, sha, write_at
from tests.frontends.protect_helpers import Protected
from umbra.cow.journal import MARK, WRITE, ZERO, Journal, Record
from umbra.errors import UmbraError
from umbra.repo.backends import LocalBackend
from umbra.repo.check import check
from umbra.repo.repository import Repository

pytestmark = [pytest.mark.slow, pytest.mark.root, pytest.mark.loopdev]
MiB = 1 << 20
DISK = 160 * MiB
SEED = 20261202
CUTS_PER_COMMAND = 8
FATES_PER_WIDE_CUT = 3
SECTOR = 4096  # what the disk writes atomically


@dataclass
class Command:
    started_ns: int
    returned_ns: int
    added: dict[str, str] = field(default_factory=dict)  # point id -> sha256 of its volume
    removed: set[str] = field(default_factory=set)


def _umbra(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "umbra.cli.main", *args], env=env, capture_output=True, text=True)


def _points(repo: Path) -> set[str]:
    return set(Repository.open(LocalBackend(repo), "pw").point_ids())


def _run_commands(mnt: Path, work: Path) -> list[Command]:
    """init, three backups and a prune into ``mnt/repo``; what each did and when."""
    env = {**os.environ, "UMBRA_PASSWORD": "pw", "UMBRA_REPO": str(mnt / "repo")}
    rng = random.Random(SEED)
    source = work / "source.img"
    source.write_bytes(rng.randbytes(4 * MiB) + bytes(2 * MiB) + rng.randbytes(2 * MiB))
    commands: list[Command] = []

    def run(*args: str) -> Command:
        before = _points(mnt / "repo") if commands else set()
        started = time.time_ns()
        result = _umbra(env, *args)
        returned = time.time_ns()
        assert result.returncode == 0, (args, result.stderr)
        after = _points(mnt / "repo")
        command = Command(started, returned, {p: sha(source) for p in after - before}, before - after)
        commands.append(command)
        return command

    run("init")
    run("backup", str(source), "-v", "vol")
    for _ in range(30):
        write_at(source, rng.randrange(0, 8 * MiB - 65536), rng.randbytes(65536))
    run("backup", str(source), "-v", "vol", "--type", "incremental")
    for _ in range(30):
        write_at(source, rng.randrange(0, 8 * MiB - 65536), rng.randbytes(65536))
    run("backup", str(source), "-v", "vol")
    assert len(run("prune", "--keep-last", "1").removed) == 2
    return commands


def _cuts(events: list[Record], commands: list[Command], rng: random.Random) -> list[int]:
    """How many journal events the disk had seen at each cut: right after each command returned,
    and up to CUTS_PER_COMMAND seeded counts while it ran (none before init returned: no repository
    yet)."""
    times = [r.time_ns for r in events]
    counts = {len(events)}
    for c in commands[1:]:
        first, last = bisect.bisect_right(times, c.started_ns), bisect.bisect_right(times, c.returned_ns)
        counts.add(last)
        counts.update(rng.sample(range(first, last + 1), min(CUTS_PER_COMMAND, last + 1 - first)))
    return sorted(counts)


def _apply(fd: int, records: list[Record]) -> None:
    for r in records:
        if r.kind == WRITE:
            os.pwrite(fd, r.data, r.offset)
        elif r.kind == ZERO:
            os.pwrite(fd, bytes(r.length), r.offset)


def _unflushed_fate(records: list[Record], rng: random.Random) -> tuple[list[Record], str]:
    """What a volatile disk cache made of the writes since the last flush: each kept, dropped or
    torn (some of its 4 KiB sectors written, the others not: a sector is written whole or not at
    all), in any combination."""
    out, fates = [], []
    for r in records:
        sectors = r.length // SECTOR if r.kind == WRITE and r.offset % SECTOR == 0 else 0
        fate = rng.choice(["keep", "drop", "tear"] if sectors > 1 and r.length % SECTOR == 0 else ["keep", "drop"])
        fates.append(fate[0])
        if fate == "keep":
            out.append(r)
        elif fate == "tear":
            for i in sorted(rng.sample(range(sectors), rng.randrange(1, sectors))):
                piece = r.data[i * SECTOR : (i + 1) * SECTOR]
                out.append(Record(r.seq, r.time_ns, WRITE, r.offset + i * SECTOR, SECTOR, piece))
    return out, "".join(fates)


def _verify(repo_dir: Path, commands: list[Command], cut: str, instant: int, scratch: Path) -> None:
    oracle = {pid: digest for c in commands for pid, digest in c.added.items()}
    must = {pid for c in commands if c.returned_ns <= instant for pid in c.added}
    must -= {pid for c in commands if c.started_ns <= instant for pid in c.removed}
    try:
        repo = Repository.open(LocalBackend(repo_dir), "pw")
    except UmbraError as exc:
        pytest.fail(f"{cut}: the repository does not open: {exc}")
    result = check(repo, read_data=True)
    assert result.ok, (cut, result.errors)
    listed = set(repo.point_ids())
    assert must <= listed, (cut, "points whose command returned are gone", must - listed)
    for pid in listed:
        assert pid in oracle, (cut, "a point that no command made", pid)
        assert sha(restored(repo, repo.load_point(pid), scratch / "restored.img")) == oracle[pid], (cut, pid)


def test_power_loss_at_any_instant_keeps_the_repository_consistent(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    requires("root", "loop", "mkfs.ext4")
    monkeypatch.setenv("UMBRA_TESTONLY_FLUSH_MARKS", "1")  # the daemon marks each flush in its journal
    disk = tmp_path / "disk.img"
    with open(disk, "wb") as f:
        f.truncate(DISK)
    state = tmp_path / "state"
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    protected = Protected(disk, "pl", state, "--loop")
    try:
        loop = protected.info["loop"]
        subprocess.run(["mkfs.ext4", "-q", "-E", "lazy_itable_init=0,lazy_journal_init=0", loop], check=True)
        subprocess.run(["mount", loop, str(mnt)], check=True)
        try:
            commands = _run_commands(mnt, tmp_path)
        finally:
            subprocess.run(["umount", str(mnt)], check=True)
    finally:
        assert protected.stop() == 0, protected.output()

    journal = Journal.open(state / "journal", DISK)
    try:
        events = [r for r in journal.records() if r.kind in (WRITE, ZERO) or r.mark.get("kind") == "flush"]
    finally:
        journal.close()
    flushes = [i for i, r in enumerate(events) if r.kind == MARK]
    assert flushes and len(flushes) < len(events)

    rng = random.Random(SEED)
    cuts = _cuts(events, commands, rng)
    assert len(cuts) >= 25
    # and just before every flush that ended three or more writes (the disk's cache the fullest),
    # each with several fates of those writes
    wide = {i for n, i in enumerate(flushes) if i - (flushes[n - 1] if n else -1) > 3}
    wide = {i for i in wide if events[i].time_ns > commands[0].returned_ns}
    assert wide
    cuts = sorted(set(cuts) | wide)
    view = tmp_path / "view"
    view.mkdir()
    at_cut = tmp_path / "cut.img"
    # the disk brought forward cut by cut: with every write it received, and as of its last flush
    images = {"in order": tmp_path / "in-order.img", "flushed": tmp_path / "flushed.img"}
    applied = {"in order": 0, "flushed": 0}
    fds = {}
    for name, path in images.items():
        with open(path, "wb") as f:
            f.truncate(DISK)
        fds[name] = os.open(path, os.O_WRONLY)

    def check_disk(label: str, instant: int) -> None:
        mount = subprocess.run(["mount", "-o", "loop", str(at_cut), str(view)], capture_output=True, text=True)
        assert mount.returncode == 0, (label, "ext4 does not mount", mount.stderr)  # (it replays its journal)
        try:
            _verify(view / "repo", commands, label, instant, tmp_path)
        finally:
            subprocess.run(["umount", str(view)], check=True)

    try:
        for count in cuts:
            flushed = max((i + 1 for i in flushes if i < count), default=0)  # events through the last flush
            for name, upto in (("in order", count), ("flushed", flushed)):
                _apply(fds[name], events[applied[name] : upto])
                applied[name] = upto
            # the power went just before the next event
            instant = events[count].time_ns - 1 if count < len(events) else time.time_ns()
            shutil.copyfile(images["in order"], at_cut)  # a disk that keeps writes in order
            check_disk(f"cut after event {count} of {len(events)}, in order", instant)
            unflushed = [r for r in events[flushed:count] if r.kind != MARK]
            for _ in range(FATES_PER_WIDE_CUT if count in wide else 1 if unflushed else 0):
                # a disk whose cache lost, kept or tore what was not flushed
                shutil.copyfile(images["flushed"], at_cut)
                kept, fates = _unflushed_fate(unflushed, rng)
                fd = os.open(at_cut, os.O_WRONLY)
                try:
                    _apply(fd, kept)
                finally:
                    os.close(fd)
                check_disk(f"cut after event {count} of {len(events)}, unflushed writes {fates}", instant)
    finally:
        for fd in fds.values():
            os.close(fd)
