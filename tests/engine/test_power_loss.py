"""Power loss under a repository, at the block level (RELIABILITY A3 for a disk that persists in
order).

The repository lives on ext4 on a loop device over umbra's own protected volume, so the CDP journal
records every write the filesystem sends to its disk, in order and timed.  A power cut at any
instant leaves such a disk holding a prefix of that stream.  For cuts right after each command
returned and at seeded random instants while commands ran (init, full and incremental backups, a
prune), the disk is rebuilt as it stood, ext4 recovers its own journal at mount, and then: the
repository opens, ``check --read-data`` passes, every point listed restores byte-identical to what
was backed up, and every point whose command returned before the cut (and that no prune started
before the cut may have deleted) is there.  Not modelled: a disk that reorders or drops writes it
acknowledged before a flush (the CrashStorage of A3).
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
from umbra.cow.journal import WRITE, ZERO, Journal, Record
from umbra.errors import UmbraError
from umbra.repo.backends import LocalBackend
from umbra.repo.check import check
from umbra.repo.repository import Repository

pytestmark = [pytest.mark.slow, pytest.mark.root, pytest.mark.loopdev]
MiB = 1 << 20
DISK = 160 * MiB
SEED = 20261202
CUTS_PER_COMMAND = 8


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


def _cuts(records: list[Record], commands: list[Command], rng: random.Random) -> list[int]:
    """How many records the disk holds at each cut: right after each command returned, and up to
    CUTS_PER_COMMAND seeded counts while it ran (none before init returned: no repository yet)."""
    times = [r.time_ns for r in records]
    counts = {len(records)}
    for c in commands[1:]:
        first, last = bisect.bisect_right(times, c.started_ns), bisect.bisect_right(times, c.returned_ns)
        counts.add(last)
        counts.update(rng.sample(range(first, last + 1), min(CUTS_PER_COMMAND, last + 1 - first)))
    return sorted(counts)


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


def test_power_loss_at_any_instant_keeps_the_repository_consistent(tmp_path: Path) -> None:
    requires("root", "loop", "mkfs.ext4")
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
        records = [r for r in journal.records() if r.kind in (WRITE, ZERO)]
    finally:
        journal.close()
    assert records

    cuts = _cuts(records, commands, random.Random(SEED))
    assert len(cuts) >= 25
    rebuilt = tmp_path / "rebuilt.img"  # the disk as the journal has it, brought forward cut by cut
    with open(rebuilt, "wb") as f:
        f.truncate(DISK)
    fd = os.open(rebuilt, os.O_WRONLY)
    view = tmp_path / "view"
    view.mkdir()
    applied = 0
    try:
        for count in cuts:
            for r in records[applied:count]:
                os.pwrite(fd, r.data if r.kind == WRITE else bytes(r.length), r.offset)
            applied = count
            # the power went just before the next record arrived
            instant = records[count].time_ns - 1 if count < len(records) else time.time_ns()
            at_cut = tmp_path / "cut.img"
            shutil.copyfile(rebuilt, at_cut)
            subprocess.run(["mount", "-o", "loop", str(at_cut), str(view)], check=True)  # ext4 replays its journal
            try:
                _verify(view / "repo", commands, f"cut after record {count} of {len(records)}", instant, tmp_path)
            finally:
                subprocess.run(["umount", str(view)], check=True)
    finally:
        os.close(fd)
