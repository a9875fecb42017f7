"""Reading an ext4 image whose newest metadata is only in its journal (an image of a live
filesystem): ``ls``/``extract`` replay the journal in memory and see what a mount would."""

from __future__ import annotations

import hashlib
import os
import random
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import requires
from tests.loopdev import loop_device, mounted
from umbra.volume import jbd2
from umbra.volume.filesystem import FileSystem

MiB = 1 << 20

WORKLOAD = """
import os, sys
root = sys.argv[1]
def sync(path):
    fd = os.open(path, os.O_RDONLY)
    os.fsync(fd)  # a journal commit, and no more: the home blocks stay dirty in the page cache
    os.close(fd)
os.mkdir(f"{root}/gone")
for i in range(20):
    with open(f"{root}/gone/f{i}", "w") as f:
        f.write("x" * 5000)
sync(f"{root}/gone"); sync(root)
for i in range(20):
    os.unlink(f"{root}/gone/f{i}")
os.rmdir(f"{root}/gone")  # its blocks are freed and revoked in a later transaction
os.mkdir(f"{root}/kept")
for i in range(30):
    with open(f"{root}/kept/f{i}", "wb") as f:
        f.write(os.urandom(i * 3000))
        os.fsync(f.fileno())
os.symlink("kept/f3", f"{root}/link")
sync(f"{root}/kept"); sync(root)
"""


def tree(image: Path) -> dict[str, object]:
    """Every entry: kind, size and content digest, read with umbra's filesystem reader."""
    fd = os.open(image, os.O_RDONLY)
    try:
        fs = FileSystem(lambda o, n: os.pread(fd, n, o), os.fstat(fd).st_size, str(image))
        out: dict[str, object] = {"_replayed": fs.journal_blocks > 0}
        todo = [fs.root()]
        while todo:
            for e in fs.children(todo.pop()):
                data = b"".join(d for _, d in fs.read_file(e)) if e.kind == "file" else e.link_target
                out[e.path.decode()] = (e.kind, e.size, hashlib.sha256(data).hexdigest())
                if e.kind == "dir":
                    todo.append(e)
        return out
    finally:
        os.close(fd)


@pytest.mark.root
@pytest.mark.loopdev
def test_journal_replayed_in_memory_matches_a_mount(tmp_path: Path) -> None:
    requires("loop", "mkfs.ext4")
    live = tmp_path / "live.img"
    with open(live, "wb") as f:
        f.truncate(64 * MiB)
    subprocess.run(["mkfs.ext4", "-q", "-F", str(live)], check=True)
    copy = tmp_path / "copy.img"
    with loop_device(live) as dev, mounted(dev, tmp_path / "m", "rw") as mnt:
        subprocess.run([sys.executable, "-c", WORKLOAD, str(mnt)], check=True)
        shutil.copyfile(live, copy)  # what had reached the disk: as a crash-consistent snapshot
    clean = tree(live)  # unmounted cleanly: the oracle
    before = hashlib.sha256(copy.read_bytes()).hexdigest()
    replayed = tree(copy)
    assert hashlib.sha256(copy.read_bytes()).hexdigest() == before, "replayed in memory, nothing written"
    assert replayed.pop("_replayed") and not clean.pop("_replayed")
    assert "/kept/f29" in clean and "/gone" not in clean
    assert replayed == clean, "the journal replayed in memory gives exactly the unmounted filesystem"
    with pytest.MonkeyPatch.context() as mp:  # the same image read without the journal: not so
        mp.setattr(FileSystem, "_replay_journal", lambda self, size: None)
        assert tree(copy) != clean


RANDOM_WORKLOAD = """
import os, random, sys
root, rng, names = sys.argv[1], random.Random(int(sys.argv[2])), []
def sync(path):
    fd = os.open(path, os.O_RDONLY)
    os.fsync(fd)
    os.close(fd)
for step in range(int(sys.argv[3])):
    r, d = rng.random(), f"{root}/d{rng.randrange(8)}"
    os.makedirs(d, exist_ok=True)
    if r < 0.5 or not names:
        with open(f"{d}/f{step}", "wb") as f:
            f.write(os.urandom(rng.choice([0, 100, 5000, 70000])))
            if rng.random() < 0.5:
                os.fsync(f.fileno())
        names.append(f"{d}/f{step}")
    elif r < 0.7:
        os.unlink(names.pop(rng.randrange(len(names))))
    elif r < 0.85:
        new = f"{root}/d{rng.randrange(8)}/r{step}"
        os.makedirs(os.path.dirname(new), exist_ok=True)
        os.rename(names.pop(rng.randrange(len(names))), new)
        names.append(new)
    else:
        sync(d)
        sync(root)
sync(root)
"""


@pytest.mark.root
@pytest.mark.loopdev
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_replay_agrees_with_the_kernel_under_random_workloads(tmp_path: Path, seed: int) -> None:
    """Creates, deletes, renames and fsyncs on an ext4 with the smallest journal (1 MiB, so it
    wraps): the copy read with the in-memory replay equals the same copy after the kernel replayed
    it at mount."""
    requires("loop", "mkfs.ext4")
    live, copy = tmp_path / "live.img", tmp_path / "copy.img"
    with open(live, "wb") as f:
        f.truncate(64 * MiB)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-J", "size=1", str(live)], check=True)
    with loop_device(live) as dev, mounted(dev, tmp_path / "m", "rw") as mnt:
        subprocess.run([sys.executable, "-c", RANDOM_WORKLOAD, str(mnt), str(seed), "2000"], check=True)
        shutil.copyfile(live, copy)
    replayed = tree(copy)
    assert replayed.pop("_replayed"), "the copy needed its journal"
    with loop_device(copy) as dev, mounted(dev, tmp_path / "m2", "rw"):
        pass  # the kernel replays the copy's journal into it
    by_kernel = tree(copy)
    by_kernel.pop("_replayed")
    assert replayed == by_kernel


def _journal(blocks: list[bytes], bs: int = 1024, start: int = 1, sequence: int = 7) -> bytes:
    """A v2 journal (no checksums, 32-bit): superblock, then ``blocks`` from block 1."""
    sb = bytearray(bs)
    struct.pack_into(">III", sb, 0, jbd2.JBD2_MAGIC, jbd2.SUPERBLOCK_V2, 0)
    struct.pack_into(">IIIII", sb, 12, bs, 1 + len(blocks), 1, sequence, start)
    struct.pack_into(">I", sb, 40, jbd2.INCOMPAT_REVOKE)
    return bytes(sb) + b"".join(b.ljust(bs, b"\0") for b in blocks)


def _descriptor(seq: int, targets: list[tuple[int, int]]) -> bytes:
    out = bytearray(struct.pack(">III", jbd2.JBD2_MAGIC, jbd2.DESCRIPTOR, seq))
    for k, (block, flags) in enumerate(targets):
        last = jbd2.FLAG_LAST_TAG if k == len(targets) - 1 else 0
        out += struct.pack(">IHH", block, 0, flags | last | (jbd2.FLAG_SAME_UUID if k else 0))
        if not k:
            out += bytes(16)  # the first tag carries the journal's UUID
    return bytes(out)


def _block(kind: int, seq: int, body: bytes = b"") -> bytes:
    return struct.pack(">III", jbd2.JBD2_MAGIC, kind, seq) + body


def test_scan_replays_committed_transactions_and_honours_revokes() -> None:
    escaped_payload = struct.pack(">I", jbd2.JBD2_MAGIC) + b"rest of block"
    blocks = [
        _descriptor(7, [(100, 0), (101, jbd2.FLAG_ESCAPE)]),
        b"first copy of 100",
        bytes(4) + escaped_payload[4:],  # jbd2 zeroes the magic of an escaped block
        _block(jbd2.COMMIT, 7),
        _descriptor(8, [(100, 0), (102, 0)]),
        b"second copy of 100",
        b"copy of 102",
        _block(jbd2.REVOKE, 8, struct.pack(">I", 16 + 4) + struct.pack(">I", 101)),
        _block(jbd2.COMMIT, 8),
        _descriptor(9, [(103, 0)]),  # never committed: not replayed
        b"uncommitted 103",
    ]
    journal = _journal(blocks)
    replay = jbd2.scan(lambda o, n: journal[o : o + n], len(journal), fs_blocks=1000)
    assert replay is not None and replay.transactions == 2
    assert set(replay.copies) == {100, 102}, "101 revoked by a later transaction, 103 not committed"
    assert replay.copies[100] == (6, False), "the newest committed copy wins"
    image = bytes(1024 * 200)
    reader = jbd2.ReplayedReader(lambda o, n: image[o : o + n], lambda o, n: journal[o : o + n], replay)
    assert reader(100 * 1024, 18) == b"second copy of 100"
    assert reader(100 * 1024 - 5, 10) == bytes(5) + b"secon", "reads across a block edge"
    assert reader(101 * 1024, 4) == bytes(4), "revoked: the home block"
    escaped = jbd2.Replay(1024, {101: (3, True)}, 1)
    reader = jbd2.ReplayedReader(lambda o, n: image[o : o + n], lambda o, n: journal[o : o + n], escaped)
    assert reader(101 * 1024, len(escaped_payload)) == escaped_payload


def test_scan_survives_garbage() -> None:
    rng = random.Random(5)
    for _ in range(300):
        blocks = [rng.randbytes(rng.randrange(0, 1024)) for _ in range(rng.randrange(1, 12))]
        for k in rng.sample(range(len(blocks)), k=min(3, len(blocks))):
            blocks[k] = _descriptor(7, [(rng.randrange(1 << 32), rng.randrange(16))]) + blocks[k][:40]
        journal = _journal(blocks, start=rng.randrange(0, len(blocks) + 2))
        replay = jbd2.scan(lambda o, n, j=journal: j[o : o + n], len(journal), fs_blocks=1 << 20)
        assert replay is None or all(b < 1 << 20 for b in replay.copies)
